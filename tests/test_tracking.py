"""mlflow.yaml: read in one place, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.lightning_cli import flatten_config
from experiments.tracking import DEFAULT_TRACKING_URI, TrackingSettings

ROOT = Path(__file__).resolve().parents[1]


def test_project_settings_use_a_local_sqlite_store():
    settings = TrackingSettings.read(ROOT / "mlflow.yaml")
    assert settings.tracking_uri == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"  # `mlflow ui` here shows it
    assert settings.experiment_name == "au-detect" and settings.tags["project"] == "au-detect"


def test_logger_tracks_where_the_settings_say(tmp_path, monkeypatch):
    """The run lands in the file's store and experiment, named and tagged as asked, whatever the
    working folder holds (no ./mlruns)."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text(f"tracking_uri: sqlite:///{tmp_path}/x.db\nexperiment_name: e\n"
                    f"artifact_location: {tmp_path / 'artifacts'}\ntags: {{team: faces}}\n")
    logger = TrackingSettings.read(path).logger(run_name="r", run_id=None, tags={"row": "1"})
    logger.log_metrics({"m": 1.0})
    run = MlflowClient(f"sqlite:///{tmp_path}/x.db").get_run(logger.run_id)
    assert run.info.run_name == "r" and run.data.metrics == {"m": 1.0}
    assert run.data.tags["team"] == "faces" and run.data.tags["row"] == "1"
    assert not (tmp_path / "mlruns").exists()
    # the chained commands find the same experiment, or create it where the settings say
    settings, client = TrackingSettings.read(path), MlflowClient(f"sqlite:///{tmp_path}/x.db")
    assert settings.experiment_id(client) == run.info.experiment_id
    settings.experiment_name = "new"
    created = client.get_experiment(settings.experiment_id(client))
    assert created.name == "new" and created.artifact_location.endswith("artifacts")
    assert settings.experiment_id(client) == created.experiment_id
    assert settings.ui_command() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/x.db"
    assert TrackingSettings().ui_command() == "mlflow ui"


def test_bad_settings_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        TrackingSettings.read(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracking_url: sqlite:///x.db\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown keys \['tracking_url'\]"):
        TrackingSettings.read(bad)


def test_config_flattens_to_params():
    params = flatten_config({"model": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002}}},
                             "ckpt_path": "x.ckpt"}, skip=("ckpt_path",))
    assert params == {"model.optimizer.class_path": "torch.optim.AdamW", "model.optimizer.init_args.lr": "0.002"}
