"""``au-detect sweep``: an Optuna study whose trials are real fits, tracked as MLflow runs under one
parent run; resumed after its process is killed, shared by processes started together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from experiments.cli import main
from experiments.sweep import PARENT_ATTR

from .training_helpers import small_fit_args, write_mlflow_yaml

ROOT = Path(__file__).resolve().parents[1]
AU_DETECT = str(Path(sys.executable).with_name("au-detect"))
EXPERIMENT = "sweep"
SPACE = {"model.optimizer.init_args.lr": {"low": 1e-4, "high": 1e-2, "log": True},
         "model.branches": {"choices": [["face", "emotion"], ["face"]]}}


class PruneTrials(optuna.pruners.BasePruner):
    """Prunes the trials with these numbers at their first report (a pruner whose decision is known)."""

    def __init__(self, numbers: list[int]):
        self.numbers = numbers

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number in self.numbers


def _fit_overrides(synthau: Path, cache: Path, epochs: int) -> dict:
    """``small_fit_args`` as the sweep's dotted overrides (what the sweep sets itself left out)."""
    args = small_fit_args(synthau, cache, Path("unused"), Path("unused"), epochs=epochs)
    pairs = dict(zip(args[0::2], args[1::2]))
    overrides = {k[2:]: yaml.safe_load(v) for k, v in pairs.items()
                 if k not in ("--config", "--mlflow", "--trainer.default_root_dir")}
    # one training batch of the 6 (an int 1 would be read as 1.0: all of them), a smaller ResNet, no
    # model or last checkpoint per trial
    return {**overrides, "trainer.limit_train_batches": 0.2, "model.backbone": "resnet10t",
            "mlflow_artifacts.log_model": False, "checkpoint.save_last": False}


def _write_config(tmp_path: Path, synthau: Path, cache: Path, name: str, n_trials: int, pruner: dict,
                  epochs: int = 2, **more) -> tuple[Path, str, str]:
    mlflow_yaml = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", EXPERIMENT)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    config = {"study": name, "fit_config": str(ROOT / "experiments" / "configs" / "demo.yaml"),
              "fit_overrides": _fit_overrides(synthau, cache, epochs), "search_space": SPACE, "n_trials": n_trials,
              "storage": storage, "seed": 0, "pruner": pruner, "out": str(tmp_path / "runs"),
              "mlflow": str(mlflow_yaml), **more}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, storage, f"sqlite:///{tmp_path}/mlflow.db"


def _runs(client: MlflowClient, name: str) -> tuple[list, list]:
    """The study's parent runs and trial runs."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study` = '{name}'", max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    return parents, [r for r in runs if r.data.tags.get("sweep.role") != "parent"]


def _history(client: MlflowClient, run_id: str, metric: str = "val/score_heldout") -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


@pytest.mark.slow
def test_sweep_trials_are_fits_under_one_parent_with_the_best_as_a_fit_config(synthau, fit_cache, tmp_path):
    """Three trials, the second pruned after its first epoch: three child runs of one parent, the
    trials' values their best epochs' scores, and the parent holding the best trial as a config
    that ``au-detect fit`` takes, the table and the plots."""
    pruner = {"class_path": "tests.test_sweep.PruneTrials", "init_args": {"numbers": [1]}}
    config, storage, tracking_uri = _write_config(tmp_path, synthau, fit_cache, "s3", 3, pruner)
    main(["sweep", "--config", str(config)])

    study = optuna.load_study(study_name="s3", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[1].intermediate_values.keys() == {0}  # pruned at its first validation, not after the fit
    client = MlflowClient(tracking_uri)
    (parent,), children = _runs(client, "s3")
    parent_id = parent.info.run_id
    assert study.user_attrs[PARENT_ATTR] == parent_id and parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["s3-trial-0", "s3-trial-1", "s3-trial-2"]
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    for trial in trials:
        run = by_trial[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        # the trial's values are the fit's options (its params come from the resolved config)
        lr = float(run.data.params["model.optimizer.init_args.lr"])
        assert lr == pytest.approx(trial.params["model.optimizer.init_args.lr"], rel=1e-6)
        assert yaml.safe_load(run.data.params["model.branches"].replace("'", "")) == \
            yaml.safe_load(trial.params["model.branches"])
        assert run.data.params["trainer.max_epochs"] == "2" and run.data.params["checkpoint.monitor"] == \
            "val/score_heldout"
        scores = _history(client, run.info.run_id)
        if trial.state == TrialState.PRUNED:
            assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
            assert len(scores) == 1  # the fit stopped at the end of the pruned epoch (of 2)
            assert trial.intermediate_values[0] == pytest.approx(scores[0], abs=1e-6)
        else:
            assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
            assert len(scores) == 2 and trial.value == pytest.approx(max(scores), abs=1e-6)  # its best epoch
            assert run.data.metrics["optuna/value"] == pytest.approx(trial.value, abs=1e-6)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]  # its best checkpoint
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # ... is in MLflow: the local files are gone

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["best_trial"] == best.number
    assert parent.data.metrics["trials_complete"] == 2 and parent.data.metrics["trials_pruned"] == 1
    files = {a.path for folder in (None, "plots") for a in client.list_artifacts(parent_id, folder)}
    assert {"best_config.yaml", "trials.csv", "plots/optimization_history.png", "plots/parallel_coordinate.png",
            "plots/param_importances.png"} <= files, files
    with tempfile.TemporaryDirectory() as tmp:
        best_yaml = Path(client.download_artifacts(parent_id, "best_config.yaml", tmp))
        table = Path(client.download_artifacts(parent_id, "trials.csv", tmp)).read_text().splitlines()
        text = best_yaml.read_text()
    assert len(table) == 4 and table[0].startswith("number,value")
    written = yaml.safe_load(text)
    assert written["model"]["optimizer"]["init_args"]["lr"] == best.params["model.optimizer.init_args.lr"]
    assert written["model"]["branches"] == yaml.safe_load(best.params["model.branches"])
    assert written["data"]["cache_dir"] == str(fit_cache) and written["trainer"]["max_epochs"] == 2
    assert (tmp_path / "runs" / "s3" / "best_config.yaml").read_text() == text
    # ... and it is a config `au-detect fit --config best_config.yaml` takes, as it is
    from experiments.lightning_cli import AUDetectCLI

    class Parsed(Exception):
        pass

    class ParseOnly(AUDetectCLI):
        def before_instantiate_classes(self) -> None:
            raise Parsed(self.config.fit)

    best_file = tmp_path / "best_config.yaml"
    best_file.write_text(text)
    with pytest.raises(Parsed) as parsed:
        ParseOnly(args=["fit", "--config", str(best_file)])
    fit = parsed.value.args[0]
    assert fit.model.optimizer.init_args.lr == best.params["model.optimizer.init_args.lr"]
    assert fit.model.branches == yaml.safe_load(best.params["model.branches"])
    assert fit.checkpoint.monitor == "val/score_heldout" and fit.checkpoint.mode == "max"


def test_sweep_refuses_a_search_space_the_fit_does_not_take(tmp_path, synthau):
    """A misspelt option is found before any trial runs, and a range needs both ends."""
    from experiments.sweep import SearchParam, sweep

    mlflow_yaml = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", EXPERIMENT)
    common = dict(fit_config=str(ROOT / "experiments" / "configs" / "demo.yaml"), storage=f"sqlite:///{tmp_path}/o.db",
                  mlflow=str(mlflow_yaml), out=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="does not take"):
        sweep({"model.learning_rate": SearchParam(low=0.1, high=0.2)}, **common)
    with pytest.raises(ValueError, match="low <= high"):
        sweep({"model.dropout": SearchParam(low=0.5)}, **common)
    with pytest.raises(ValueError, match="set by the sweep"):
        sweep({"model.dropout": SearchParam(low=0.0, high=0.5)}, fit_overrides={"run_name": "x"}, **common)
    assert not (tmp_path / "o.db").exists()  # refused before the study was made


def _trial_started(storage: str, name: str, number: int) -> bool:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return False
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    return bool(trials) and trials[0].state == TrialState.RUNNING and bool(trials[0].user_attrs.get("mlflow_run_id"))


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_study_and_parent_run(synthau, fit_cache, tmp_path):
    """``au-detect sweep`` SIGKILLed in its second trial's fit, then run again: the same study and
    parent run, the first trial kept, the killed one failed (its run KILLED) and run again with
    its values, and three trials complete in all."""
    nop = {"class_path": "optuna.pruners.NopPruner"}
    config, storage, tracking_uri = _write_config(tmp_path, synthau, fit_cache, "killed", 3, nop, epochs=1,
                                                  heartbeat_interval=1, grace_period=3)
    command = [AU_DETECT, "sweep", "--config", str(config)]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _trial_started(storage, "killed", 1):  # its fit has started: its MLflow run is there
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "trial 1 never started"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    study = optuna.load_study(study_name="killed", storage=storage)
    first, killed = study.get_trials()[:2]
    assert first.state == TrialState.COMPLETE and killed.state == TrialState.RUNNING
    parent_id = study.user_attrs[PARENT_ATTR]

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "joined" in rerun.stdout and "its process stopped" in rerun.stdout
    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert trials[0].value == first.value and trials[0].datetime_start == first.datetime_start  # kept as it was
    assert trials[1].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(trials) == 4
    assert optuna.load_study(study_name="killed", storage=storage).user_attrs[PARENT_ATTR] == parent_id

    client = MlflowClient(tracking_uri)
    (parent,), children = _runs(client, "killed")
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_complete"] == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2, 3]
    assert by_trial[1].info.run_id == killed.user_attrs["mlflow_run_id"]
    assert by_trial[1].info.status == "KILLED" and by_trial[1].data.tags["optuna.state"] == "FAIL"
    assert by_trial[retry.number].data.tags["optuna.retry_of"] == "1"
    assert all(by_trial[t.number].info.status == "FINISHED" for t in trials if t.state == TrialState.COMPLETE)


@pytest.mark.slow
def test_two_processes_share_one_study(synthau, fit_cache, tmp_path):
    """Two ``au-detect sweep`` processes started together on one study: both run trials, no more
    than ``n_trials`` finish in all, no trial runs twice, and there is one parent run."""
    nop = {"class_path": "optuna.pruners.NopPruner"}
    config, storage, tracking_uri = _write_config(tmp_path, synthau, fit_cache, "shared", 3, nop, epochs=1,
                                                  heartbeat_interval=2)
    command = [AU_DETECT, "sweep", "--config", str(config)]
    procs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert sorted("(created)" in out for out, _ in outputs) == [False, True]  # one made the study, one joined

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and not [t for t in trials if t.state in (TrialState.PRUNED, TrialState.RUNNING)]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)  # asked for, never run
    assert len({t.user_attrs["process"] for t in complete}) == 2  # both processes ran trials

    client = MlflowClient(tracking_uri)
    (parent,), children = _runs(client, "shared")
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    numbers = [int(r.data.tags["optuna.trial"]) for r in children]
    assert sorted(numbers) == sorted(t.number for t in complete)  # one run per trial, none twice
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in complete}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 3


def test_the_demo_sweep_config_parses_and_its_trials_are_fit_configs(monkeypatch):
    """``experiments/configs/sweep_demo.yaml`` parses with ``au-detect sweep``, and the fit config with its
    fixed changes and either end of every range is one ``au-detect fit`` takes."""
    from experiments.cli import function_parser
    from experiments.sweep import check_fit_config

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the project root
    parser = function_parser()
    init = parser.instantiate_classes(parser.parse_args(["sweep", "--config", "experiments/configs/sweep_demo.yaml"]))["sweep"]
    assert init.n_trials == 6 and init.storage == "sqlite:///sweeps.db" and init.metric == "val/score_heldout"
    assert isinstance(init.pruner, optuna.pruners.MedianPruner) and isinstance(init.sampler, optuna.samplers.TPESampler)
    assert init.fit_overrides["mlflow_artifacts.log_model"] is False and init.fit_overrides["model.face_weights"] is None
    assert init.search_space["model.optimizer.init_args.lr"].log
    assert init.search_space["data.balanced_sampling"].choices == [True, False]
    check_fit_config(init.fit_config, init.fit_overrides, init.search_space)  # raises when fit refuses it
