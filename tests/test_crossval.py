"""``au-detect crossval``: folds by subject, one fit and test per fold, the parent run's figures and
table, no test subject read in training, and a run that goes on after a kill."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from datamodules.io.folds import FoldError
from datamodules.io.manifest import ManifestError, read_manifest
from experiments import crossval as cv
from tests.training_helpers import write_mlflow_yaml

AUS = [1, 2, 4, 6, 12, 25]


def _subject_manifest(synthau: Path, out: Path, subjects: int = 6) -> Path:
    """SynthAU's three splits as one manifest, each identity a subject (``S<identity mod n>``)."""
    rows = []
    for split in ("train", "val", "test"):
        with open(synthau / f"{split}.tsv", newline="") as f:
            table = list(csv.reader(f, delimiter="\t"))
        header = table[0]
        rows += [[str(synthau / r[0]), *r[1:], f"S{int(r[header.index('identity')]) % subjects:02d}"] for r in table[1:]]
    path = out / "all.tsv"
    path.write_text("\t".join([*header, "subject"]) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def test_published_protocols_run_once_and_random_repeats_reshuffle():
    plan = cv.plan_folds("bp4d-3fold", [])
    assert [(r, f.number, len(f.test)) for r, f in plan] == [(0, 1, 13), (0, 2, 14), (0, 3, 14)]
    with pytest.raises(FoldError, match="use --protocol random --repeats"):
        cv.plan_folds("disfa-3fold", [], repeats=3)
    with pytest.raises(FoldError, match="not one of bp4d-3fold, disfa-3fold, affwild2-abaw, random"):
        cv.plan_folds("bp4d", [])
    subjects = [f"S{i}" for i in range(7)]
    plan = cv.plan_folds("random", subjects, k=3, repeats=2, seed=5)
    assert len(plan) == 6
    for r in (0, 1):
        tests = [set(f.test) for rr, f in plan if rr == r]
        assert set().union(*tests) == set(subjects) and sum(map(len, tests)) == 7
    assert [f.test for r, f in plan if r == 0] != [f.test for r, f in plan if r == 1]  # reshuffled


def test_split_manifest_keeps_every_column_and_names_a_missing_subject_column(tmp_path):
    src = tmp_path / "m.tsv"
    src.write_text("image\tsubject\tframe\tAU1\tAU1_intensity\na.jpg\tF001\t7\t1\t3\nb.jpg\tM002\t8\t0\t0\n"
                   "c.jpg\tF001\t9\t999\t999\n")
    out = cv.split_manifest(src, tmp_path / "f", {"train": {"F001"}, "test": {"M002"}})
    assert out["train"].read_text() == "image\tsubject\tframe\tAU1\tAU1_intensity\na.jpg\tF001\t7\t1\t3\nc.jpg\tF001\t9\t999\t999\n"
    assert out["test"].read_text().splitlines()[1:] == ["b.jpg\tM002\t8\t0\t0"]
    mtime = out["train"].stat().st_mtime_ns
    cv.split_manifest(src, tmp_path / "f", {"train": {"F001"}, "test": {"M002"}})
    assert out["train"].stat().st_mtime_ns == mtime  # unchanged: its crop cache stays valid
    with pytest.raises(FoldError, match="no row of subjects X9 for the val split"):
        cv.split_manifest(src, tmp_path / "g", {"val": {"X9"}})
    bare = tmp_path / "bare.tsv"
    bare.write_text("image\tAU1\na.jpg\t1\n")
    with pytest.raises(ManifestError, match=r"bare.tsv:1: no 'subject' column"):
        cv.split_manifest(bare, tmp_path / "h", {"train": {"F001"}})


def test_summary_and_table_match_a_hand_computation():
    done = {f"fold{i}": {"repeat": 1, "run_id": str(i), "metrics": {
        "test/f1": f1, "test/f1_micro": micro, "test/f1/AU1": a, "test/f1/AU2": b, "test/f1/AU5": c}}
        for i, (f1, micro, a, b, c) in enumerate([(0.5, 0.6, 0.4, 0.6, 0.5), (0.7, 0.8, 0.6, 0.8, 0.7),
                                                  (0.6, 0.7, 0.5, 0.7, 0.6)], 1)}
    s = cv.summarize(done, (1, 2, 5), "bp4d-3fold")
    assert s["test/f1"] == pytest.approx(0.6) and s["test/f1_std"] == pytest.approx(0.1)  # sample sd of .5 .7 .6
    assert s["test/f1_micro"] == pytest.approx(0.7) and s["test/f1_micro_std"] == pytest.approx(0.1)
    assert s["test/f1/AU1"] == pytest.approx(0.5) and s["test/f1_std/AU1"] == pytest.approx(0.1)
    # BP4D's papers average 12 AUs; of these, AU1 and AU2 (AU5 is not one): (.4 + .6) / 2 in fold 1
    assert s["test/f1_field"] == pytest.approx(0.6)
    rows = cv.fold_table("bp4d-3fold", (1, 2, 5), {k: d["metrics"] for k, d in done.items()})
    assert rows[0] == ["", "AU1", "AU2", "AU5", "mean F1", "mean F1 (field's AUs)", "micro-F1"]
    assert rows[1] == ["fold1", "40.0", "60.0", "50.0", "50.0", "50.0", "60.0"]
    assert rows[4] == ["mean", "50.0", "70.0", "60.0", "60.0", "60.0", "70.0"]
    assert rows[5] == ["std", "10.0", "10.0", "10.0", "10.0", "10.0", "10.0"]
    # a record's mean F1 is over the field's AUs: it stands in that column, not beside our mean of all
    assert [r[0] for r in rows[6:]] == ["ME-GraphAU", "MDHR", "FMAE-IAT"] and rows[6][4:] == ["", "65.5", ""]
    plain = cv.fold_table("bp4d-3fold", (1, 2), {k: d["metrics"] for k, d in done.items()})
    assert plain[0][-2:] == ["mean F1", "micro-F1"] and plain[-1][-2:] == ["67.1", ""]
    repeated = {**done, "r2": {"repeat": 2, "run_id": "4", "metrics": {"test/f1": 0.9}}}
    s = cv.summarize(repeated, (1, 2, 5), "random")
    assert s["repeats/test/f1_range"] == pytest.approx(0.3) and s["repeats/test/f1_std"] == pytest.approx(
        np.std([0.6, 0.9], ddof=1))


def _fit_config(tmp_path: Path, epochs: int) -> Path:
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "limit_train_batches": 2,
                          "enable_progress_bar": False, "log_every_n_steps": 1},
              "model": {"backbone": "resnet18", "branches": ["face", "emotion"], "face_weights": None,
                        "emotion_weights": None},
              "data": {"aus": AUS, "cache_dir": str(tmp_path / "cache"), "alignment": {"crop_size": 48},
                       "batch_size": 16, "num_workers": 0},
              "mlflow_artifacts": {"log_model": False, "log_onnx": False, "sample_grid": 4},
              "system_metrics": {"sampling_interval": 0.5}}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_crossval_end_to_end_resumes_after_a_kill_and_never_trains_on_a_test_subject(synthau, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = _subject_manifest(synthau, tmp_path)
    settings = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", "cv")
    fit_config = _fit_config(tmp_path, epochs=2)
    args = dict(manifest=str(manifest), fit_config=str(fit_config), protocol="random", k=2, seed=1,
                out=str(tmp_path / "out"), mlflow=str(settings), validation_fraction=0.34)

    # First run: fold 1 whole; fold 2 killed after its first epoch (its last.ckpt written).
    real = cv.fit_and_test
    calls = []

    def killed_in_fold_2(config):
        calls.append(config["run_name"])
        if len(calls) == 2:
            from experiments.lightning_cli import AUDetectCLI
            AUDetectCLI(args={"fit": {**config, "trainer": {**config["trainer"], "max_epochs": 1}}})
            raise KeyboardInterrupt
        return real(config)

    monkeypatch.setattr(cv, "fit_and_test", killed_in_fold_2)
    with pytest.raises(KeyboardInterrupt):
        cv.crossval(**args)
    state = json.loads((tmp_path / "out" / "all-random" / cv.STATE_NAME).read_text())
    assert list(state["folds"]) == ["fold1"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(state["parent"]).info.status == "KILLED"
    cut = tmp_path / "out" / "all-random" / "fold2" / "checkpoints" / "last.ckpt"
    assert cut.is_file()
    from callbacks.tracking.mlflow_run import run_id_from_checkpoint
    cut_run = run_id_from_checkpoint(cut)

    # Second run: fold 1 is not fitted again; fold 2 goes on in the same MLflow run.
    calls.clear()
    monkeypatch.setattr(cv, "fit_and_test", lambda config: (calls.append(config), real(config))[1])
    result = cv.crossval(**args)
    assert [c["run_name"] for c in calls] == ["all-random fold2"] and calls[0]["ckpt_path"] == str(cut)
    assert result["parent"] == state["parent"] and result["folds"]["fold2"]["run_id"] == cut_run
    parent = client.get_run(state["parent"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{state['parent']}'")
    assert sorted(r.info.run_name for r in children) == ["all-random fold1", "all-random fold2"]
    assert all(r.info.status == "FINISHED" for r in children)

    # The parent's figures are the folds' own: mean and sample sd of their test F1, per AU too.
    folds = {r.data.tags["crossval.fold"]: r.data.metrics for r in children}
    f1 = [folds[n]["test/f1"] for n in ("1", "2")]
    assert parent.data.metrics["test/f1"] == pytest.approx(np.mean(f1), abs=1e-6)
    assert parent.data.metrics["test/f1_std"] == pytest.approx(np.std(f1, ddof=1), abs=1e-6)
    assert parent.data.metrics["test/f1_micro"] == pytest.approx(
        np.mean([folds[n]["test/f1_micro"] for n in ("1", "2")]), abs=1e-6)
    history = client.get_metric_history(state["parent"], "fold/test/f1")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, round(f1[0], 6)), (2, round(f1[1], 6))]
    artifacts = {a.path for a in client.list_artifacts(state["parent"])}
    assert {"crossval_table.md", "crossval_table.csv", "crossval_table.png", "folds.json"} <= artifacts
    table = (tmp_path / "out" / "all-random" / "parent" / "crossval_table.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["fold1", "fold2", "mean", "std"]

    # Leakage, from the files each fold's fit read: the manifests its run logged, the crops it cached.
    subject_of = dict(zip(read_manifest(manifest, aus=AUS).images, read_manifest(manifest, aus=AUS).extra["subject"]))
    tested = set()
    for run in children:
        params = run.data.params

        def subjects(split, run=run):
            found = set(read_manifest(params[f"data.{split}_manifest"], aus=AUS).extra["subject"])
            return found

        test = subjects("test")
        assert test and not test & (subjects("train") | subjects("val"))
        key = f"fold{run.data.tags['crossval.fold']}"
        for split in ("train", "val"):
            report = json.loads((Path(result["folds"][key]["caches"][split]) / "report.json").read_text())
            assert report["manifest"] == params[f"data.{split}_manifest"]
            assert not {subject_of[s["image"]] for s in report["samples"]} & test
        assert not tested & test  # each subject tested once
        tested |= test
    assert tested == set(subject_of.values())
    assert all(not v for fold in result["folds"].values() for v in cv.leaked_subjects(fold, subject_of).values())
    assert math.isfinite(result["summary"]["test/f1"])


def test_a_planted_leak_is_found(tmp_path):
    """The leak check reads the fold's files: a training manifest holding a test subject is caught."""
    (tmp_path / "train.tsv").write_text("image\tsubject\tAU1\na.jpg\tF001\t1\nb.jpg\tM002\t0\n")
    (tmp_path / "val.tsv").write_text("image\tsubject\tAU1\nc.jpg\tF003\t1\n")
    (tmp_path / "test.tsv").write_text("image\tsubject\tAU1\nd.jpg\tM002\t1\n")
    record = {"manifests": {s: str(tmp_path / f"{s}.tsv") for s in ("train", "val", "test")}}
    assert cv.leaked_subjects(record, {}) == {"train": ["M002"], "val": []}


def test_other_settings_in_the_same_folder_are_refused(synthau, tmp_path):
    manifest = _subject_manifest(synthau, tmp_path)
    state = tmp_path / "out" / "x" / cv.STATE_NAME
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"settings": {"protocol": "disfa-3fold"}, "parent": "p", "folds": {}}))
    with pytest.raises(FoldError, match="other settings"):
        cv.crossval(str(manifest), str(_fit_config(tmp_path, 1)), protocol="random", name="x", out=str(tmp_path / "out"),
                    mlflow=str(write_mlflow_yaml(tmp_path / "m.yaml", f"sqlite:///{tmp_path}/m.db")))
    with pytest.raises(ValueError, match="data.train_manifest are set by crossval"):
        cv.crossval(str(manifest), str(_fit_config(tmp_path, 1)), fit_overrides={"data.train_manifest": "x"})


def test_the_demo_config_parses_as_the_command_and_names_a_fit_config_that_parses():
    from experiments.cli import function_parser
    from tests.training_helpers import ROOT

    config = function_parser().parse_args(["crossval", "--config", str(ROOT / "experiments/configs/crossval_demo.yaml")])
    assert config.crossval.protocol == "bp4d-3fold" and config.crossval.manifest == "data/bp4d/bp4d.tsv"
    fit = yaml.safe_load((ROOT / config.crossval.fit_config).read_text())
    assert fit["data"]["aus"] == list(cv.PROTOCOL_AUS["bp4d-3fold"])



@pytest.mark.slow
def test_bp4d_layout_import_and_published_folds_end_to_end(tmp_path, monkeypatch, capsys):
    """What the README's SynthAU chain runs, small: BP4D's files rendered, imported, and the
    published 3-fold protocol fitted and tested fold by fold with the demo's fit config."""
    from experiments.cli import main
    from tests.training_helpers import ROOT

    monkeypatch.chdir(tmp_path)
    main(["synth", "--layout", "bp4d", "--root", str(tmp_path / "bp4d_synthau"), "--sequences", "1",
          "--frames", "4", "--seed", "2"])
    main(["import", "bp4d", "--root", str(tmp_path / "bp4d_synthau"), "--out", str(tmp_path / "bp4d")])
    report = json.loads((tmp_path / "bp4d" / "import_report.json").read_text())
    assert len(report["subjects"]) == 41 and report["frames"] == 41 * 4
    settings = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", "bp4d")
    overrides = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "data.alignment.crop_size": 48,
                 "data.num_workers": 0, "data.batch_size": 16, "data.cache_dir": str(tmp_path / "cache"),
                 "trainer.accelerator": "cpu", "model.scheduler.init_args.T_max": 1,
                 "system_metrics.sampling_interval": 0.5}
    result = cv.crossval(str(tmp_path / "bp4d" / "bp4d.tsv"), str(ROOT / "experiments/configs/crossval_fit_demo.yaml"),
                         protocol="bp4d-3fold", out=str(tmp_path / "runs"), fit_overrides=overrides,
                         mlflow=str(settings))
    folds = result["folds"]
    assert list(folds) == ["fold1", "fold2", "fold3"]
    assert [len(folds[k]["subjects"]["test"]) for k in folds] == [13, 14, 14]
    for fold in folds.values():  # each fold's test manifest holds exactly its part's subjects
        tested = set(read_manifest(fold["manifests"]["test"], aus=cv.PROTOCOL_AUS["bp4d-3fold"]).extra["subject"])
        assert tested == set(fold["subjects"]["test"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result["parent"])
    assert parent.data.params["protocol"] == "bp4d-3fold" and "test/f1_micro" in parent.data.metrics
    table = parent.data.tags["mlflow.note.content"]
    assert "| ME-GraphAU |" in table and "| fold3 |" in table and "| mean |" in table
    assert "mean F1" in capsys.readouterr().out


@pytest.mark.slow
def test_each_fold_runs_with_ddp_on_two_ranks(synthau, tmp_path):
    """A fold is a fit: with the fit config's trainer on 2 DDP ranks, Lightning starts the second
    rank with crossval's own command line; only the first writes, and each fold is one run."""
    import subprocess
    import sys

    manifest = _subject_manifest(synthau, tmp_path)
    settings = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", "ddp")
    ddp = json.dumps({"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.accelerator": "cpu"})
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "crossval", "--manifest", str(manifest),
                           "--fit_config", str(_fit_config(tmp_path, 1)), "--protocol", "random", "--k", "2",
                           "--name", "ddp", "--out", str(tmp_path / "out"), "--mlflow", str(settings),
                           "--fit_overrides", ddp],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[crossval] fold1: train") == 1  # the second rank says nothing
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    state = json.loads((tmp_path / "out" / "ddp" / cv.STATE_NAME).read_text())
    assert client.get_run(state["parent"]).info.status == "FINISHED"
    children = client.search_runs([client.get_experiment_by_name("ddp").experiment_id],
                                  f"tags.mlflow.parentRunId = '{state['parent']}'")
    assert sorted(r.info.run_name for r in children) == ["ddp fold1", "ddp fold2"]
    assert all(r.data.params["trainer.devices"] == "2" and r.data.params["trainer.strategy"] == "ddp"
               and r.info.status == "FINISHED" and "test/f1" in r.data.metrics for r in children)


def test_the_abaw_split_is_one_fold_from_the_split_column():
    subjects = ["v1", "v1", "v2", "v3_left", "v3_right"]
    splits = ["train", "train", "validation", "train", "validation"]
    ((r, fold),) = cv.plan_folds("affwild2-abaw", subjects, splits=splits)
    assert (fold.train, fold.test) == (("v1", "v3_left"), ("v2", "v3_right"))
    with pytest.raises(FoldError, match="no 'split' column"):
        cv.plan_folds("affwild2-abaw", subjects)
    with pytest.raises(FoldError, match="subjects in both splits: v1"):
        cv.plan_folds("affwild2-abaw", ["v1", "v1"], splits=["train", "validation"])
    with pytest.raises(FoldError, match=r"split values \['test'\]"):
        cv.plan_folds("affwild2-abaw", ["v1"], splits=["test"])
