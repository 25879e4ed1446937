"""A fit killed with SIGKILL anywhere and resumed ends as one FINISHED MLflow run whose artifacts
(thresholds.json, au_report, best.json, the logged model) all describe the best checkpoint's epoch.

The faults are real: :class:`Fault`, given to ``au-detect fit`` on its command line, kills its own
process at the chosen point. It also logs the monitored score, ``fault/score``, from a schedule
given per command: a resumed epoch may score differently from its killed first attempt (nothing
makes a re-run bit-identical), and the schedule makes that happen when it matters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
from jsonargparse import Namespace
from mlflow import MlflowClient

from experiments.cli import main
from experiments.lightning_cli import TrackedCLI
from lightning_modules.checkpoints import load_checkpoint

from .training_helpers import small_fit_args, write_mlflow_yaml

ROOT = Path(__file__).resolve().parents[1]
AU_DETECT = str(Path(sys.executable).with_name("au-detect"))
EXPERIMENT = "crash"


class Fault(L.Callback):
    """Logs ``fault/score`` = ``scores[epoch]`` after each validation and, with ``at``, sends SIGKILL
    to its own process in epoch ``epoch`` at one of these points:

    - ``train_batch``: before the epoch's second training batch;
    - ``validation``: after the first validation batch;
    - ``fit_thresholds``: inside the soft-threshold fit (thresholds computed, not yet in the model);
    - ``save_checkpoint``: at the epoch's first checkpoint save, before the file is written (after
      MLflowArtifacts wrote its files: ModelCheckpoint runs last);
    - ``log_model``: at fit end, once the model's files are uploaded, before MLflow marks it READY.
    """

    def __init__(self, scores: list[float], at: str | None = None, epoch: int = 1):
        self.scores, self.at, self.epoch = scores, at, epoch
        self.trainer: L.Trainer | None = None

    def _kill_if(self, point: str) -> None:
        trainer = self.trainer
        in_epoch = point == "log_model" or (trainer.current_epoch == self.epoch and not trainer.sanity_checking)
        if self.at == point and in_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer
        if self.at == "fit_thresholds":
            import callbacks.soft_threshold as soft

            fit = soft.fit_thresholds

            def fit_then_kill(*args, **kwargs):
                thresholds = fit(*args, **kwargs)
                self._kill_if("fit_thresholds")
                return thresholds

            soft.fit_thresholds = fit_then_kill
        elif self.at == "log_model":
            upload = MlflowClient.log_model_artifacts

            def upload_then_kill(client, *args, **kwargs):
                upload(client, *args, **kwargs)
                self._kill_if("log_model")

            MlflowClient.log_model_artifacts = upload_then_kill

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            self._kill_if("train_batch")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._kill_if("validation")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("fault/score", self.scores[trainer.current_epoch])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._kill_if("save_checkpoint")


def _fit(args: list[str], scores: list[float], at: str | None = None, ckpt: str | None = None, epoch: int = 1
         ) -> subprocess.CompletedProcess:
    fault = {"class_path": f"{__name__}.Fault", "init_args": {"scores": scores, "at": at, "epoch": epoch}}
    command = [AU_DETECT, "fit", *args, f"--trainer.callbacks+={json.dumps(fault)}"]
    command += ["--ckpt_path", ckpt] if ckpt else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    expected = -signal.SIGKILL if at else 0  # killed: the fault point was reached
    assert done.returncode == expected, f"{at}: rc {done.returncode}\n{done.stderr[-3000:]}"
    return done


def _text(client: MlflowClient, run_id: str, name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, tmp)).read_text()


def _epoch_of_artifacts(client: MlflowClient, run_id: str) -> int:
    """The epoch thresholds.json and au_report.md describe (they must agree)."""
    epoch = json.loads(_text(client, run_id, "thresholds.json"))["epoch"]
    assert _text(client, run_id, "au_report.md").startswith(f"Validation, epoch {epoch}\n")
    return epoch


def _validations(client: MlflowClient, run_id: str) -> list[int]:
    """The steps of every validation logged (a killed epoch's validation and its re-run share one)."""
    return sorted(m.step for m in client.get_metric_history(run_id, "val/f1"))


def _models(client: MlflowClient, run) -> list:
    """The run's logged models that are not deleted."""
    return [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run.info.run_id]


def _assert_consistent(client: MlflowClient, uri: str, run_id: str, last: Path, epoch: int) -> None:
    """The run is done, and every artifact describes ``epoch``, the best checkpoint's."""
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    state = load_checkpoint(last)
    best_path = next(v["best_model_path"] for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best = load_checkpoint(best_path)
    assert best["epoch"] == epoch and best["mlflow_run_id"] == run_id
    expected = best["state_dict"]["net.thresholds"].numpy()

    assert _epoch_of_artifacts(client, run_id) == epoch
    stored = json.loads(_text(client, run_id, "thresholds.json"))
    np.testing.assert_array_equal(np.float32(list(stored["thresholds"].values())), expected)
    report = [line.split(",") for line in _text(client, run_id, "au_report.csv").splitlines()[1:-1]]
    np.testing.assert_allclose([float(r[3]) for r in report], expected, atol=5e-5)
    summary = json.loads(_text(client, run_id, "best.json"))
    assert summary["best_epoch"] == epoch and summary["best_checkpoint"] == best_path
    assert summary["model"] == f"runs:/{run_id}/model"
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [f"checkpoints/{Path(best_path).name}"]

    assert [str(m.status) for m in _models(client, run)] == ["READY"]  # the half-logged one is gone
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        predictor = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", dst_path=tmp).unwrap_python_model().predictor
    np.testing.assert_array_equal(predictor.thresholds, expected)


FIRST, RERUN = [0.5, 0.9], [0.5, 0.1]  # epoch 1 first improves on epoch 0; re-run, it does not


class Resumable:
    """One run's folder (store, checkpoints, spool, cache) and the fits that resume it."""

    def __init__(self, folder: Path, synthau: Path, cache: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{folder / 'mlflow.db'}"
        self.cfg = write_mlflow_yaml(folder / "mlflow.yaml", self.uri, EXPERIMENT)
        self.args = small_fit_args(synthau, cache, self.cfg, folder / "runs", epochs=2, train_batches=2)
        self.args += ["--checkpoint.monitor", "fault/score",  # the artifacts follow the checkpoint's monitor (linked)
                      "--mlflow_artifacts.sample_grid", "0", "--trainer.num_sanity_val_steps", "0",
                      "--model.backbone", "resnet10t", "--model.branches", "[face]"]  # small checkpoints, quick saves
        self.client = MlflowClient(self.uri)
        self.run_id: str | None = None
        self.last: Path | None = None

    def fit(self, scores: list[float], at: str | None, ckpt: str) -> subprocess.CompletedProcess:
        """A fit killed ``at`` a point (None: to its end), resumed with ``--ckpt_path last`` or the
        path of last.ckpt (which file a resume takes is all that differs; what it does is the same).
        What a killed fit had not sent to its run yet is then sent (``au-detect sync-tracking``) but
        for a kill while logging the model, whose half-logged state is checked as it is."""
        done = _fit(self.args, scores, at, str(self.last) if ckpt == "path" else "last")
        if at not in (None, "log_model"):
            main(["sync-tracking", "--spool", str(self.folder / "runs" / "mlflow_spool")])
        if ckpt == "last":  # it says which file it took
            said = (f"--ckpt_path last: resuming MLflow run {self.run_id} from {self.last}" if self.run_id else
                    f"--ckpt_path last: no interrupted run of experiment '{EXPERIMENT}'")
            assert said in done.stdout, done.stdout[-2000:]
        return done

    def epoch_of_artifacts(self) -> int:
        return _epoch_of_artifacts(self.client, self.run_id)

    def finish(self, scores: list[float], ckpt: str, epoch: int) -> subprocess.CompletedProcess:
        """Resumed to its end: one FINISHED run whose every artifact describes ``epoch``."""
        done = self.fit(scores, None, ckpt)
        _assert_consistent(self.client, self.uri, self.run_id, self.last, epoch)
        return done


@pytest.fixture(scope="module")
def killed_in_validation(synthau, fit_cache, tmp_path_factory):
    """A new run killed in epoch 1's validation (epoch 0 done), its folder kept as it was then: each
    test below starts from a copy of it at the same place (the store and checkpoints name their paths)."""
    base = tmp_path_factory.mktemp("crash")
    run = Resumable(base / "run", synthau, fit_cache)
    run.fit(FIRST, "validation", "last")  # nothing to resume yet: a new run
    (found,) = run.client.search_runs([run.client.get_experiment_by_name(EXPERIMENT).experiment_id])
    run.run_id = found.info.run_id
    (run.last,) = (run.folder / "runs").glob(f"*/{run.run_id}/checkpoints/last.ckpt")
    assert load_checkpoint(run.last)["epoch"] == 0 and run.epoch_of_artifacts() == 0
    shutil.copytree(run.folder, base / "as-killed")
    return run, base / "as-killed"


def _restore(saved: Path, folder: Path) -> None:
    """``folder`` made what ``saved`` holds again, its files rewritten in place: this process's
    MLflow keeps its SQLite store open, and a store replaced by a new file would go unseen."""
    keep = {p.relative_to(saved) for p in saved.rglob("*")}
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        if path.relative_to(folder) in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            path.rmdir()  # emptied above
        else:
            path.unlink()
    for relative in sorted(keep):
        source, target = saved / relative, folder / relative
        if source.is_dir():
            target.mkdir(exist_ok=True)
        else:
            shutil.copyfile(source, target)  # into the same inode when it is there


@pytest.fixture
def resumable(killed_in_validation) -> Resumable:
    run, saved = killed_in_validation
    _restore(saved, run.folder)
    return run


@pytest.mark.slow
def test_killed_in_validation_resumes_to_its_better_epoch(resumable):
    resumable.finish(FIRST, "path", epoch=1)


@pytest.mark.slow
def test_killed_fitting_thresholds_resumes_to_its_better_epoch(resumable):
    resumable.fit(FIRST, "fit_thresholds", "path")
    assert resumable.epoch_of_artifacts() == 0  # thresholds computed, never in the model nor the files
    resumable.finish(FIRST, "last", epoch=1)


@pytest.mark.slow
def test_killed_saving_an_improvement_is_repaired_from_the_best_checkpoint(resumable):
    """Epoch 1 first scores 0.9 (better than epoch 0's 0.5) and is killed at its checkpoint save:
    the run's files then describe epoch 1, whose checkpoint was never written. Re-run, epoch 1
    scores 0.1: the best stays epoch 0, and everything must say so in the end."""
    resumable.fit(FIRST, "save_checkpoint", "last")
    assert resumable.epoch_of_artifacts() == 1  # ahead of every checkpoint
    state = load_checkpoint(resumable.last)
    assert state["epoch"] == 0
    (kept,) = [v for k, v in state["callbacks"].items() if k.startswith("MLflowArtifacts")]
    assert kept["best_epoch"] == 0 and kept["best"] == 0.5  # the callback's best lives in the checkpoint
    resumable.finish(RERUN, "path", epoch=0)


@pytest.mark.slow
def test_killed_mid_training_epoch_resumes_to_the_best_epoch(resumable):
    resumable.fit(RERUN, "train_batch", "path")
    assert resumable.epoch_of_artifacts() == 0
    resumable.finish(RERUN, "last", epoch=0)


@pytest.mark.slow
def test_killed_logging_the_model_repeats_only_the_fits_end(resumable, capsys):
    run = resumable
    run.fit(RERUN, "log_model", "last")
    validations = _validations(run.client, run.run_id)
    assert len(set(validations)) == 2  # epochs 0 and 1
    assert run.client.get_run(run.run_id).info.status == "RUNNING"
    (found,) = run.client.search_runs([run.client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [str(m.status) for m in _models(run.client, found)] == ["PENDING"]  # uploaded, never marked READY

    done = run.finish(RERUN, "path", epoch=0)  # the fit had finished: only its end is repeated
    assert _validations(run.client, run.run_id) == validations
    assert "(resumed)" in done.stdout
    assert len(run.client.search_runs([found.info.experiment_id])) == 1

    # A finished run is not taken up again: --ckpt_path last now starts a new one.
    capsys.readouterr()
    config = Namespace(mlflow=str(run.cfg), trainer=Namespace(default_root_dir=str(run.folder / "runs")),
                       checkpoint=Namespace(dirpath=None))
    assert TrackedCLI.last_interrupted_checkpoint(config) is None
    assert f"no interrupted run of experiment '{EXPERIMENT}'" in capsys.readouterr().out
