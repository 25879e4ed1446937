"""The MLflow run of a training job: the trainer's MLflow logger, and the run id every checkpoint
carries, so that ``--ckpt_path`` continues the run the checkpoint was written by."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from lightning_modules.checkpoints import load_checkpoint

RUN_ID_KEY = "mlflow_run_id"


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's MLflow logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def run_id_from_checkpoint(path: str | Path) -> str | None:
    """The MLflow run a checkpoint was written by (None for checkpoints from elsewhere)."""
    ckpt = load_checkpoint(path)
    return ckpt.get(RUN_ID_KEY) if isinstance(ckpt, dict) else None
