"""``au-detect pipeline``: data, both branches pretrained, the AU fit loading them; one MLflow parent."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from experiments.cli import main

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
                          "model.scheduler.init_args.T_max": 1, "mlflow_artifacts.log_model": False,
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
    stages = {r.data.tags["pipeline.stage"]: r for r in runs}
    assert sorted(stages) == ["fit", "pipeline", "pretrain-expression", "pretrain-face"] and len(runs) == 4
    parent = stages["pipeline"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline p"
    for stage in ("fit", "pretrain-expression", "pretrain-face"):
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
    assert "see the runs:" in printed

    # A rerun reuses the branch checkpoints: only the AU fit is trained again.
    main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert "face branch: reusing" in capsys.readouterr().out
    again = client.search_runs([exp], "tags.pipeline = 'p'")
    assert sorted(r.data.tags["pipeline.stage"] for r in again) == sorted(
        ["fit", "fit", "pipeline", "pipeline", "pretrain-expression", "pretrain-face"])
    newest = max((r for r in again if r.data.tags["pipeline.stage"] == "pipeline"), key=lambda r: r.info.start_time)
    assert newest.data.tags["pipeline.face_weights"] == f"{face} (reused)"
