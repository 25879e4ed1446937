"""Writes the pretrained backbone where the AU model's branches read it, and logs it to MLflow."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from callbacks.tracking.mlflow_run import mlflow_logger


class BackboneExport(L.Callback):
    """At the end of ``fit`` (global rank 0), ``pl_module.save_backbone(path)`` and log the file.

    Args:
        path: the checkpoint to write; point ``model.face_weights`` or ``model.emotion_weights``
            of an AU config at it.
    """

    def __init__(self, path: str = "checkpoints/backbone.pt"):
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(pl_module.save_backbone(self.path))
        print(f"Backbone saved to {path}")
        logger = mlflow_logger(trainer)
        if logger is not None:
            logger.experiment.log_artifact(logger.run_id, str(path), "backbone")
