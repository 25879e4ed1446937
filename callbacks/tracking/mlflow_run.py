"""The MLflow run of a training job: the trainer's MLflow logger, the run id every checkpoint
carries, so that ``--ckpt_path`` continues the run the checkpoint was written by, and the one way
a process opens a store (:func:`open_client`), which a new SQLite store needs."""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Held while a SQLite database is opened (and, the first time, its tables created): processes
    started together on one machine would otherwise both create MLflow's or Optuna's tables and
    one of them fail. Other URLs (servers) need nothing."""
    try:
        import fcntl
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # no fcntl (Windows), or not a database URL (http://)
        yield
        return
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        yield
        return
    key = hashlib.sha1(str(Path(parsed.database).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"au-detect-sqlite-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_client(tracking_uri: str, registry_uri: str | None = None):
    """``MlflowClient(tracking_uri)``, made under :func:`creation_lock`: MLflow creates and migrates
    a new SQLite store in the client's constructor, and two processes doing that at once fail
    (``table runs already exists``, ``Online migration expected to match one row``)."""
    from mlflow import MlflowClient

    with creation_lock(tracking_uri):
        client = MlflowClient(tracking_uri, registry_uri=registry_uri)
        client.search_experiments(max_results=1)  # the store made now, whatever MLflow defers
        return client
