"""A new user's first hour, from a shell in a fresh project folder: the main job (small), the runs
it leaves in MLflow, the commands it prints, pasted as printed, then the registered champion; the
job again, which reuses the branches; a mistake is one line.

``au-detect`` runs as a subprocess with the folder as its working directory, as a user would run
it; only the data is shared with the other tests (the session's SynthAU, so nothing is rendered).
"""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from .training_helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
AU_DETECT = Path(sys.executable).with_name("au-detect")


def au_detect(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([str(AU_DETECT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def printed_commands(out: str) -> list[str]:
    """The lines the job printed under 'next, from the project folder'."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "next, from the project folder" in line)
    return [line.strip() for line in lines[start + 1:] if line.startswith("  ") and line.strip()]


def _client(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project}/mlflow.db")


def _demo_runs(client: MlflowClient) -> list:
    """The runs of the main job (``pipeline_demo.yaml``), every time it ran."""
    return client.search_runs([client.get_experiment_by_name("au-detect").experiment_id], "tags.pipeline = 'demo'")


def _pipeline_runs(project: Path) -> str:
    """The main job's runs in the project's store: a parent with the four stages as children, the
    fit loading both pretrained branches, tested, its test F1 on the parent; the fit's run id."""
    runs = _demo_runs(_client(project))
    stages = {r.data.tags["au_detect.stage"]: r for r in runs}
    assert sorted(stages) == ["data", "fit", "pipeline", "pretrain-expression", "pretrain-face"] and len(runs) == 5
    parent = stages["pipeline"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline demo"
    # named as a standalone fit; made by `fit`, though the test continued it
    fit = stages["fit"]
    assert fit.info.run_name == "demo-resnet18-bce-s0" and fit.data.tags["au_detect.command"] == "fit"
    for stage in ("data", "fit", "pretrain-expression", "pretrain-face"):
        assert stages[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert stages[stage].info.status == "FINISHED"
    for branch, path in (("face", "checkpoints/face_resnet18.pt"), ("emotion", "checkpoints/expression_resnet18.pt")):
        assert (project / path).is_file() and fit.data.params[f"model.{branch}_weights"] == path
        tag = fit.data.tags[f"weights.{branch}"]
        assert tag.startswith(path) and "0 missing" in tag, tag
    assert "test/f1" in fit.data.metrics and "val/score_heldout" in fit.data.metrics
    assert parent.data.metrics["fit/test/f1"] == pytest.approx(fit.data.metrics["test/f1"])
    assert {"minutes/data", "minutes/pretrain-face", "minutes/fit", "minutes/total"} <= set(parent.data.metrics)
    return fit.info.run_id


@pytest.mark.slow
def test_first_hour(synthau, tmp_path):
    project = tmp_path / "project"
    (project / "experiments").mkdir(parents=True)
    shutil.copytree(ROOT / "experiments" / "configs", project / "experiments" / "configs")
    shutil.copy(ROOT / "mlflow.yaml", project / "mlflow.yaml")
    # the main job's config, made small: the session's SynthAU, 64 px crops, one short epoch per stage
    tiny = {"data.alignment.crop_size": 64, "data.num_workers": 0, "data.batch_size": 16, "trainer.max_epochs": 1,
            "trainer.limit_train_batches": 2, "trainer.enable_progress_bar": False, "data.data_root": str(synthau)}
    demo = yaml.safe_load((project / "experiments/configs/pipeline_demo.yaml").read_text())
    demo["pretrain_overrides"] = {**demo.get("pretrain_overrides", {}), **tiny}
    demo["fit_overrides"] = {**demo.get("fit_overrides", {}), **tiny, "data.synth.num_images": SMALL.num_images,
                             "data.synth.seed": SMALL.seed, "model.scheduler.init_args.T_max": 1}
    (project / "small.yaml").write_text(yaml.safe_dump(demo))

    job = au_detect(["pipeline", "--config", "small.yaml"], project)
    assert job.returncode == 0, job.stderr[-3000:]
    commands = printed_commands(job.stdout)
    by_model = [c for c in commands if c.startswith("au-detect predict --model runs:/")]
    champion = [c for c in commands if c.startswith("au-detect predict --model models:/au-detector@champion")]
    ui = [c for c in commands if c.startswith("mlflow ui")]
    assert len(by_model) == 1 and len(champion) == 1 and ui == ["mlflow ui --backend-store-uri sqlite:///mlflow.db"]
    assert (project / "mlflow.db").is_file()
    fit_id = _pipeline_runs(project)

    # the model the printed commands name is the fit's, and the champion alias points at it
    assert by_model[0].split()[3] == f"runs:/{fit_id}/model"
    from experiments.registry import resolve

    assert resolve(_client(project), "models:/au-detector@champion").run_id == fit_id

    # each printed predict command runs as printed, from the project folder
    for command in (by_model[0], champion[0]):
        args = shlex.split(command)
        assert args[0] == "au-detect"
        done = au_detect(args[1:], project)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(project / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and rows[0]["status"] == "ok" and "AU12_prob" in rows[0]
        (project / "predictions.csv").unlink()

    # the model says what it is
    card = au_detect(["predict", "--model", "models:/au-detector@champion", "--describe"], project)
    assert card.returncode == 0, card.stderr[-3000:]
    assert "SynthAU only: not for real faces" in card.stdout and "test: test/f1" in card.stdout

    # the job again: the branch checkpoints are reused, only the AU fit trains (and is tested) again
    rerun = au_detect(["pipeline", "--config", "small.yaml"], project)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "face branch: reusing" in rerun.stdout and "emotion branch: reusing" in rerun.stdout
    again = _demo_runs(_client(project))
    assert sorted(r.data.tags["au_detect.stage"] for r in again) == sorted(
        ["data", "data", "fit", "fit", "pipeline", "pipeline", "pretrain-expression", "pretrain-face"])
    newest = max((r for r in again if r.data.tags["au_detect.stage"] == "pipeline"), key=lambda r: r.info.start_time)
    assert newest.data.tags["pipeline.face_weights"] == "checkpoints/face_resnet18.pt (reused)"

    # an ordinary mistake: one line, exit 2, nothing new in the folder
    before = {p for p in project.rglob("*")}
    wrong = au_detect(["fit", "--config", "experiments/configs/demo.yaml", "--trainer.max_epoch", "2"], project)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "did you mean --trainer.max_epochs?" in wrong.stderr.splitlines()[0]
    assert {p for p in project.rglob("*")} == before
