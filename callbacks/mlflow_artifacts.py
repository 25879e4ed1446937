"""What an MLflow run holds beyond Lightning's metric curves.

On the run of the trainer's ``MLFlowLogger``, from global rank 0 only:
- at fit start: the label frequencies (raw vs as drawn by balanced sampling) and a grid of the
  first training batch, as PNG;
- whenever the monitored validation score improves: ``thresholds.json`` (the fitted per-AU
  thresholds and the epoch), ``au_report.csv``/``.md`` (per-AU support, thresholds, F1 and
  accuracy at 0.5 and at the fitted thresholds) and the PR curves per AU;
- at fit end: the best checkpoint and the best model as an MLflow pyfunc model that takes
  images and does detection and alignment itself (``runs:/<run id>/model``, see
  :mod:`lightning_modules.pyfunc`); ``au-detect predict --model runs:/<run id>/model`` uses it too.
The MLflow run id is stored in every checkpoint, so that ``--ckpt_path`` resumes the same run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger

from callbacks.plots import label_frequency_figure, pr_curves_figure, sample_grid_figure
from datamodules.manifest import au_column_name
from lightning_modules.checkpoints import load_checkpoint

log = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def run_id_from_checkpoint(path: str | Path) -> str | None:
    """The MLflow run a checkpoint was written by (None for checkpoints from elsewhere)."""
    ckpt = load_checkpoint(path)
    return ckpt.get(RUN_ID_KEY) if isinstance(ckpt, dict) else None


def prior_f1(labels: np.ndarray, mask: np.ndarray) -> float:
    """Mean F1 of the prior predictor: a constant score per AU, so at best "always positive"
    (F1 = 2p / (1 + p) at positive rate p). The reference a trained model must beat.

    >>> round(prior_f1(np.array([[1, 0], [0, 0], [0, 1], [0, 1]]), np.ones((4, 2), bool)), 4)  # (0.4 + 0.667) / 2
    0.5333
    """
    labelled = mask.sum(0)
    p = (labels * mask).sum(0) / np.maximum(labelled, 1)
    return float(np.mean((2 * p / (1 + p))[labelled > 0]))


def au_report(aus, scores_default: dict, scores_fitted: dict, thresholds: np.ndarray) -> list[dict]:
    """One row per AU: what the model does at 0.5 and at its fitted threshold."""
    rows = []
    for i, au in enumerate(aus):
        rows.append({
            "AU": au_column_name(au), "support": int(scores_fitted["support"][i]),
            "positives": int(scores_fitted["positives"][i]), "threshold": round(float(thresholds[i]), 4),
            "f1@0.5": _r(scores_default["f1"][i]), "f1@fitted": _r(scores_fitted["f1"][i]),
            "accuracy@0.5": _r(scores_default["accuracy"][i]), "accuracy@fitted": _r(scores_fitted["accuracy"][i]),
        })
    rows.append({"AU": "mean", "support": sum(r["support"] for r in rows), "positives": sum(r["positives"] for r in rows),
                 "threshold": None, "f1@0.5": _r(scores_default["mean_f1"]), "f1@fitted": _r(scores_fitted["mean_f1"]),
                 "accuracy@0.5": _r(scores_default["mean_accuracy"]),
                 "accuracy@fitted": _r(scores_fitted["mean_accuracy"])})
    return rows


def _r(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 4)


def _csv(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join([",".join(keys)] + [",".join("" if r[k] is None else str(r[k]) for k in keys) for r in rows]) + "\n"


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class MLflowArtifacts(L.Callback):
    """Plots, thresholds, reports, the best checkpoint and the model, on the MLflow run.

    Args:
        monitor: validation metric that decides the best epoch (higher is better).
        log_model: log the best model at the end of fit as an MLflow pyfunc model that takes
            images (:mod:`lightning_modules.pyfunc`; ``runs:/<run id>/model``).
        registered_model_name: also register it under this name (the CLI sets it from
            ``mlflow.yaml``'s ``registered_model_name``).
        sample_grid: images in the training-batch grid (0: none).
    """

    def __init__(self, monitor: str = "val/score_fitted", log_model: bool = True, sample_grid: int = 32,
                 registered_model_name: str | None = None):
        self.monitor = monitor
        self.log_model = log_model
        self.registered_model_name = registered_model_name
        self.sample_grid = sample_grid
        self.best: float | None = None
        self.best_epoch: int | None = None

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _client(trainer: L.Trainer):
        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return None, None
        return logger.experiment, logger.run_id

    def _figure(self, trainer: L.Trainer, fig, name: str) -> None:
        client, run_id = self._client(trainer)
        if client is not None:
            client.log_figure(run_id, fig, name)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def _text(self, trainer: L.Trainer, text: str, name: str) -> None:
        client, run_id = self._client(trainer)
        if client is not None:
            client.log_text(run_id, text, name)

    # -- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._client(trainer)[0] is None:
            return
        client, run_id = self._client(trainer)
        for branch, report in getattr(getattr(pl_module, "net", None), "load_reports", {}).items():
            client.set_tag(run_id, f"weights.{branch}", report[:5000])  # where each branch started from
        data = trainer.datamodule
        aus = pl_module.aus
        if data is not None and hasattr(data, "label_frequencies") and "train" in getattr(data, "splits", {}):
            sampler = data.train_sampler()
            sampled = sampler.expected_positive_rate() if sampler is not None else None
            self._figure(trainer, label_frequency_figure(aus, data.label_frequencies("train"), sampled),
                         "plots/label_frequencies.png")
            if self.sample_grid:
                batch = next(iter(data.train_dataloader()))
                n = min(self.sample_grid, len(batch["image"]))
                images = batch["image"][:n].permute(0, 2, 3, 1).numpy()
                self._figure(trainer, sample_grid_figure(images, batch["labels"][:n].numpy(),
                                                         batch["mask"][:n].numpy(), aus,
                                                         title="training batch (augmented, as the model sees it)"),
                             "plots/sample_grid.png")
            if "val" in data.splits:
                client.log_metric(run_id, "val/f1_prior", prior_f1(data.splits["val"].labels, data.splits["val"].mask))
            for stage, report in getattr(data, "reports", {}).items():
                summary = {k: v for k, v in report.items() if k not in ("samples", "no_face_rows", "skipped_rows")}
                self._text(trainer, json.dumps(summary, indent=1), f"data/alignment_{stage}.json")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._client(trainer)[0] is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is not None and not value > self.best:
            return
        self.best, self.best_epoch = value, trainer.current_epoch
        soft = next((c for c in trainer.callbacks if hasattr(c, "last_predictions")), None)
        thresholds = pl_module.thresholds.detach().cpu().numpy()
        payload = {"epoch": trainer.current_epoch, "step": trainer.global_step, self.monitor: value,
                   "criterion": getattr(soft, "criterion", None),
                   "thresholds": {au_column_name(a): float(t) for a, t in zip(pl_module.aus, thresholds)}}
        self._text(trainer, json.dumps(payload, indent=1), "thresholds.json")
        if soft is not None and getattr(soft, "last_scores", None) is not None:
            rows = au_report(pl_module.aus, soft.last_scores_default, soft.last_scores, thresholds)
            self._text(trainer, _csv(rows), "au_report.csv")
            self._text(trainer, f"Validation, epoch {trainer.current_epoch}\n\n" + _markdown(rows), "au_report.md")
            probs, labels, mask, _ = soft.last_predictions
            self._figure(trainer, pr_curves_figure(pl_module.aus, np.asarray(probs), np.asarray(labels),
                                                   np.asarray(mask), thresholds), "plots/pr_curves.png")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            checkpoint[RUN_ID_KEY] = logger.run_id

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        client, run_id = self._client(trainer)
        if client is None:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if best and Path(best).is_file():
            client.log_artifact(run_id, best, "checkpoints")
        aligned = getattr(getattr(trainer.datamodule, "alignment", None), "method", None) == "mtcnn"
        if self.log_model and aligned:  # a model that detects and aligns needs MTCNN-aligned training
            # The best epoch's weights (not the last ones), on the CPU: the trained module stays as it is.
            if best and Path(best).is_file():
                state = {k[len("net."):]: v for k, v in load_checkpoint(best)["state_dict"].items()
                         if k.startswith("net.")}
            else:
                state = {k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()}
            _log_pyfunc_model(mlflow_logger(trainer)._tracking_uri, run_id, state, pl_module, trainer,
                              self.registered_model_name)
        summary = {"best_epoch": self.best_epoch, self.monitor: self.best, "best_checkpoint": best or None}
        self._text(trainer, json.dumps(summary, indent=1), "best.json")


def _log_pyfunc_model(tracking_uri: str, run_id: str, state: dict, pl_module: L.LightningModule,
                      trainer: L.Trainer, registered_model_name: str | None) -> None:
    """Log the image-in pyfunc model (detection and alignment inside) on the logger's run."""
    import mlflow

    from lightning_modules.predictor import AUPredictor, build_net
    from lightning_modules.pyfunc import log_model

    data = trainer.datamodule
    hp = pl_module.hparams
    spec = {"aus": list(pl_module.aus), "backbone": hp.backbone, "branches": list(hp.branches),
            "aux_heads": bool(hp.aux_heads)}
    net = build_net(spec)
    net.load_state_dict(state)
    normalize = getattr(data, "_normalize", None)
    predictor = AUPredictor(net, data.alignment, spec, *((normalize.mean, normalize.std) if normalize else ()),
                            device="cpu")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            log_model(predictor, registered_model_name=registered_model_name)
    finally:
        mlflow.set_tracking_uri(previous)
