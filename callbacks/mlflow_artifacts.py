"""What an MLflow run holds beyond Lightning's metric curves.

On the run of the trainer's ``MLFlowLogger``, from global rank 0 only:
- at fit start: the train/val/test manifests as dataset inputs (:mod:`callbacks.tracking.dataset_lineage`),
  the label frequencies (raw vs as drawn by balanced sampling) and a grid of the
  first training batch, as PNG;
- whenever the monitored validation score improves: ``thresholds.json`` (the fitted per-AU
  thresholds, which fell back and why, and the epoch), ``au_report.csv``/``.md`` (per-AU support,
  thresholds, F1 and accuracy at 0.5 and at the fitted thresholds), the PR curves per AU and the
  model card (``MODEL_CARD.md``, :mod:`lightning_modules.serving.model_card`; also the run's
  description, which the MLflow UI shows on the run's page);
- at fit end: the best checkpoint (its weights, without the optimizer state), the best model as
  an MLflow pyfunc model that takes images and does detection and alignment itself
  (``runs:/<run id>/model``, see :mod:`lightning_modules.serving.pyfunc`; ``au-detect predict --model
  runs:/<run id>/model`` uses it too) and, last, ``best.json``.
With the CLI's logger all of it goes through the run's tracking spool
(:mod:`callbacks.tracking.spool`), in this order: nothing here waits for the tracking server.
The MLflow run id is stored in every checkpoint, so that ``--ckpt_path`` resumes the same run.

Crash consistency: the files of the best validation are rendered once into a record (their
contents) that every checkpoint keeps with the best score and epoch. The files are written before
the epoch's checkpoint (ModelCheckpoint always runs last), so a kill in between leaves them
describing an epoch that the checkpoints do not know; a resumed fit therefore writes them again
from the best checkpoint's record, and so does the end of fit, before the model is logged from the
same checkpoint. ``best.json`` comes after the model: once it is there the run's artifacts are
complete. A run killed at the end of fit resumes from its last checkpoint, where training is over,
so only the end of fit runs again.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.au_report import as_csv, as_markdown, au_report, logged_intensity, prior_f1
from callbacks.tracking.dataset_lineage import datamodule_datasets, dataset_inputs
from callbacks.tracking.mlflow_run import RUN_ID_KEY, mlflow_logger
from callbacks.plots import label_frequency_figure, pr_curves_figure, sample_grid_figure
from callbacks.tracking.spool import log_predictor
from datamodules.au_datamodule import AUDataModule
from datamodules.io.manifest import au_column_name
from lightning_modules.au_detector import AUDetector
from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.serving.model_card import CARD_FILE, FACTS_FILE, render_model_card
from lightning_modules.serving.predictor import AUPredictor

log = logging.getLogger(__name__)


class MLflowArtifacts(L.Callback):
    """Plots, thresholds, reports, the best checkpoint and the model, on the MLflow run.

    Args:
        monitor: validation metric that decides the best epoch (higher is better); ModelCheckpoint's
            monitor, since the artifacts and the model are those of its best checkpoint.
        log_model: log the best model at the end of fit as an MLflow pyfunc model that takes
            images (:mod:`lightning_modules.serving.pyfunc`; ``runs:/<run id>/model``).
        registered_model_name: also register it under this name (the CLI sets it from
            ``mlflow.yaml``'s ``registered_model_name``).
        log_onnx: also export the network to ONNX: in the pyfunc model (its ``backend:
            onnxruntime`` config) and as the MLflow ONNX model ``runs:/<run id>/model_onnx``
            (needs the ``onnx`` extra).
        sample_grid: images in the training-batch grid (0: none).
    """

    def __init__(self, monitor: str = "val/score_heldout", log_model: bool = True, sample_grid: int = 32,
                 registered_model_name: str | None = None, log_onnx: bool = False):
        self.monitor = monitor
        self.log_model, self.log_onnx = log_model, log_onnx
        if log_model and log_onnx:  # said before training, not at its end
            missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
            if missing:
                raise ImportError(f"mlflow_artifacts.log_onnx needs {' and '.join(missing)}: pip install -e '.[onnx]', "
                                  f"or --mlflow_artifacts.log_onnx false")
        self.registered_model_name = registered_model_name
        self.sample_grid = sample_grid
        self.best: float | None = None
        self.best_epoch: int | None = None
        # The best validation's artifacts as file contents ({"epoch", "step", "score", "files"}),
        # kept in checkpoints: a resume writes exactly these again.
        self.record: dict | None = None
        self._restored = False  # state came from a checkpoint: the run's files are repaired at train start
        self._written: tuple[int, int] | None = None  # (epoch, step) of the record this process wrote

    @property
    def state_key(self) -> str:
        # The monitor only: log_model, sample_grid or the registered name may change on resume.
        return self._generate_state_key(monitor=self.monitor)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
        self.record = state_dict.get("record")
        self._restored = True

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

    def _write(self, trainer: L.Trainer, record: dict | None) -> None:
        """A record's files, in one upload."""
        client, run_id = self._client(trainer)
        if client is None or record is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in record["files"].items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)
            client.log_artifacts(run_id, tmp)
        self._written = (record["epoch"], record["step"])

    @staticmethod
    def _best_checkpoint(trainer: L.Trainer) -> tuple[str | None, dict | None]:
        """ModelCheckpoint's best file and its content (None, None without one)."""
        path = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        return (path, load_checkpoint(path)) if path and Path(path).is_file() else (None, None)

    def _record_of(self, path: str | None, ckpt: dict | None) -> dict | None:
        """The record a checkpoint keeps of its own epoch: the source of truth for the run's files.
        Without one, this process's record (warned about when there is a checkpoint)."""
        if ckpt is None:
            return self.record
        record = (ckpt.get("callbacks", {}).get(self.state_key) or {}).get("record")
        if record is not None and (record["epoch"], record["step"]) == (ckpt.get("epoch"), ckpt.get("global_step")):
            return record
        log.warning("MLflowArtifacts: the best checkpoint %s keeps no artifacts of its epoch %s for %r (an older "
                    "checkpoint, or checkpoint.monitor is not mlflow_artifacts.monitor): thresholds.json and "
                    "au_report describe epoch %s", path, ckpt.get("epoch"), self.monitor, self.best_epoch)
        return self.record

    def _render(self, trainer: L.Trainer, pl_module: AUDetector, value: float) -> dict:
        """This validation's files, as contents: the thresholds and, when they were fitted this
        validation, the per-AU report and PR curves of its :class:`~lightning_modules.evaluation.ThresholdFit`."""
        fit = pl_module.threshold_fit
        thresholds = pl_module.thresholds.detach().cpu().numpy()
        epoch = trainer.current_epoch
        payload = {"epoch": epoch, "step": trainer.global_step, self.monitor: value,
                   "criterion": fit.criterion if fit is not None else None,
                   "thresholds": {au_column_name(a): float(t) for a, t in zip(pl_module.aus, thresholds)}}
        if fit is not None:  # which thresholds were not fitted, and why: the model card lists them
            payload |= {"min_positives": fit.min_positives, "fallback": fit.fallback,
                        "positives": {au_column_name(a): int(n) for a, n in zip(fit.aus, fit.positives)},
                        "fell_back": fit.fallback_reasons()}
        files: dict[str, str | bytes] = {"thresholds.json": json.dumps(payload, indent=1)}
        if fit is not None:
            rows = au_report(pl_module.aus, fit.at_default, fit.fitted, thresholds, fit.fallback_reasons(),
                             logged_intensity(trainer.callback_metrics, pl_module.aus))
            files["au_report.csv"] = as_csv(rows)
            files["au_report.md"] = f"Validation, epoch {epoch}\n\n" + as_markdown(rows)
            files["plots/pr_curves.png"] = _png(pr_curves_figure(pl_module.aus, fit.probs, fit.labels, fit.mask,
                                                                 thresholds))
            facts = self._card_facts(trainer, pl_module, fit, thresholds)
            files[FACTS_FILE] = json.dumps(facts, indent=1)
            files[CARD_FILE] = render_model_card(facts)
        return {"epoch": epoch, "step": trainer.global_step, "score": value, "files": files}

    def _card_facts(self, trainer: L.Trainer, pl_module: AUDetector, fit, thresholds: np.ndarray) -> dict:
        """The model card's facts (:mod:`lightning_modules.serving.model_card`) of this validation."""
        data = trainer.datamodule
        logger = mlflow_logger(trainer)
        run_id = logger.run_id if logger is not None else None
        aligned = isinstance(data, AUDataModule) and data.alignment.method == "mtcnn"
        metrics = trainer.callback_metrics
        splits, train_rate = {}, [None] * len(pl_module.aus)
        if isinstance(data, AUDataModule):
            for name, split in data.splits.items():
                splits[name] = {"manifest": data.manifest_paths.get(name), "rows": len(split)}
            if "train" in data.splits:
                train_rate = [None if np.isnan(r) else round(float(r), 4) for r in data.label_frequencies("train")]
        reasons = fit.fallback_reasons()
        aus = []
        for i, au in enumerate(pl_module.aus):
            name = au_column_name(au)
            f1 = float(fit.fitted["f1"][i])
            aus.append({"AU": name, "train_rate": train_rate[i], "val_positives": int(fit.positives[i]),
                        "threshold": round(float(thresholds[i]), 4), "fell_back": reasons.get(name),
                        "val_f1": None if np.isnan(f1) else round(f1, 4)})
        headline = ("val/f1_heldout", "val/score_heldout", "val/f1_fitted", "val/f1")
        return {
            "run_id": run_id,
            "model_uri": f"runs:/{run_id}/model" if run_id and self.log_model and aligned else None,
            "registered_model_name": self.registered_model_name,
            "network": {"backbone": pl_module.hparams.get("backbone"), "branches": list(pl_module.hparams.get("branches", [])),
                        "weights": dict(getattr(pl_module.net, "load_reports", {}))},
            "data": {"synthetic": bool(getattr(data, "synthetic", False)), "splits": splits},
            "thresholds": {"criterion": fit.criterion, "min_positives": fit.min_positives, "fallback": fit.fallback},
            "aus": aus, "best_epoch": trainer.current_epoch,
            "validation": {k: round(float(metrics[k]), 4) for k in headline if k in metrics}, "test": None,
        }

    def _publish_card(self, client, run_id: str, card: str) -> None:
        """The card as the run's description: the MLflow UI renders it on the run's page."""
        client.set_tag(run_id, "mlflow.note.content", card)

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, AUDetector):
            raise TypeError(f"MLflowArtifacts reports on the AU detector (AUDetector), not {type(pl_module).__name__}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: AUDetector) -> None:
        if self._client(trainer)[0] is None:
            return
        client, run_id = self._client(trainer)
        for branch, report in pl_module.net.load_reports.items():
            client.set_tag(run_id, f"weights.{branch}", report[:5000])  # where each branch started from
        data = trainer.datamodule
        aus = pl_module.aus
        if isinstance(data, AUDataModule) and "train" in data.splits:
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
            # the manifests as the run's dataset inputs (MLflow's Datasets column), with digests
            client.log_inputs(run_id, datasets=dataset_inputs(datamodule_datasets(data)))
            for stage, report in data.reports.items():
                summary = {k: v for k, v in report.items() if k not in ("samples", "no_face_rows", "skipped_rows")}
                self._text(trainer, json.dumps(summary, indent=1), f"data/alignment_{stage}.json")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only a fit chooses the best epoch: `au-detect validate` on a checkpoint continues the
        # training run and must not rewrite what describes that run's best model.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self._client(trainer)[0] is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is not None and not value > self.best:  # strictly better, as ModelCheckpoint decides
            return
        self.best, self.best_epoch = value, trainer.current_epoch
        self.record = self._render(trainer, pl_module, value)
        self._write(trainer, self.record)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume: the killed process may have written the files of a validation whose
        # checkpoint it never saved (or only part of them); the best checkpoint says which is right.
        if self._restored:
            self._restored = False
            self._write(trainer, self._record_of(*self._best_checkpoint(trainer)))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The run id travels with the checkpoint: --ckpt_path continues this run.
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            checkpoint[RUN_ID_KEY] = logger.run_id

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        client, run_id = self._client(trainer)
        if client is None:
            return
        best, ckpt = self._best_checkpoint(trainer)
        record = self._record_of(best, ckpt)
        if record is not None and self._written != (record["epoch"], record["step"]):
            self._write(trainer, record)  # the files must describe the checkpoint the model comes from
        if best:
            log_model_checkpoint(client, run_id, best, ckpt)
        model_uri = None
        data = trainer.datamodule
        aligned = isinstance(data, AUDataModule) and data.alignment.method == "mtcnn"
        if self.log_model and aligned:  # a model that detects and aligns needs MTCNN-aligned training
            # The best epoch's weights (not the last ones), on the CPU: the trained module stays as it is.
            net = ckpt["state_dict"] if ckpt is not None else pl_module.state_dict()
            predictor = AUPredictor.from_state(net, pl_module.hparams, data.alignment, data.normalize.mean,
                                               data.normalize.std)
            predictor.card = (record or {}).get("files", {}).get(CARD_FILE)
            # through the spool when the run has one: logged when the server takes it, after what came before
            log_predictor(client, run_id, predictor, registered_model_name=self.registered_model_name,
                          onnx=self.log_onnx)
            model_uri = f"runs:/{run_id}/model"
        card = (record or {}).get("files", {}).get(CARD_FILE)
        if card:
            self._publish_card(client, run_id, card)
        # Last: with best.json there, the run's artifacts are complete.
        summary = {"best_epoch": record["epoch"] if record else self.best_epoch,
                   self.monitor: record["score"] if record else self.best, "best_checkpoint": best, "model": model_uri}
        self._text(trainer, json.dumps(summary, indent=1), "best.json")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The model card of the tested checkpoint, now with the test's figures, wherever it is kept."""
        client, run_id = self._client(trainer)
        path = trainer.ckpt_path
        if client is None or not path or not Path(path).is_file():
            return
        record = self._record_of(path, load_checkpoint(path))
        text = (record or {}).get("files", {}).get(FACTS_FILE)
        if not text:
            return
        facts = json.loads(text)
        metrics = trainer.callback_metrics
        facts["test"] = {k: round(float(metrics[k]), 4) for k in ("test/f1", "test/accuracy", "test/score",
                                                                   "test/f1_default") if k in metrics}
        for au in facts["aus"]:
            value = metrics.get(f"test/f1/{au['AU']}")
            if value is not None:
                au["test_f1"] = round(float(value), 4)
        card = render_model_card(facts)
        self._text(trainer, json.dumps(facts, indent=1), FACTS_FILE)
        self._text(trainer, card, CARD_FILE)
        self._publish_card(client, run_id, card)
        update_logged_model_card(client, run_id, card, facts.get("registered_model_name"))


def update_logged_model_card(client, run_id: str, card: str, registered_model_name: str | None = None) -> None:
    """Put ``card`` in the run's logged model ``model`` (its top folder and its predictor folder, which
    ``--describe`` reads) and make it the description of the registered versions made from that model."""
    from lightning_modules.serving.pyfunc import logged_models

    experiment_id = client.get_run(run_id).info.experiment_id
    models = sorted(logged_models(client, experiment_id, run_id, "model"), key=lambda m: m.creation_timestamp)
    if not models:
        return
    model = models[-1]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, CARD_FILE).write_text(card, encoding="utf-8")
        Path(tmp, "artifacts", "predictor").mkdir(parents=True)
        Path(tmp, "artifacts", "predictor", CARD_FILE).write_text(card, encoding="utf-8")
        client.log_model_artifacts(model.model_id, tmp)
    if registered_model_name:
        for version in client.search_model_versions(f"name = '{registered_model_name}'"):
            if version.run_id == run_id:
                client.update_model_version(registered_model_name, version.version, description=card)


# What only resuming the training needs: the optimizer's moments are twice the weights again (AdamW).
TRAINING_STATE = ("optimizer_states", "lr_schedulers")


def model_checkpoint(ckpt: dict) -> dict:
    """A Lightning checkpoint without the optimizer and scheduler state: the weights, hyperparameters,
    epoch, callbacks' state and run id, for ``load_from_checkpoint``, ``au-detect test`` and predict."""
    return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}


def log_model_checkpoint(client, run_id: str, path: str, ckpt: dict) -> None:
    """The best checkpoint on the run, under ``checkpoints/`` with its file's name, without what only
    resuming needs (that stays in the local file, which ``--ckpt_path`` resumes from): uploads sized
    by the model, which matters for two ResNet-152 branches behind a proxy."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp, Path(path).name)
        torch.save(model_checkpoint(ckpt), slim)
        client.log_artifact(run_id, str(slim), "checkpoints")


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
