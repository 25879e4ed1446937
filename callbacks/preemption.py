"""Preemption: a fit stopped by a signal saves where it is, says so to MLflow and to its scheduler;
and ``last.ckpt`` follows every epoch.

SLURM and Kubernetes send SIGTERM before they kill a job (preemption, a time limit, a drained node);
a person at the terminal sends SIGINT (Ctrl+C). Lightning turns SIGTERM into a
``SIGTERMException`` at the next batch boundary and SIGINT into ``KeyboardInterrupt``; left at that,
the process ends with status 0 (SIGTERM: a scheduler reads success) or 1, and the MLflow run is
marked FAILED. :class:`Preemption` works with Lightning's handling (its ``on_exception`` hook) and
makes the fit instead:

0. take SIGINT during the fit as Lightning takes SIGTERM (its handler sets ``trainer.received_sigterm``):
   the fit stops at the next batch boundary, where the loops' progress is consistent, not wherever
   a ``KeyboardInterrupt`` lands (a checkpoint saved mid-batch resumes into a wrong epoch length).
   A second Ctrl+C interrupts at once;

1. save ``last.ckpt`` in ModelCheckpoint's folder: the full training state where it stopped, with
   the MLflow run id (:func:`~lightning_modules.checkpoints.save_atomically`: whole or not at all);
2. mark the MLflow run KILLED and send what the run's tracking spool holds;
3. end with status 143 for SIGTERM and 130 for SIGINT (128 + the signal, as a shell reports a
   process the signal ended), which the CLI raises once the trainer is torn down
   (:attr:`Preemption.exit_code`).

``au-detect fit ... --ckpt_path last`` then continues the same run. The checkpoint is saved before
the spool is flushed: a scheduler's grace period (30 s on Kubernetes by default) may end before a
tracking server that is away answers, and what the spool keeps is sent by the resumed fit.

SLURM's requeue (Lightning's ``SLURMEnvironment`` with ``auto_requeue``): on SIGUSR1 Lightning
saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``; SLURM then sends
SIGTERM, handled as above. That checkpoint carries the run id too (:meth:`Preemption.on_save_checkpoint`),
and the requeued job's ``fit``, which Lightning resumes from the newest ``hpc_ckpt_<n>.ckpt`` under
SLURM, continues the same MLflow run (the CLI reads the run id from it).

:class:`ResumableCheckpoint` is ModelCheckpoint whose ``last.ckpt`` (``save_last``) is written at
the end of every epoch, not only when a top-k checkpoint is saved: on a plateau a preemption would
otherwise lose every epoch since the last improvement. :class:`AtomicCheckpointIO` writes every
checkpoint whole or not at all.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.tracking.mlflow_run import RUN_ID_KEY, mlflow_logger
from lightning_modules.checkpoints import save_atomically

log = logging.getLogger(__name__)

KILLED = "KILLED"


class Preemption(L.Callback):
    """On SIGTERM or SIGINT during a fit: ``last.ckpt``, the MLflow run KILLED, exit 143 or 130.

    Args:
        save_checkpoint: save ``last.ckpt`` where the fit stopped (off: the last epoch's stays).
    """

    def __init__(self, save_checkpoint: bool = True):
        self.save_checkpoint = save_checkpoint
        self.signal: signal.Signals | None = None  # the signal that stopped the fit
        self.saved: str | None = None  # the checkpoint saved on it
        self._previous_sigint = None  # the SIGINT handler before the fit's

    @property
    def exit_code(self) -> int | None:
        """128 + the signal that stopped the fit (143 SIGTERM, 130 SIGINT); None when none did."""
        return None if self.signal is None else 128 + int(self.signal)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Every checkpoint names its run, Lightning's SLURM requeue checkpoint included.
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero and logger.run_id:
            checkpoint.setdefault(RUN_ID_KEY, logger.run_id)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal = None
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self._restore_sigint()  # a second Ctrl+C interrupts at once
        self.signal = signal.SIGINT
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's, during a fit
        if callable(handler):
            handler(signum, frame)
        else:
            signal.default_int_handler(signum, frame)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate and test stop as Lightning has them
        if isinstance(exception, SIGTERMException):
            self.signal = self.signal or signal.SIGTERM  # SIGINT comes this way too (_on_sigint)
        elif isinstance(exception, KeyboardInterrupt):  # before the fit's handler, or a second Ctrl+C
            self.signal = signal.SIGINT
        else:
            return
        if self.save_checkpoint and not trainer.sanity_checking:
            self.saved = self._save_last(trainer)
        logger = mlflow_logger(trainer)
        if logger is not None:
            logger.finalize(KILLED)  # Lightning's "failed" that follows leaves KILLED as it is
        if trainer.is_global_zero:
            where = f"saved {self.saved}" if self.saved else "no checkpoint saved on it"
            run = f"; MLflow run {logger.run_id} marked KILLED" if logger is not None else ""
            print(f"Stopped by {self.signal.name}: {where}{run}. Continue with the same command and "
                  f"--ckpt_path last (exit status {self.exit_code}).", file=sys.stderr, flush=True)

    def _save_last(self, trainer: L.Trainer) -> str | None:
        """``last.ckpt`` in the first ModelCheckpoint's folder (None without one, or when the strategy
        cannot save now)."""
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
            return None
        if not trainer.received_sigterm and trainer.world_size > 1:
            # A bare KeyboardInterrupt reached this rank alone, and saving is collective (a barrier):
            # the other ranks would never come.
            log.warning("Preemption: interrupted in a %d-process fit: no checkpoint saved", trainer.world_size)
            return None
        path = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
        try:
            trainer.save_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - the run must still be marked and the process end as it should
            log.error("Preemption: could not save %s (%s: %s)", path, type(e).__name__, e)
            return None
        callback.last_model_path = path
        return str(Path(path))


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last.ckpt`` (``save_last``) written at the end of every
    epoch (after its validation, where ModelCheckpoint saves), whether or not a top-k checkpoint was
    saved: a resume never goes back further than the last finished epoch. Every option is
    ModelCheckpoint's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_step: int | None = None  # the global step last.ckpt was written at

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written by either restore into the other.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step = trainer.global_step

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.save_last and not self.last_model_path and self.dirpath and state_dict.get("dirpath") == self.dirpath:
            # Resumed from a top-k checkpoint of this folder (saved before its epoch's last.ckpt, e.g.
            # because last.ckpt was damaged): last.ckpt is this run's to write, not last-v1.ckpt beside it.
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Only where ModelCheckpoint itself saves at validation end: a save here marks the step as
        # saved, and the top-k save due at the epoch's end would then be skipped.
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._keep_last(trainer)

    def _keep_last(self, trainer: L.Trainer) -> None:
        # "link" points last.ckpt at the newest top-k file by design: nothing to add there.
        if (not self.save_last or self.save_last == "link" or trainer.sanity_checking or trainer.fast_dev_run
                or trainer.state.fn != TrainerFn.FITTING or self._last_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (a Trainer plugin), all or nothing on local paths
    (:func:`~lightning_modules.checkpoints.save_atomically`); remote URLs (``s3://``...) are
    Lightning's as before. Only global rank 0 writes: the strategy calls it there alone."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, path)
