"""The dual-transfer AU detector: two ResNet branches, fused features, a linear head over the AUs.

One branch starts from a face-recognition model (identity-discriminative features around the
landmarks where AUs happen), the other from a facial-expression model (AUs co-occur in
emotions): the seed paper's "multiple transfer learning". Their pooled features are
concatenated and a linear head predicts every AU. Each branch may also have an auxiliary head,
and an optional penalty decorrelates the two branches' features on each batch (the
orthogonality of the seed authors), so the branches are pushed to contribute different evidence.

:class:`AUNet` is the plain ``nn.Module`` (what MLflow stores and serves); :class:`AUDetector`
is the LightningModule around it (loss, metrics, optimisation).
"""

from __future__ import annotations

from typing import Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.io.manifest import EMOTIONET_AUS, au_column_name
from lightning_modules.backbones import create_backbone
from lightning_modules.evaluation import ThresholdFit, ValidationBatch
from lightning_modules.intensity import AUIntensityMetrics
from lightning_modules.intensity_head import OrdinalHead, ordinal_loss, ordinal_pos_weight, reported_intensity
from lightning_modules.losses import MaskedBCEWithLogits, build_loss, prior_target_rate
from lightning_modules.metrics import AUMetrics

BRANCHES = ("face", "emotion")


class AUNet(nn.Module):
    """Branches -> concatenated pooled features -> AU logits (plus auxiliary logits per branch).

    ``thresholds`` (a buffer, so it travels with the weights) turns probabilities into decisions;
    ``aus`` names the outputs.
    """

    def __init__(self, aus: Sequence[int] = EMOTIONET_AUS, backbone: str = "resnet50",
                 branches: Sequence[str] = BRANCHES, weights: dict[str, str | None] | None = None,
                 aux_heads: bool = False, dropout: float = 0.0, allow_missing: bool = False,
                 intensity: bool = False):
        super().__init__()
        unknown = set(branches) - set(BRANCHES)
        if unknown or not branches:
            raise ValueError(f"model branches must be a non-empty subset of {BRANCHES}, got {list(branches)}")
        self.aus = tuple(int(a) for a in aus)
        weights = weights or {}
        self.branches = nn.ModuleDict()
        self.load_reports = {}
        for name in branches:
            net, report = create_backbone(backbone, weights.get(name), allow_missing=allow_missing)
            self.branches[name] = net
            self.load_reports[name] = str(report) if report else "random initialisation"
        dims = [b.num_features for b in self.branches.values()]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(sum(dims), len(self.aus))
        self.aux = nn.ModuleDict({n: nn.Linear(d, len(self.aus)) for n, d in zip(branches, dims)}) if aux_heads \
            else nn.ModuleDict()
        # FACS levels given presence, from the same fused features (None: occurrence only)
        self.intensity_head = OrdinalHead(sum(dims), len(self.aus)) if intensity else None
        self.register_buffer("thresholds", torch.full((len(self.aus),), 0.5))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """AU logits, auxiliary logits per branch, pooled features per branch."""
        feats = {n: b(x) for n, b in self.branches.items()}
        logits = self.head(self.dropout(torch.cat(list(feats.values()), 1)))
        aux = {n: head(self.dropout(feats[n])) for n, head in self.aux.items()}
        return logits, aux, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B,3,S,S) -> AU logits (B,K)."""
        return self.forward_all(x)[0]

    def intensity_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cumulative logits of the levels given presence (B,K,4), from ``forward_all``'s features."""
        if self.intensity_head is None:
            raise ValueError("this network has no intensity head (trained without AU<n>_intensity columns)")
        return self.intensity_head(self.dropout(torch.cat(list(feats.values()), 1)))

    @torch.no_grad()
    def answer(self, x: torch.Tensor, intensity: bool = False, embedding: bool = False) -> tuple[torch.Tensor, ...]:
        """One forward pass, what a prediction reports: probabilities and decisions at the stored
        thresholds; with ``intensity`` the intensities (0 where an AU is decided absent, its
        expected FACS level 1-5 given presence where present); with ``embedding`` the face's
        identity embedding (:meth:`embedding`)."""
        logits, _, feats = self.forward_all(x)
        probs = torch.sigmoid(logits.float())  # float32 even under autocast: thresholds are fine-grained
        decisions = probs >= self.thresholds
        out = [probs, decisions]
        if intensity:
            out.append(reported_intensity(self.intensity_logits(feats), decisions))
        if embedding:
            out.append(self.embedding(feats))
        return tuple(out)

    def embedding(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Who the face is, as a unit vector (B, D): the face branch's pooled features (trained to
        tell identities apart, with an ArcFace margin, when it was pretrained), or every branch's
        when the network has no face branch. Cosine similarity compares two faces."""
        features = feats["face"] if "face" in feats else torch.cat(list(feats.values()), 1)
        return F.normalize(features.float(), dim=1)

    def predict_intensity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, decisions at the stored thresholds, and intensities: 0 where an AU is
        decided absent, its expected FACS level (1-5) given presence where decided present."""
        return self.answer(x, intensity=True)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and decisions at the stored thresholds."""
        return self.answer(x)


def decorrelation_penalty(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared Pearson correlation, over the batch, between every feature of ``a`` (B, Da) and
    every feature of ``b`` (B, Db): 0 when no feature of one branch is linearly related to one of
    the other. The two branches' features live in different spaces, but they describe the same
    samples, so correlation over the batch is what they can be compared by.

    >>> x = torch.randn(64, 1)
    >>> round(decorrelation_penalty(x, 1 - 2 * x).item(), 3)  # one pair, fully (anti-)correlated
    1.0
    """
    a = a.float() - a.float().mean(0)
    b = b.float() - b.float().mean(0)
    a = a / (a.pow(2).mean(0).sqrt() + eps)
    b = b / (b.pow(2).mean(0).sqrt() + eps)
    return (a.T @ b / a.shape[0]).pow(2).mean()


class AUDetector(L.LightningModule):
    """Training, evaluation and prediction of :class:`AUNet`.

    Args:
        aus: AUs predicted, in the data's order (linked from ``data.aus`` by the CLI).
        backbone: timm ResNet name (resnet18 ... resnet152).
        branches: which transfer branches to use (``face``, ``emotion`` or both).
        face_weights, emotion_weights: weight source of each branch: a checkpoint path,
            ``timm`` for timm's pretrained weights, or null for a random start.
        allow_missing: accept a checkpoint that lacks some backbone tensors.
        aux_heads: add an auxiliary AU head on each branch.
        aux_weight: weight of the auxiliary heads' losses.
        orthogonality: weight of the penalty decorrelating the two branches' features
            (:func:`decorrelation_penalty`; needs both branches).
        loss: ``selective`` (selective learning), ``bce`` (masked) or ``weighted_bce``.
        target_rate: selective learning's target positive share: one value, one per AU, or
            ``prior``: each AU's positive share in the training data (``au_priors``).
        au_priors: each AU's labelled positive share in the training data, what ``prior`` means;
            ``au-detect fit`` links it from the DataModule (``AUDataModule.au_priors``).
        max_drop, max_weight: selective learning's caps on dropping and up-weighting.
        pos_weight: per-AU positive weights for ``weighted_bce``.
        dropout: before the heads.
        backbone_lr_factor: backbone learning rate relative to the heads' (transferred
            features are refined slowly, the new heads learn fast).
        optimizer, scheduler: from the config, as class paths with their arguments.
        scheduler_interval: step the scheduler each ``epoch`` or each ``step``.
        loss_seed: seed of selective learning's random drops.
        channels_last: on a GPU, the network and its batches in channels-last memory (NHWC), the
            layout tensor cores convolve in under bf16; ignored on the CPU.
        intensity: train an intensity head (FACS levels given presence,
            :mod:`lightning_modules.intensity_head`) beside occurrence; null: when the data has
            ``AU<n>_intensity`` columns (``intensity_data``), false: occurrence only.
        intensity_data: whether the training data has intensities; ``au-detect fit`` links it from
            the DataModule (``AUDataModule.has_intensity``).
        intensity_weight: weight of the intensity loss beside the occurrence loss.
        intensity_level_counts: per AU, training frames at levels 1-5, for the balancing weights
            of rare high levels (linked from ``AUDataModule.intensity_level_counts``); null: unweighted.
        intensity_detach: train the intensity head on the branches' features without letting its
            loss change them: occurrence trains exactly as without the head (true), or both heads
            shape the shared features (false).
    """

    def __init__(
        self,
        aus: Sequence[int] = EMOTIONET_AUS,
        backbone: str = "resnet50",
        branches: Sequence[str] = BRANCHES,
        face_weights: str | None = None,
        emotion_weights: str | None = None,
        allow_missing: bool = False,
        aux_heads: bool = False,
        aux_weight: float = 0.3,
        orthogonality: float = 0.0,
        loss: str = "selective",
        target_rate: float | list[float] | Literal["prior"] = 0.5,
        au_priors: list[float] | None = None,
        max_drop: float = 1.0,
        max_weight: float | None = None,
        pos_weight: list[float] | None = None,
        dropout: float = 0.0,
        backbone_lr_factor: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        loss_seed: int | None = 0,
        channels_last: bool = True,
        intensity: bool | None = None,
        intensity_data: bool = False,
        intensity_weight: float = 1.0,
        intensity_level_counts: list[list[float]] | None = None,
        intensity_detach: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if orthogonality and len(branches) != 2:
            raise ValueError("model.orthogonality decorrelates the two branches: it needs both")
        if intensity and not intensity_data:
            raise ValueError("model.intensity: true needs AU<n>_intensity columns in the training manifest "
                             "(the data has none)")
        self.with_intensity = bool(intensity_data if intensity is None else intensity)
        self.net = AUNet(aus, backbone, branches, {"face": face_weights, "emotion": emotion_weights},
                         aux_heads=aux_heads, dropout=dropout, allow_missing=allow_missing,
                         intensity=self.with_intensity)
        self.aus = self.net.aus
        if loss == "selective":
            self.criterion = build_loss(loss, target_rate=self._target_rate(target_rate, au_priors),
                                        max_drop=max_drop, max_weight=max_weight, seed=loss_seed)
        elif loss == "weighted_bce":
            self.criterion = build_loss(loss, pos_weight=pos_weight)
        else:
            self.criterion = build_loss(loss)
        self.eval_criterion = MaskedBCEWithLogits()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        k = len(self.aus)
        self.train_metrics = AUMetrics(k)
        # Evaluation counts each sample once even when DDP's sampler pads the set with repeats.
        self.val_metrics = AUMetrics(k, dedupe_by_index=True)
        self.test_metrics = AUMetrics(k, dedupe_by_index=True)
        self.test_metrics_default = AUMetrics(k, dedupe_by_index=True)
        if self.with_intensity:
            weight = None if intensity_level_counts is None else ordinal_pos_weight(intensity_level_counts)
            if weight is not None and weight.shape[0] != k:
                raise ValueError(f"model.intensity_level_counts has {weight.shape[0]} AUs for {k}")
            self.register_buffer("intensity_pos_weight", weight, persistent=False)
            self.val_intensity = AUIntensityMetrics(k, dedupe_by_index=True)
            self.test_intensity = AUIntensityMetrics(k, dedupe_by_index=True)
        # The last validation's thresholds with their predictions and scores (SoftThresholdCallback)
        self.threshold_fit: ThresholdFit | None = None

    def _target_rate(self, target_rate, au_priors):
        """``target_rate`` as values: a number, one per AU, or the priors for ``prior``."""
        k = len(self.aus)
        if target_rate == "prior":
            if au_priors is None:
                raise ValueError("model.target_rate: prior needs the training positive rates in model.au_priors "
                                 "(au-detect fit computes them from the training data)")
            if len(au_priors) != k:
                raise ValueError(f"model.au_priors has {len(au_priors)} rates for {k} AUs")
            return prior_target_rate(au_priors)
        if isinstance(target_rate, str):
            raise ValueError(f"model.target_rate must be a number, one number per AU, or 'prior'; got {target_rate!r}")
        if not isinstance(target_rate, (int, float)) and len(target_rate) != k:
            raise ValueError(f"model.target_rate has {len(target_rate)} values for {k} AUs {list(self.aus)}")
        return target_rate

    @property
    def thresholds(self) -> torch.Tensor:
        """Per-AU decision thresholds; fitted by SoftThresholdCallback, saved in checkpoints."""
        return self.net.thresholds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        # Before the strategy moves the model to its device and wraps it (DDP's gradient buckets
        # are views of the parameters as they are then); the move keeps the memory format.
        # load_from_checkpoint calls this too, outside any trainer: nothing to place then.
        trainer = self._trainer
        if self.hparams.channels_last and trainer is not None and trainer.strategy.root_device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)

    def _images(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last and x.is_cuda else x

    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits, aux, feats = self.net.forward_all(self._images(batch))
        labels, mask = batch["labels"], batch["mask"]
        parts = {"main": self.criterion(logits, labels, mask)}
        if self.with_intensity and "intensity" in batch:
            # detached: the head learns on the occurrence features and changes nothing upstream
            cumulative = self.net.intensity_logits({k: v.detach() for k, v in feats.items()}
                                                   if self.hparams.intensity_detach else feats)
            parts["intensity"] = self.hparams.intensity_weight * ordinal_loss(
                cumulative, batch["intensity"], batch["intensity_mask"], self.intensity_pos_weight)
        for name, aux_logits in aux.items():
            parts[f"aux_{name}"] = self.hparams.aux_weight * self.criterion(aux_logits, labels, mask)
        if self.hparams.orthogonality:
            parts["orthogonality"] = self.hparams.orthogonality * decorrelation_penalty(*feats.values())
        return sum(parts.values()), logits, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logits, parts = self.model_step(batch)
        self.train_metrics.update(torch.sigmoid(logits.detach()), batch["labels"], batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        if len(parts) > 1:
            self.log_dict({f"train/loss_{k}": v for k, v in parts.items()}, batch_size=len(logits))
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_scores("train", self.train_metrics.compute(), per_au=False)
        self.train_metrics.reset()

    def evaluation_step(self, batch: dict, intensity: AUIntensityMetrics | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and plain masked BCE: deterministic (selective learning drops at random) and the
        same yardstick whatever loss a run trains with, so runs compare. With an intensity head and
        intensity labels, ``intensity`` is updated with the reported intensities (decided at the
        current thresholds) against the labelled levels."""
        logits, _, feats = self.net.forward_all(self._images(batch))
        if intensity is not None and self.with_intensity and "intensity" in batch:
            decisions = torch.sigmoid(logits.float()) >= self.thresholds
            reported = reported_intensity(self.net.intensity_logits(feats), decisions)
            intensity.update(reported, batch["intensity"], batch["intensity_mask"], index=batch["index"])
        return self.eval_criterion(logits, batch["labels"], batch["mask"]), logits

    def validation_step(self, batch: dict, batch_idx: int) -> ValidationBatch:
        loss, logits = self.evaluation_step(batch, self.val_intensity if self.with_intensity else None)
        probs = torch.sigmoid(logits)
        self.val_metrics.update(probs, batch["labels"], batch["mask"], index=batch["index"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(logits))
        # SoftThresholdCallback gathers these to fit the thresholds.
        return ValidationBatch(probs, batch["labels"], batch["mask"], batch["index"])

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_metrics.compute())
        self.val_metrics.reset()
        if self.with_intensity:
            self._log_intensity("val", self.val_intensity)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits = self.evaluation_step(batch, self.test_intensity if self.with_intensity else None)
        probs = torch.sigmoid(logits)
        self.test_metrics.update(probs, batch["labels"], batch["mask"], thresholds=self.thresholds,
                                 index=batch["index"])
        self.test_metrics_default.update(probs, batch["labels"], batch["mask"], index=batch["index"])
        self.log("test/loss", loss, sync_dist=True, batch_size=len(logits))

    def on_test_epoch_end(self) -> None:
        fitted = self.test_metrics.compute()
        self._log_scores("test", fitted)  # at the fitted thresholds
        self._log_scores("test", self.test_metrics_default.compute(), suffix="_default")
        # Each AU's labelled positives and negatives in the test split: what per-AU figures rest on.
        for i, au in enumerate(self.aus):
            if fitted["support"][i] > 0:
                positives = fitted["positives"][i].float()
                self.log(f"test/positives/{au_column_name(au)}", positives)
                self.log(f"test/negatives/{au_column_name(au)}", fitted["support"][i].float() - positives)
        self.test_metrics.reset()
        self.test_metrics_default.reset()
        if self.with_intensity:
            self._log_intensity("test", self.test_intensity)

    def _log_intensity(self, stage: str, metric: AUIntensityMetrics) -> None:
        """ICC(3,1), Pearson correlation and MAE of the reported intensities, mean and per AU
        (AUs with labelled levels only); nothing when the split has no intensity labels."""
        if metric.update_count == 0:
            return
        scores = metric.compute()
        for key in ("icc", "pcc", "mae"):
            if torch.isfinite(scores[f"mean_{key}"]):
                self.log(f"{stage}/intensity_{key}", scores[f"mean_{key}"])
            for i, au in enumerate(self.aus):
                if torch.isfinite(scores[key][i]):
                    self.log(f"{stage}/intensity_{key}/{au_column_name(au)}", scores[key][i])
        metric.reset()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        probs = torch.sigmoid(self(batch["image"]))
        return {"probs": probs, "decisions": probs >= self.thresholds, "index": batch["index"]}

    def _log_scores(self, stage: str, scores: dict, suffix: str = "", per_au: bool = True) -> None:
        self.log_dict({f"{stage}/f1{suffix}": scores["mean_f1"], f"{stage}/accuracy{suffix}": scores["mean_accuracy"],
                       f"{stage}/score{suffix}": scores["score"]}, prog_bar=stage == "val")
        if stage == "test":
            self.log(f"{stage}/f1_micro{suffix}", scores["micro_f1"])
        if per_au:
            for i, au in enumerate(self.aus):
                name = au_column_name(au)
                if torch.isfinite(scores["f1"][i]):
                    self.log(f"{stage}/f1{suffix}/{name}", scores["f1"][i])
                    self.log(f"{stage}/accuracy{suffix}/{name}", scores["accuracy"][i])

    def configure_optimizers(self):
        backbone = [p for p in self.net.branches.parameters() if p.requires_grad]
        heads = [p for n, p in self.net.named_parameters() if not n.startswith("branches.") and p.requires_grad]
        factor = self.hparams.backbone_lr_factor
        optimizer = self.optimizer_factory([{"params": heads}, {"params": backbone, "lr_factor": factor}])
        for group in optimizer.param_groups:  # the factory set one lr; scale the backbone's group
            group["lr"] = group["lr"] * group.pop("lr_factor", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval,
                                                          "monitor": "val/loss"}}
