"""mlflow.yaml: read in one place, with errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.lightning_cli import KEY_PARAMS, flatten_config, run_params
from experiments.tracking import (DEFAULT_TRACKING_URI, EXPERIMENT_KIND_TAG, RUNS_VIEW_KEY, RUNS_VIEW_TAG, TrackingSettings,
                                  next_commands)

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
    # MLflow's UI shows it as a machine-learning experiment (runs, metrics), not a GenAI one
    experiment = MlflowClient(f"sqlite:///{tmp_path}/x.db").get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # the chained commands find the same experiment, or create it where the settings say
    settings, client = TrackingSettings.read(path), MlflowClient(f"sqlite:///{tmp_path}/x.db")
    assert settings.experiment_id(client) == run.info.experiment_id
    settings.experiment_name = "new"
    created = client.get_experiment(settings.experiment_id(client))
    assert created.name == "new" and created.artifact_location.endswith("artifacts")
    assert created.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert settings.experiment_id(client) == created.experiment_id
    # the runs list's view, with the compared figures as columns, opened by the experiment's address
    view = json.loads(created.tags[RUNS_VIEW_TAG])
    assert {"metrics.`test/f1`", "metrics.`val/f1_heldout`"} <= set(view["selectedColumns"])
    assert settings.ui_url(created.experiment_id).endswith(f"/runs?workflowType=machine_learning"
                                                           f"&viewStateShareKey={RUNS_VIEW_KEY}")
    # an experiment made before (or elsewhere) gets the kind, one whose kind was chosen keeps it
    old, chosen = client.create_experiment("old"), client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "x"})
    for name in ("old", "chosen"):
        settings.experiment_name = name
        settings.experiment_id(client)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "x"
    assert settings.ui_command() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/x.db"
    assert TrackingSettings().ui_command() == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    # what a fit ends with: commands that run as printed from the project folder
    photo = tmp_path / "face.jpg"
    photo.write_bytes(b"")
    lines = next_commands(settings, path, logger.run_id, photo, registered="au-detector")
    assert lines[0] == (f"au-detect predict --model runs:/{logger.run_id}/model --input face.jpg "
                        f"--out predictions.csv --mlflow m.yaml")
    assert lines[1].startswith(f"au-detect promote --model runs:/{logger.run_id}/model --alias champion")
    assert "--model models:/au-detector@champion --input face.jpg" in lines[2]
    assert lines[3] == settings.ui_command()
    assert lines[4].endswith(f"/#/experiments/{run.info.experiment_id}/runs/{logger.run_id}"
                             f"?workflowType=machine_learning")


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


def test_params_are_what_differs_from_the_defaults_and_what_runs_are_filtered_on():
    defaults = {"model": {"backbone": "resnet50", "loss": "selective", "dropout": 0.5}, "trainer": {"logger": None},
                "data": {"num_workers": 2}, "mlflow": "mlflow.yaml"}
    config = {"model": {"backbone": "resnet18", "loss": "selective", "dropout": 0.5, "au_priors": [0.1, 0.2]},
              "trainer": {"logger": None}, "data": {"num_workers": 2}, "mlflow": "other.yaml"}
    params = run_params(config, defaults)
    # changed and linked values, and the filtered-on loss though it is the default; nothing else
    assert params == {"model.backbone": "resnet18", "model.loss": "selective", "model.au_priors": "[0.1, 0.2]"}
    assert "model.loss" in KEY_PARAMS and "trainer.max_epochs" in KEY_PARAMS
    assert run_params(config, None) == flatten_config(config, skip=("mlflow",))  # no defaults: every value


def test_default_run_names_are_numbered_when_taken(tmp_path):
    from mlflow import MlflowClient

    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="names")
    client = MlflowClient(settings.tracking_uri)
    assert settings.unique_run_name("demo-resnet18-bce-s0") == "demo-resnet18-bce-s0"  # no experiment yet
    experiment = settings.experiment_id(client)
    for name in ("demo-resnet18-bce-s0", "demo-resnet18-bce-s0-2", "demo-resnet18-bce-s01", "it's"):
        client.create_run(experiment, run_name=name)
    assert settings.unique_run_name("demo-resnet18-bce-s0") == "demo-resnet18-bce-s0-3"
    assert settings.unique_run_name("demo-resnet18-bce-s1") == "demo-resnet18-bce-s1"
    assert settings.unique_run_name("it's") == "it's-2"  # a quote in the name does not break the search


def test_a_changed_manifest_is_a_new_dataset(tmp_path):
    """The digest follows the manifest's bytes; the profile holds rows and per-AU rates by hand."""
    from callbacks.tracking.dataset_lineage import manifest_dataset
    from datamodules.io.manifest import read_manifest
    import hashlib
    import json

    path = tmp_path / "train.tsv"
    path.write_text("image\tAU1\tAU2\na.jpg\t1\t0\nb.jpg\t0\t999\nc.jpg\t1\t999\n")
    first = manifest_dataset(read_manifest(path, aus=(1, 2)), str(path), report={"key": "k" * 64, "settings": {}})
    assert first["digest"] == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert first["name"] == f"{tmp_path.name}/train.tsv" and json.loads(first["source"]) == {"uri": str(path)}
    profile = json.loads(first["profile"])
    assert profile["rows"] == 3 and profile["labelled_entries"] == 4 and profile["cache_key"] == "k" * 64
    assert profile["au_positive_rates"] == {"AU1": round(2 / 3, 5), "AU2": 0.0}
    path.write_text("image\tAU1\tAU2\na.jpg\t1\t0\nb.jpg\t0\t999\nc.jpg\t0\t999\n")  # one label changed
    second = manifest_dataset(read_manifest(path, aus=(1, 2)), str(path))
    assert second["digest"] != first["digest"] and second["name"] == first["name"]
    url = manifest_dataset(read_manifest(path, aus=(1, 2)), "https://example.org/emotionet/train.tsv")
    assert url["source_type"] == "http" and json.loads(url["source"]) == {"url": "https://example.org/emotionet/train.tsv"}


def test_dataset_inputs_go_through_the_spool(tmp_path):
    """Logged while the fit runs, kept on disk, sent in order: the run shows the same datasets."""
    from mlflow import MlflowClient

    from callbacks.tracking.dataset_lineage import dataset_inputs
    from callbacks.tracking.spool import Spool, SpoolSender, SpooledClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("lineage"))
    run_id = run.info.run_id
    fields = {"name": "synthau/train.tsv", "digest": "0123456789ab", "source_type": "local",
              "source": '{"uri": "/data/train.tsv"}', "schema": "{}", "profile": '{"rows": 3}'}
    spooled = SpooledClient(lambda: SpoolSender(Spool.create(tmp_path / "spool", uri, run_id), client).start(), client)
    spooled.log_inputs(run_id, datasets=dataset_inputs([(fields, "training"), ({**fields, "digest": "ba9876543210",
                                                                                 "name": "synthau/val.tsv"}, "validation")]))
    assert spooled.sender.close()
    logged = client.get_run(run_id).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in logged) == [
        ("synthau/train.tsv", "0123456789ab", "training"), ("synthau/val.tsv", "ba9876543210", "validation")]


@pytest.mark.slow
def test_system_metrics_of_a_resumed_run_go_on_from_its_last_step(tmp_path):
    from mlflow import MlflowClient

    from callbacks.tracking.system_metrics import next_step

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    assert next_step(client, run_id) == 0
    for step in range(5):
        client.log_metric(run_id, "system/cpu_utilization_percentage", 50.0, step=step)
        client.log_metric(run_id, "system/system_memory_usage_megabytes", 900.0, step=step)
    client.log_metric(run_id, "train/loss", 1.0, step=99)  # the fit's own steps are not the machine's
    assert next_step(client, run_id) == 5
