"""``mlflow.yaml``: where runs are tracked. This is the only place that reads it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class TrackingSettings:
    """The contents of ``mlflow.yaml``."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment_name: str = "au-detect"
    artifact_location: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    registered_model_name: str | None = None  # register each fit's model under this name

    @classmethod
    def read(cls, path: str | Path) -> "TrackingSettings":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MLflow settings {path} not found: pass --mlflow PATH (see mlflow.yaml)")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        settings = cls(**raw)
        settings.tags = {str(k): str(v) for k, v in (settings.tags or {}).items()}
        return settings

    def experiment_id(self, client) -> str:
        """The experiment's id on ``client``'s store, created (with the artifact location) if new."""
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)

    def ui_command(self) -> str:
        """The command that shows this store in the MLflow UI."""
        if self.tracking_uri == DEFAULT_TRACKING_URI:
            return "mlflow ui"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def logger(self, run_name: str | None = None, run_id: str | None = None,
               tags: dict[str, str] | None = None) -> MLFlowLogger:
        # Lightning's MLFlowLogger would default to the ./mlruns file store, which MLflow 3 no
        # longer takes by default: the URI is always explicit. The store is opened here first, in
        # this thread, so that a new SQLite database gets its tables once, before anything else
        # of the run (callbacks, model logging) opens it.
        from mlflow import MlflowClient

        MlflowClient(self.tracking_uri).search_experiments(max_results=1)
        return MLFlowLogger(experiment_name=self.experiment_name, tracking_uri=self.tracking_uri, tags={**self.tags, **(tags or {})},
                            artifact_location=self.artifact_location, run_name=run_name, run_id=run_id,
                            log_model=False)


def use_for_model_uri(model: str, settings: str | Path) -> None:
    """Point MLflow at the settings file's store when ``model`` is an MLflow model URI (``runs:/``,
    ``models:/``); MLFLOW_TRACKING_URI, when set, wins."""
    from lightning_modules.predictor import MLFLOW_SCHEMES

    if model.startswith(MLFLOW_SCHEMES) and not os.environ.get("MLFLOW_TRACKING_URI") and Path(settings).is_file():
        import mlflow

        mlflow.set_tracking_uri(TrackingSettings.read(settings).tracking_uri)
