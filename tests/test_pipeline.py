"""``au-detect pipeline``: data, both branches pretrained, the AU fit loading them; one MLflow parent."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from experiments.cli import main
from experiments.registry import resolve

from .conftest import SMALL
from .training_helpers import write_mlflow_yaml


@pytest.mark.slow
def test_pipeline_chains_the_stages_under_one_parent_and_reuses_branches(synthau, tmp_path, capsys):
    write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", "pipeline-test")
    tiny = {"data.alignment.crop_size": 64, "data.cache_dir": str(tmp_path / "cache"), "data.num_workers": 0,
            "data.batch_size": 16, "trainer.max_epochs": 1, "trainer.limit_train_batches": 2,
            "trainer.enable_progress_bar": False, "data.data_root": str(synthau)}
    face, emotion = tmp_path / "branches" / "face.pt", tmp_path / "branches" / "emotion.pt"
    config = {
        "name": "p", "fit_config": "experiments/configs/demo.yaml",
        "fit_overrides": {**tiny, "data.synth.num_images": SMALL.num_images, "data.synth.seed": SMALL.seed,
                          "model.scheduler.init_args.T_max": 1, "mlflow_artifacts.registered_model_name": "au-detector",
                          "model.face_weights": str(face), "model.emotion_weights": str(emotion),
                          "trainer.default_root_dir": str(tmp_path / "runs")},
        "pretrain_overrides": tiny,
        "mlflow": str(tmp_path / "mlflow.yaml"),
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    printed = capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("pipeline-test").experiment_id
    runs = client.search_runs([exp], "tags.pipeline = 'p'")
    stages = {r.data.tags["au_detect.stage"]: r for r in runs}
    assert sorted(stages) == ["data", "fit", "pipeline", "pretrain-expression", "pretrain-face"] and len(runs) == 5
    parent = stages["pipeline"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline p"
    # named as a standalone fit; made by `fit`, though the test continued it
    assert stages["fit"].info.run_name == "demo-resnet18-bce-s0"
    assert stages["fit"].data.tags["au_detect.command"] == "fit"
    for stage in ("data", "fit", "pretrain-expression", "pretrain-face"):
        assert stages[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert stages[stage].info.status == "FINISHED"
    # The AU fit loaded both branches from what the pretraining runs wrote, and was tested.
    fit = stages["fit"]
    assert fit.data.params["model.face_weights"] == str(face) and face.is_file() and emotion.is_file()
    for branch in ("face", "emotion"):
        tag = fit.data.tags[f"weights.{branch}"]
        assert tag.startswith(str(face if branch == "face" else emotion)) and "0 missing" in tag, tag
    assert "test/f1" in fit.data.metrics and "val/score_heldout" in fit.data.metrics
    assert parent.data.metrics["fit/test/f1"] == pytest.approx(fit.data.metrics["test/f1"])
    assert {"minutes/data", "minutes/pretrain-face", "minutes/fit", "minutes/total"} <= set(parent.data.metrics)
    # it ends with commands that run as printed: a real run's model on a photo that exists
    fit_id = fit.info.run_id
    predict = next(line.strip() for line in printed.splitlines() if line.strip().startswith("au-detect predict"))
    words = shlex.split(predict)
    assert words[:4] == ["au-detect", "predict", "--model", f"runs:/{fit_id}/model"] and "--out" in words
    assert Path(words[words.index("--input") + 1]).is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in printed
    assert "models:/au-detector@champion" in printed
    # and the registry alias the printed command uses points at the fit's model
    assert resolve(client, "models:/au-detector@champion").run_id == fit_id

    # A rerun reuses the branch checkpoints: only the AU fit is trained again.
    main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert "face branch: reusing" in capsys.readouterr().out
    again = client.search_runs([exp], "tags.pipeline = 'p'")
    assert sorted(r.data.tags["au_detect.stage"] for r in again) == sorted(
        ["data", "data", "fit", "fit", "pipeline", "pipeline", "pretrain-expression", "pretrain-face"])
    newest = max((r for r in again if r.data.tags["au_detect.stage"] == "pipeline"), key=lambda r: r.info.start_time)
    assert newest.data.tags["pipeline.face_weights"] == f"{face} (reused)"
