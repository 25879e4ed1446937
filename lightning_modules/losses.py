"""Multilabel AU losses for partially labelled data.

Every loss takes ``logits`` (B, K), ``targets`` (B, K) as 0/1 floats and ``mask`` (B, K) bool,
where ``True`` means "labelled". EmotioNet marks unknown AUs with ``999``; those entries are
``False`` in the mask and must never be read as negatives: they get weight 0 and their target
value is not even looked at (it may be 999 or NaN), so their logits receive zero gradient.

Normalisation rule (the same for all three losses): the loss is the mean of the per-entry
losses over the entries the loss trains on, pooled over all AUs of the batch:

    loss = sum(weight * bce) / sum(weight)

where ``weight`` is the mask for :class:`MaskedBCEWithLogits` and
:class:`FrequencyWeightedBCEWithLogits` (whose ``pos_weight`` scales the positive term, as in
``F.binary_cross_entropy_with_logits``, and does not enter the denominator), and the selective
learning weights for :class:`SelectiveLearningLoss`. Selective learning *resamples* the batch:
a dropped entry is removed and an up-weighted entry counts ``w`` times, so the mean over that
resampled batch divides by ``sum(w)``. This keeps the selective loss on the scale of plain BCE
whatever the amount of dropping (dividing by the labelled count instead would shrink the
gradient of a batch in which most entries were dropped) and makes the three losses comparable
on the same ``lr``. A batch without any labelled (or kept) entry gives 0, never NaN, and that 0
is still connected to ``logits`` so ``loss.backward()`` works.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "FrequencyWeightedBCEWithLogits",
    "MaskedBCEWithLogits",
    "SelectiveLearningLoss",
    "build_loss",
    "prior_target_rate",
    "selective_weights",
]

# |batch rate - target| below this counts as "already at the target": all weights stay 1.
_BALANCED_TOL = 1e-6


def _as_rate(target_rate: float | Sequence[float] | Tensor) -> Tensor:
    """Checked target rate(s) as a float tensor: a scalar or one value per AU, each in (0, 1)."""
    t = torch.as_tensor(target_rate, dtype=torch.get_default_dtype()).detach()
    if t.dim() > 1:
        raise ValueError(f"target_rate must be a scalar or one value per AU, got shape {tuple(t.shape)}")
    bad = ~((t > 0) & (t < 1))  # also catches NaN
    if bool(bad.any()):
        shown = t.tolist() if t.dim() == 0 else t[bad].tolist()
        raise ValueError(f"target_rate must be in (0, 1) (exclusive), got {shown}")
    return t


def prior_target_rate(priors: Sequence[float], floor: float = 1e-3) -> Tensor:
    """Selective learning's per-AU targets taken from the training priors (``target_rate: prior``).

    ``priors`` are each AU's positive share among its labelled training entries. An AU with no
    labelled entry (nan) gets 0.5, and every rate is kept inside ``[floor, 1 - floor]``: an AU that
    is never (or always) positive has no batch with both classes, the only batches where the
    target matters, so the clip changes no weight and keeps the target valid.

    >>> prior_target_rate([0.25, float("nan"), 0.0]).tolist()
    [0.25, 0.5, 0.0010000000474974513]
    """
    t = torch.as_tensor(list(priors), dtype=torch.get_default_dtype())
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"priors must be one rate per AU, got {list(priors)}")
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"priors are positive rates and must be in [0, 1], got {t.tolist()}")
    return torch.nan_to_num(t, nan=0.5).clamp(floor, 1 - floor)


def _check_caps(max_drop: float, max_weight: float | None) -> None:
    if not 0.0 <= max_drop <= 1.0:
        raise ValueError(f"max_drop is a fraction of the majority entries and must be in [0, 1], got {max_drop}")
    if max_weight is not None and not max_weight >= 1.0:  # `not >=` also rejects NaN
        raise ValueError(f"max_weight caps the minority up-weight and must be >= 1 (or None), got {max_weight}")


def _check_inputs(logits: Tensor | None, targets: Tensor, mask: Tensor) -> None:
    if targets.dim() != 2 or mask.shape != targets.shape or (logits is not None and logits.shape != targets.shape):
        shapes = {"targets": tuple(targets.shape), "mask": tuple(mask.shape)}
        if logits is not None:
            shapes["logits"] = tuple(logits.shape)
        raise ValueError(f"expected logits, targets and mask of the same shape (B, K), got {shapes}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = labelled), got {mask.dtype}")


def selective_weights(
    targets: Tensor,
    mask: Tensor,
    target_rate: float | Tensor = 0.5,
    max_drop: float = 1.0,
    max_weight: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-entry weights of selective learning (Hand, Castillo & Chellappa, AAAI 2018).

    Rare AUs would otherwise be learnt as "always absent". Per AU (column) and per batch, among
    the labelled entries, the class over-represented relative to the target rate ``t`` (the
    majority) is randomly thinned out and the minority is up-weighted, so that the weighted
    positive share ``sum(w * y) / sum(w)`` of the kept entries equals ``t``.

    Split between dropping and up-weighting: keep as many majority entries as the minority
    would need at weight 1, ``n_keep = round(m * r)`` with ``m`` the minority count and
    ``r = (1 - t) / t`` (positive minority) or ``t / (1 - t)`` (negative minority); never fewer
    than 1 and never fewer than ``max_drop`` allows (at most ``floor(max_drop * M)`` of the
    ``M`` majority entries are dropped). The minority weight ``w = n_keep / (m * r)`` then
    absorbs the rounding and any shortfall in dropping, which makes the share exact. With
    ``max_weight``, ``w`` is clipped (the share then only moves towards ``t`` as far as the
    caps allow); if rounding ``n_keep`` up would need ``w > max_weight``, one fewer majority
    entry is kept instead when ``max_drop`` permits, which keeps the share exact.

    Which majority entries go is a uniformly random subset: each entry draws a random key
    (from ``generator``, on the generator's device, then moved) and the ``n_keep`` majority
    entries with the smallest keys in their column are kept. This is the same as taking the
    first ``n_keep`` of a random permutation, but for all AUs at once, on any device.

    Special cases: unlabelled entries weigh 0; an AU without labelled entries is all zeros; an
    AU whose labelled entries are all of one class, or whose batch rate already equals ``t``,
    keeps weight 1 on every labelled entry.

    Args:
        targets: (B, K) 0/1 floats; values under ``mask == False`` are ignored (999, NaN...).
        mask: (B, K) bool, True = labelled.
        target_rate: ``t`` in (0, 1), one value or one per AU, shape (K,).
        max_drop: fraction in [0, 1] of the majority entries that may be dropped.
        max_weight: cap (>= 1) on the minority weight; None = no cap.
        generator: source of the random drops (None: the global RNG of ``targets``' device).

    Returns:
        (B, K) float weights without gradient, on ``targets``' device.

    Example (one AU, 1 positive in 5 labelled entries, unlabelled last row):

    >>> y = torch.tensor([[1.], [0.], [0.], [0.], [0.], [999.]])
    >>> m = torch.tensor([[True]] * 5 + [[False]])
    >>> w = selective_weights(y, m, target_rate=0.5, generator=torch.Generator().manual_seed(0))
    >>> w[0].item(), int((w[1:5] == 1).sum()), int((w[1:5] == 0).sum()), w[5].item()
    (1.0, 1, 3, 0.0)
    >>> w[:5, 0] @ y[:5, 0] / w.sum()  # weighted positive share
    tensor(0.5000)
    """
    _check_inputs(None, targets, mask)
    _check_caps(max_drop, max_weight)
    t = _as_rate(target_rate)
    if t.dim() == 1 and t.numel() not in (1, targets.shape[1]):
        raise ValueError(f"target_rate has {t.numel()} values for {targets.shape[1]} AUs")
    return _selective_weights(targets, mask, t, max_drop, max_weight, generator)


@torch.no_grad()
def _selective_weights(targets: Tensor, mask: Tensor, t: Tensor, max_drop: float, max_weight: float | None,
                       generator: torch.Generator | None) -> Tensor:
    """:func:`selective_weights` without argument checks (no host-device sync per step)."""
    device = targets.device
    dtype = torch.promote_types(targets.dtype, torch.float32) if targets.is_floating_point() else torch.float32
    batch, k = targets.shape
    t = t.to(device=device, dtype=dtype).expand(k)

    labelled = mask
    pos = labelled & (targets > 0.5)
    neg = labelled & ~pos
    n_pos = pos.sum(0).to(dtype)
    n_neg = neg.sum(0).to(dtype)
    n = n_pos + n_neg
    rate = n_pos / n.clamp_min(1)

    # AUs to rebalance: both classes present and the batch rate is off target.
    active = (n_pos > 0) & (n_neg > 0) & ((rate - t).abs() > _BALANCED_TOL)
    pos_minority = rate < t
    minority = torch.where(pos_minority, n_pos, n_neg)
    majority = torch.where(pos_minority, n_neg, n_pos)
    # Majority entries per minority entry that give share t at minority weight 1.
    ratio = torch.where(pos_minority, (1 - t) / t, t / (1 - t))
    ideal = minority * ratio  # majority entries to keep at minority weight 1 (< majority when active)

    # Fewest majority entries that may be kept: max_drop's limit, and always at least one.
    droppable = torch.floor(max_drop * majority + 1e-6)  # 1e-6: 0.7 * 10 must floor to 7, not 6
    fewest = (majority - droppable).clamp_min(1)
    n_keep = torch.maximum(torch.round(ideal), fewest).minimum(majority)
    if max_weight is not None:
        # Rounding up would need w > max_weight: keep one fewer (w <= 1) where max_drop allows.
        fallback = torch.maximum(torch.floor(ideal), fewest)
        n_keep = torch.where(n_keep > max_weight * ideal, fallback, n_keep)
    w_minority = n_keep / ideal.clamp_min(torch.finfo(dtype).tiny)
    if max_weight is not None:
        w_minority = w_minority.clamp_max(max_weight)

    # Random subset of the majority: rank majority entries by a random key within their column.
    is_minority = torch.where(pos_minority, pos, neg)
    is_majority = torch.where(pos_minority, neg, pos)
    if generator is not None:
        keys = torch.rand(batch, k, generator=generator, device=generator.device).to(device, non_blocking=True)
    else:
        keys = torch.rand(batch, k, device=device)
    keys = keys.masked_fill(~is_majority, 2.0)  # everything else sorts after the majority
    order = keys.argsort(dim=0)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(batch, device=device).unsqueeze(1).expand(batch, k))
    kept_majority = is_majority & (rank < n_keep)

    balanced = torch.where(is_minority, w_minority, kept_majority.to(dtype))
    return torch.where(active, balanced, labelled.to(dtype))


def _weighted_mean(loss: Tensor, weight: Tensor, denominator: Tensor) -> Tensor:
    """``sum(weight * loss) / denominator``; 0 (still attached to the graph) if the denominator is 0."""
    total = (loss * weight).sum()
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _clean_targets(targets: Tensor, mask: Tensor, like: Tensor) -> Tensor:
    """Targets with unlabelled entries set to 0, so 999/NaN cannot leak into the loss or its gradient."""
    return torch.where(mask, targets.to(like.dtype), torch.zeros((), dtype=like.dtype, device=like.device))


class MaskedBCEWithLogits(nn.Module):
    """Plain BCE over the labelled entries only: ``sum(bce * mask) / max(mask.sum(), 1)``.

    The baseline: unlabelled entries neither count as negatives nor dilute the mean.
    """

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        _check_inputs(logits, targets, mask)
        targets = _clean_targets(targets, mask, logits)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        weight = mask.to(bce.dtype)
        return _weighted_mean(bce, weight, weight.sum())


class FrequencyWeightedBCEWithLogits(nn.Module):
    """BCE over labelled entries with a per-AU weight on the positive term (``pos_weight``).

    Static rebalancing: with ``pos_weight_k = N_k / P_k`` of the training set, positives and
    negatives of each AU contribute equally over an epoch. Normalised like
    ``F.binary_cross_entropy_with_logits(..., pos_weight=...)`` with ``reduction="mean"`` on the
    labelled entries: divided by the number of labelled entries, not by the weights.

    Args:
        pos_weight: one positive weight per AU; None = 1 for every AU (plain masked BCE).
            A persistent buffer: a fitted ``pos_weight`` is saved with the model.
    """

    pos_weight: Tensor | None

    def __init__(self, pos_weight: Sequence[float] | Tensor | None = None):
        super().__init__()
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.get_default_dtype()).detach().clone()
            if pos_weight.dim() != 1:
                raise ValueError(f"pos_weight must have one value per AU, got shape {tuple(pos_weight.shape)}")
            if not bool(torch.isfinite(pos_weight).all() and (pos_weight > 0).all()):
                raise ValueError(f"pos_weight must be positive and finite, got {pos_weight.tolist()}")
        self.register_buffer("pos_weight", pos_weight)

    @classmethod
    def from_labels(cls, labels: Tensor, mask: Tensor, max_weight: float = 100.0) -> "FrequencyWeightedBCEWithLogits":
        """``pos_weight_k = N_k / P_k`` counted over labelled entries, clipped to [1, ``max_weight``].

        Clipping at 1 never down-weights positives of a frequent AU (the minority there is the
        negatives, which this loss cannot up-weight); ``max_weight`` stops a handful of positives
        from dominating. An AU with negatives but no positive gets ``max_weight`` (the limit of
        ``N / P`` as ``P -> 0``, clipped like any other large ratio; it only matters if a positive
        turns up later); an AU with no labelled entry at all gets 1 (nothing is known about it).
        """
        if not max_weight >= 1.0:
            raise ValueError(f"max_weight must be >= 1, got {max_weight}")
        labels = torch.as_tensor(labels)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        _check_inputs(None, labels, mask)
        positive = labels > 0.5
        pos = (mask & positive).sum(0).double()
        neg = (mask & ~positive).sum(0).double()
        ratio = torch.where(pos > 0, neg / pos.clamp_min(1), torch.full_like(pos, max_weight))
        ratio = torch.where(pos + neg > 0, ratio, torch.ones_like(ratio))
        return cls(ratio.clamp(1.0, max_weight).to(torch.get_default_dtype()))

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        _check_inputs(logits, targets, mask)
        if self.pos_weight is not None and self.pos_weight.numel() != logits.shape[1]:
            raise ValueError(f"pos_weight has {self.pos_weight.numel()} values for {logits.shape[1]} AUs")
        targets = _clean_targets(targets, mask, logits)
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=pos_weight)
        weight = mask.to(bce.dtype)
        return _weighted_mean(bce, weight, weight.sum())


class SelectiveLearningLoss(nn.Module):
    """BCE weighted by :func:`selective_weights`, recomputed for every batch.

    Normalised by the sum of the weights (the mean over the resampled batch; see the module
    docstring); 0 when nothing is labelled.

    Args:
        target_rate: target positive share, one value or one per AU, each in (0, 1). Kept as a
            non-persistent buffer: it is configuration (rebuilt from hyperparameters), so a
            checkpoint never overrides a new value nor breaks on a scalar/per-AU change.
        max_drop: fraction of a batch's majority entries that may be dropped, in [0, 1].
        max_weight: cap (>= 1) on the minority up-weight; None = no cap.
        seed: seed of the module's own CPU generator for the random drops (None: random seed).
            The generator's state is not saved in checkpoints.
    """

    target_rate: Tensor

    def __init__(self, target_rate: float | Sequence[float] = 0.5, max_drop: float = 1.0,
                 max_weight: float | None = None, seed: int | None = None):
        super().__init__()
        _check_caps(max_drop, max_weight)
        self.register_buffer("target_rate", _as_rate(target_rate), persistent=False)
        self.max_drop = float(max_drop)
        self.max_weight = None if max_weight is None else float(max_weight)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def extra_repr(self) -> str:
        rate = self.target_rate.tolist()
        return f"target_rate={rate}, max_drop={self.max_drop}, max_weight={self.max_weight}"

    def weights(self, targets: Tensor, mask: Tensor) -> Tensor:
        """This batch's selective weights (advances the generator)."""
        _check_inputs(None, targets, mask)
        if self.target_rate.dim() == 1 and self.target_rate.numel() not in (1, targets.shape[1]):
            raise ValueError(f"target_rate has {self.target_rate.numel()} values for {targets.shape[1]} AUs")
        return _selective_weights(targets, mask, self.target_rate, self.max_drop, self.max_weight, self.generator)

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        _check_inputs(logits, targets, mask)
        weight = self.weights(targets.detach(), mask)
        targets = _clean_targets(targets, mask, logits)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        weight = weight.to(bce.dtype)
        return _weighted_mean(bce, weight, weight.sum())


LOSSES: dict[str, type[nn.Module]] = {
    "bce": MaskedBCEWithLogits,
    "weighted_bce": FrequencyWeightedBCEWithLogits,
    "selective": SelectiveLearningLoss,
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """The loss called ``name`` (``bce``, ``weighted_bce`` or ``selective``) built with ``kwargs``."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None
    return cls(**kwargs)
