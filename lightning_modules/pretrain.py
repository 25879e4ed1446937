"""The pretraining stage: face recognition (ArcFace) and expression recognition backbones.

The seed paper's "multiple transfer learning" starts the AU model's two branches from a
face-recognition network (identity features around the landmarks where AUs happen) and from a
facial-expression network (AUs co-occur in emotions). Where no such checkpoint is at hand, the
project trains its own:

* :class:`FaceRecognitionModule`: backbone -> embedding (Linear + BatchNorm1d) -> additive
  angular margin head (:class:`ArcMarginHead`, Deng et al., 2019) over the training
  identities. It is validated by face verification on identities it never trained on: all
  positive pairs of the validation set, as many negative pairs (seeded), cosine similarity,
  the best threshold, its accuracy and the ROC AUC (:func:`verification_scores`).
* :class:`ExpressionModule`: backbone -> linear head over the expression classes,
  cross-entropy (optional class weights and label smoothing), validated by accuracy and
  macro F1.

Both write their backbone with :meth:`save_backbone` as ``{"state_dict": {"backbone.<k>": v}}``
(tensors only), which ``create_backbone(name, weights=path)`` and
``AUNet(weights={"face": path, "emotion": path})`` load with every tensor present.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.functional.classification import binary_auroc

from lightning_modules.backbones import create_backbone
from lightning_modules.evaluation import dedupe_by_index, gather_rows
from lightning_modules.metrics import ranked_counts

log = logging.getLogger(__name__)


class ArcMarginHead(nn.Module):
    """Additive angular margin logits (ArcFace): ``s * cos(theta + m)`` for the target class,
    ``s * cos(theta)`` for the others, with features and class weights L2-normalised.

    Where ``theta + m`` would pass pi, ``cos(theta + m)`` stops being monotonic in theta; the
    usual fallback ``cos(theta) - m * sin(m)`` (``th``/``mm``) takes over there, or, with
    ``easy_margin``, the margin is applied only where ``cos(theta) > 0``.

    Without labels (inference) the logits are the plain scaled cosines:

    >>> head = ArcMarginHead(4, 3, scale=10.0, margin=0.0)
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> cos = F.normalize(x) @ F.normalize(head.weight).T
    >>> torch.allclose(head(x, y), 10 * cos, atol=1e-6) and torch.allclose(head(x), 10 * cos, atol=1e-6)
    True
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.5,
                 easy_margin: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ArcMarginHead needs at least one class, got {num_classes}")
        self.in_features, self.num_classes = in_features, num_classes
        self.scale, self.margin, self.easy_margin = float(scale), float(margin), easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)  # cos(theta) <= th  <=>  theta + m >= pi
        self.mm = math.sin(math.pi - margin) * margin

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each feature to each class centre, (B, C)."""
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def apply_margin(self, cosine: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits from cosines, the margin on each row's target class (if labels are given)."""
        if labels is None:
            return self.scale * cosine
        # Clamped for the sine only, so that with margin 0 the target logit is exactly s * cos.
        c = cosine.clamp(-1 + 1e-7, 1 - 1e-7)
        sine = torch.sqrt(1.0 - c * c)
        phi = cosine * self.cos_m - sine * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            phi = torch.where(cosine > 0, phi, cosine)
        else:
            phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        target = F.one_hot(labels.long(), self.num_classes).to(dtype=torch.bool)
        return self.scale * torch.where(target, phi, cosine)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.apply_margin(self.cosine(features), labels)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, easy_margin={self.easy_margin}")


# ----------------------------------------------------------------------------------------------
# Face verification


def verification_pairs(labels: torch.Tensor, seed: int = 0, max_pairs: int | None = 200_000
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for verification: every positive pair (same label, i < j), then as many negative
    pairs (different labels), drawn with ``seed``. Returns ``(i, j, same)``.

    Positive pairs beyond ``max_pairs`` are subsampled (seeded) to bound memory on large
    validation sets; ``None`` keeps them all. Negatives are distinct pairs drawn without
    replacement when they can be enumerated cheaply, else drawn at random (rare repeats).

    >>> i, j, same = verification_pairs(torch.tensor([0, 0, 1, 1, 2]))
    >>> int(same.sum()), int((~same).sum())
    (2, 2)
    >>> bool((labels := torch.tensor([0, 0, 1, 1, 2]))[i[same]].eq(labels[j[same]]).all())
    True
    """
    labels = labels.reshape(-1).cpu()
    n = len(labels)
    g = torch.Generator().manual_seed(int(seed))
    empty = torch.zeros(0, dtype=torch.long)
    if n < 2:
        return empty, empty, torch.zeros(0, dtype=torch.bool)
    # Positives, identity by identity (cheap even with many samples).
    pos_i, pos_j = [], []
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    start = 0
    for c in counts.tolist():
        if c > 1:
            members = order[start:start + c]
            a, b = torch.triu_indices(c, c, offset=1)
            pos_i.append(members[a])
            pos_j.append(members[b])
        start += c
    pi = torch.cat(pos_i) if pos_i else empty
    pj = torch.cat(pos_j) if pos_j else empty
    if max_pairs is not None and len(pi) > max_pairs:
        keep = torch.randperm(len(pi), generator=g)[:max_pairs]
        pi, pj = pi[keep], pj[keep]
    wanted = len(pi)
    total_neg = n * (n - 1) // 2 - sum(int(c) * (int(c) - 1) // 2 for c in counts.tolist())
    if wanted == 0 or total_neg == 0:
        ni = nj = empty
    elif n <= 2048:  # enumerate every negative pair, draw without replacement
        a, b = torch.triu_indices(n, n, offset=1)
        neg = labels[a] != labels[b]
        a, b = a[neg], b[neg]
        keep = torch.randperm(len(a), generator=g)[:wanted]
        ni, nj = a[keep], b[keep]
    else:  # rejection sampling: draw pairs until enough have different labels
        got_i, got_j, have = [], [], 0
        while have < wanted:
            a = torch.randint(n, (2 * (wanted - have) + 16,), generator=g)
            b = torch.randint(n, (2 * (wanted - have) + 16,), generator=g)
            ok = labels[a] != labels[b]
            got_i.append(torch.minimum(a[ok], b[ok]))
            got_j.append(torch.maximum(a[ok], b[ok]))
            have += int(ok.sum())
        ni, nj = torch.cat(got_i)[:wanted], torch.cat(got_j)[:wanted]
    same = torch.cat([torch.ones(len(pi), dtype=torch.bool), torch.zeros(len(ni), dtype=torch.bool)])
    return torch.cat([pi, ni]), torch.cat([pj, nj]), same


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """The threshold (``score >= t`` means "same") with the highest accuracy, scanning every
    distinct score (and one above the largest: "never the same"); ties go to the lowest.
    Returns ``(accuracy, threshold)``.

    >>> best_threshold(torch.tensor([0.9, 0.8, 0.1, 0.3]), torch.tensor([True, True, False, False]))
    (1.0, 0.800000011920929)
    """
    scores = scores.double().reshape(-1).cpu().numpy()
    same = same.bool().reshape(-1).cpu().numpy()
    cut, tp, fp = ranked_counts(scores, same)  # highest threshold first
    negatives = len(same) - int(same.sum())
    # lowest threshold first, then "never the same" (TP = FP = 0)
    correct = np.r_[(tp + negatives - fp)[::-1], negatives]
    best = int(np.argmax(correct))  # first maximum: the lowest threshold
    threshold = float(cut[::-1][best]) if best < len(cut) else float(cut[0]) + 1e-6
    return float(correct[best] / len(same)), threshold


def verification_scores(embeddings: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                        max_pairs: int | None = 200_000) -> dict[str, float] | None:
    """Verification on a labelled set of embeddings: accuracy at the best cosine threshold,
    that threshold, the ROC AUC and the pair counts. ``None`` when there is no positive or no
    negative pair (fewer than two samples of every identity, or a single identity).

    >>> emb = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [0.1, 1.0], [-0.1, 1.0]])
    >>> r = verification_scores(emb, torch.tensor([0, 0, 0, 1, 1]))
    >>> r["accuracy"], r["auc"], r["positive_pairs"], r["negative_pairs"]
    (1.0, 1.0, 4, 4)
    """
    i, j, same = verification_pairs(labels, seed=seed, max_pairs=max_pairs)
    if not same.any() or same.all():
        return None
    emb = F.normalize(embeddings.float().cpu(), dim=1)
    scores = (emb[i] * emb[j]).sum(1)
    accuracy, threshold = best_threshold(scores, same)
    auc = float(binary_auroc(scores, same.long()))
    return {"accuracy": accuracy, "threshold": threshold, "auc": auc,
            "positive_pairs": int(same.sum()), "negative_pairs": int((~same).sum())}


# ----------------------------------------------------------------------------------------------
# The modules


class _BackboneExport:
    """What both pretraining modules share: the backbone's tensors and the checkpoint the AU
    model loads."""

    backbone: nn.Module

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors (parameters and buffers), detached copies on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}

    def save_backbone(self, path: str | Path) -> Path:
        """Write ``{"state_dict": {"backbone.<k>": v}}`` with ``torch.save`` (tensors only, loadable
        with ``weights_only=True``); ``create_backbone(name, weights=path)`` strips ``backbone.``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {f"backbone.{k}": v for k, v in self.backbone_state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"state_dict": state}, tmp)
        tmp.replace(path)
        log.info("backbone (%d tensors) written to %s", len(state), path)
        return path


class FaceRecognitionModule(_BackboneExport, L.LightningModule):
    """Face recognition with an additive angular margin loss; validated by verification.

    Args:
        num_identities: training identities (the datamodule's ``num_classes``).
        backbone: timm ResNet name (the AU model's branch architecture).
        weights: the backbone's starting weights (``None``: random, ``timm``, or a file).
        embedding_dim: size of the face embedding.
        scale, margin: ArcFace's ``s`` and ``m`` (radians).
        easy_margin: apply the margin only where the cosine is positive.
        verification_seed: seed of the negative pairs drawn for validation.
        max_pairs: cap on the positive verification pairs (subsampled beyond it).
        optimizer: from the config, as a class path with its arguments.

    Logs ``train/loss`` and ``train/accuracy`` (arg-max of the cosines, without margin), and per
    validation epoch ``val/verification_accuracy``, ``val/verification_threshold`` and
    ``val/verification_auc``.
    """

    def __init__(self, num_identities: int, backbone: str = "resnet50", weights: str | None = None,
                 embedding_dim: int = 512, scale: float = 30.0, margin: float = 0.5, easy_margin: bool = False,
                 verification_seed: int = 0, max_pairs: int | None = 200_000,
                 optimizer: OptimizerCallable = torch.optim.AdamW):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.backbone, report = create_backbone(backbone, weights)
        self.load_report = str(report) if report else "random initialisation"
        self.embedding = nn.Sequential(nn.Linear(self.backbone.num_features, embedding_dim),
                                       nn.BatchNorm1d(embedding_dim))
        self.head = ArcMarginHead(embedding_dim, num_identities, scale=scale, margin=margin, easy_margin=easy_margin)
        self.optimizer_factory = optimizer
        self.train_accuracy = MulticlassAccuracy(num_identities, average="micro")
        self._val_embeddings: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> L2-normalised embeddings (B, embedding_dim)."""
        return F.normalize(self.embedding(self.backbone(x)), dim=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.embedding(self.backbone(batch["image"]))
        labels = batch["label"]
        cosine = self.head.cosine(features)
        loss = F.cross_entropy(self.head.apply_margin(cosine, labels), labels)
        self.train_accuracy(cosine.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings, self._val_labels, self._val_index = [], [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_embeddings.append(self(batch["image"]).detach())
        self._val_labels.append(batch["label"].detach())
        self._val_index.append(batch["index"].detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val_embeddings:
            return
        rows = {"embedding": torch.cat(self._val_embeddings), "label": torch.cat(self._val_labels),
                "index": torch.cat(self._val_index)}
        self._val_embeddings, self._val_labels, self._val_index = [], [], []
        # every rank's embeddings, without the repeats DistributedSampler pads the set with
        rows = gather_rows(self, rows, self.trainer.world_size)
        _, emb, labels = dedupe_by_index(rows["index"], rows["embedding"], rows["label"])
        result = verification_scores(emb, labels, seed=self.hparams.verification_seed,
                                     max_pairs=self.hparams.max_pairs)
        if result is None:
            if not self.trainer.sanity_checking:
                rank_zero_warn("face verification: the validation set has no positive or no negative pair "
                               "(every identity needs two images, and there must be two identities); "
                               "val/verification_* not logged")
            return
        self.log_dict({"val/verification_accuracy": result["accuracy"],
                       "val/verification_threshold": result["threshold"],
                       "val/verification_auc": result["auc"]}, prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())


class ExpressionModule(_BackboneExport, L.LightningModule):
    """Facial expression recognition: backbone -> linear head, cross-entropy.

    Args:
        num_classes: expression classes (8: neutral and the 7 basic emotions, as SynthAU,
            AffectNet-8; 7 for RAF-DB).
        backbone: timm ResNet name (the AU model's branch architecture).
        weights: the backbone's starting weights (``None``: random, ``timm``, or a file).
        class_weights: per-class weights of the cross-entropy (expression sets are imbalanced).
        label_smoothing: cross-entropy's label smoothing.
        dropout: before the head.
        optimizer: from the config, as a class path with its arguments.

    Logs ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy`` (micro) and
    ``val/f1_macro``.
    """

    def __init__(self, num_classes: int = 8, backbone: str = "resnet50", weights: str | None = None,
                 class_weights: list[float] | None = None, label_smoothing: float = 0.0, dropout: float = 0.0,
                 optimizer: OptimizerCallable = torch.optim.AdamW):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} values for {num_classes} classes")
        self.backbone, report = create_backbone(backbone, weights)
        self.load_report = str(report) if report else "random initialisation"
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32)
                             if class_weights is not None else None)
        self.optimizer_factory = optimizer
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> expression logits (B, num_classes)."""
        return self.head(self.dropout(self.backbone(x)))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=self.class_weights,
                               label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, labels = self(batch["image"]), batch["label"]
        loss = self._loss(logits, labels)
        self.train_accuracy(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels = self(batch["image"]), batch["label"]
        # Plain cross-entropy (no smoothing, no weights): comparable across runs.
        loss = F.cross_entropy(logits, labels)
        self.val_accuracy(logits, labels)
        self.val_f1(logits, labels)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(labels))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(labels))
        self.log("val/f1_macro", self.val_f1, batch_size=len(labels))

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())
