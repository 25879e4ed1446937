"""EmotioNet Challenge metrics for AU detection.

Per AU, over the *labelled* entries only (``mask`` True; EmotioNet's ``999`` is unlabelled and
never counts): accuracy = (TP + TN) / N and F1 = 2PR / (P + R), with F1 = 0 when TP = 0
(scikit-learn's ``f1_score(zero_division=0)``). The final score is
(mean accuracy + mean F1) / 2 over the AUs; an AU with no labelled entry is reported as ``nan``
and left out of the means.

A decision is positive when ``prob >= threshold`` (one threshold for all AUs, or one per AU).
torchmetrics thresholds with ``>``, so the decisions are made here and torchmetrics only counts
them (``multilabel_stat_scores``, unlabelled entries as its ``ignore_index``).

* :func:`au_confusion` and :func:`au_scores` are pure functions (numpy or torch in, numpy out).
* :class:`AUMetrics` is the torchmetrics version for a LightningModule: it accumulates per-AU
  TP/FP/TN/FN as sum states, so torchmetrics' own state sync makes it exact under DDP.
* :func:`ranked_counts` is the counting behind every curve over thresholds (soft thresholds,
  precision-recall curves, the verification threshold): TP and FP at each distinct score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchmetrics
from torchmetrics.functional.classification import multilabel_stat_scores
from torchmetrics.utilities import dim_zero_cat

from lightning_modules.evaluation import dedupe_by_index

__all__ = ["au_confusion", "au_scores", "scores_from_counts", "ranked_counts", "AUMetrics"]

_UNLABELLED = -1  # the target value torchmetrics is told to ignore
_CONFUSION_ROWS = 1 << 16  # rows au_confusion counts at a time


def as_numpy(x: Any) -> np.ndarray:
    """Tensors (any device, half precision too) or array-likes as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_2d(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1) if x.ndim == 1 else x


def _default_mask(labels: np.ndarray) -> np.ndarray:
    """Labelled = the label is 0 or 1 (so ``999`` and ``nan`` are unlabelled)."""
    return (labels == 0) | (labels == 1)


def au_confusion(probs: Any, labels: Any, mask: Any = None,
                 thresholds: Any = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-AU confusion counts over the labelled entries.

    Args:
        probs: (N, K) probabilities.
        labels: (N, K) labels, positive when > 0.5 (values under a False mask are ignored).
        mask: (N, K) bool, True = labelled. ``None``: labelled where the label is 0 or 1.
        thresholds: a scalar or (K,); decision = ``probs >= thresholds``.

    Returns:
        ``(tp, fp, tn, fn)``, each a (K,) int64 array.
    """
    p = _as_2d(as_numpy(probs))
    y = _as_2d(as_numpy(labels))
    m = _default_mask(y) if mask is None else _as_2d(as_numpy(mask)).astype(bool)
    if not (p.shape == y.shape == m.shape):
        raise ValueError(f"probs {p.shape}, labels {y.shape} and mask {m.shape} must have the same (N, K) shape")
    thresholds = _as_tensor(as_numpy(thresholds))
    total = None
    # A block of rows at a time (counts add up): the decisions and torchmetrics' counting hold
    # about 27 bytes per entry, 600 MB for 1M rows of 23 AUs at once.
    for i in range(0, max(len(p), 1), _CONFUSION_ROWS):
        rows = slice(i, i + _CONFUSION_ROWS)
        decisions = _decisions(_as_tensor(p[rows]), thresholds)
        counts = _count(decisions, torch.from_numpy(y[rows] > 0.5), torch.from_numpy(m[rows]))
        total = counts if total is None else tuple(a + b for a, b in zip(total, counts))
    return tuple(c.numpy() for c in total)


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory where torch can."""
    if not x.flags.writeable or any(s < 0 for s in x.strides):
        x = x.copy()  # torch wraps neither read-only nor negatively strided arrays
    return torch.from_numpy(x)


def _decisions(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``probs >= thresholds`` for (N, K) probabilities and a scalar or (K,) thresholds."""
    k = probs.shape[1]
    if not thresholds.is_floating_point():
        thresholds = thresholds.float()
    if thresholds.ndim > 1 or (thresholds.ndim == 1 and thresholds.shape[0] != k):
        raise ValueError(f"thresholds must be a scalar or have shape ({k},), got {tuple(thresholds.shape)}")
    # compare in the wider dtype so that a threshold taken from the probabilities is not rounded
    dtype = torch.promote_types(probs.dtype, thresholds.dtype) if probs.is_floating_point() else thresholds.dtype
    return probs.to(dtype) >= thresholds.to(device=probs.device, dtype=dtype)


def _count(decisions: torch.Tensor, positive: torch.Tensor, labelled: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-AU ``(tp, fp, tn, fn)``, each (K,) int64, over the labelled entries of (N, K) bool tensors."""
    target = torch.where(labelled, positive.to(torch.int8), _UNLABELLED)
    # Integer predictions are taken as decisions (floats torchmetrics would threshold with >).
    # Laid out as one (1, K, N) "sample" whose extra dimension holds the N entries, the counts
    # are sums along contiguous memory (about 1.5x faster than (N, K)); int8 keeps the passes
    # small. Our inputs are well-formed; torchmetrics' validation would also refuse K = 1.
    stats = multilabel_stat_scores(_entries_last(decisions.to(torch.int8)), _entries_last(target),
                                   num_labels=decisions.shape[1], average=None, ignore_index=_UNLABELLED,
                                   validate_args=False)
    tp, fp, tn, fn = stats.reshape(-1, 5)[:, :4].unbind(1)  # (K, 5): tp, fp, tn, fn, support; K = 1 comes squeezed
    return tp, fp, tn, fn


def _entries_last(x: torch.Tensor) -> torch.Tensor:
    return x.T.contiguous().unsqueeze(0)


def scores_from_counts(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, Any]:
    """The challenge scores from per-AU confusion counts (see :func:`au_scores` for the keys)."""
    tp, fp, tn, fn = (as_numpy(c).astype(np.int64) for c in (tp, fp, tn, fn))
    support = tp + fp + tn + fn
    positives = tp + fn
    labelled = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(labelled, (tp + tn) / np.maximum(support, 1), np.nan)
        precision = np.where(labelled, np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0), np.nan)
        recall = np.where(labelled, np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0), np.nan)
        # 2PR/(P+R) == 2TP/(2TP+FP+FN); 0 when TP == 0 (zero_division=0)
        f1 = np.where(labelled, np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0), np.nan)
    if labelled.any():
        mean_f1 = float(f1[labelled].mean())
        mean_accuracy = float(accuracy[labelled].mean())
        score = (mean_f1 + mean_accuracy) / 2
        # Micro-F1: every labelled (frame, AU) decision pooled before F1 (scikit-learn's
        # average="micro" on a multilabel matrix), which frequent AUs dominate and rare ones
        # move little: reported beside the mean of per-AU F1 (Hinduja et al. 2024).
        pooled = 2 * tp[labelled].sum() + fp[labelled].sum() + fn[labelled].sum()
        micro_f1 = float(2 * tp[labelled].sum() / pooled) if pooled else 0.0
    else:
        mean_f1 = mean_accuracy = score = micro_f1 = float("nan")
    return {"f1": f1, "accuracy": accuracy, "precision": precision, "recall": recall,
            "support": support, "positives": positives,
            "mean_f1": mean_f1, "mean_accuracy": mean_accuracy, "score": score, "micro_f1": micro_f1}


def au_scores(probs: Any, labels: Any, mask: Any = None, thresholds: Any = 0.5) -> dict[str, Any]:
    """EmotioNet Challenge scores per AU and overall, over the labelled entries only.

    Returns a dict: ``f1``, ``accuracy``, ``precision``, ``recall`` (K,) float (``nan`` for an
    AU with no labelled entry), ``support`` (K,) labelled entries, ``positives`` (K,) labelled
    positives, and the floats ``mean_f1``, ``mean_accuracy`` (over AUs with a labelled entry)
    and ``score`` = (mean_accuracy + mean_f1) / 2, and ``micro_f1``: F1 of all labelled
    decisions pooled, 2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN)).

    Two AUs, four samples, one unlabelled entry (EmotioNet's ``999``). AU a: decisions
    [1, 0, 0, 0] vs labels [1, 1, 0, 0]: TP=1, FN=1, TN=2, so accuracy 3/4, P=1, R=1/2,
    F1=2/3. AU b (3 labelled): decisions [0, 1, 1] vs [0, 1, 0]: TP=1, FP=1, TN=1, so
    accuracy 2/3, P=1/2, R=1, F1=2/3. Score = ((3/4 + 2/3)/2 + 2/3) / 2 = 0.6875.

    >>> probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.3, 0.6], [0.2, 0.8]])
    >>> labels = np.array([[1, 0], [1, 1], [0, 0], [0, 999]])
    >>> s = au_scores(probs, labels, labels != 999)
    >>> s["accuracy"].round(4), s["f1"].round(4), s["support"]
    (array([0.75  , 0.6667]), array([0.6667, 0.6667]), array([4, 3]))
    >>> s["precision"], s["recall"]
    (array([1. , 0.5]), array([0.5, 1. ]))
    >>> round(s["mean_accuracy"], 4), round(s["mean_f1"], 4), s["score"]
    (0.7083, 0.6667, 0.6875)

    Pooled, TP=2, FP=1, FN=1: micro-F1 = 4 / (4 + 1 + 1):

    >>> round(s["micro_f1"], 4)
    0.6667

    At per-AU thresholds (0.95 for a predicts nothing: F1 = 0 by zero_division=0):

    >>> au_scores(probs, labels, labels != 999, thresholds=[0.95, 0.65])["f1"]
    array([0., 1.])
    """
    return scores_from_counts(*au_confusion(probs, labels, mask, thresholds))


def ranked_counts(scores: Any, positive: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every threshold worth trying on one score per entry, with its cumulative counts.

    The thresholds are the distinct scores, highest first (in the scores' dtype); at each one the
    decision ``score >= threshold`` takes in every entry down to it, so tied scores are one
    candidate. Sorting once gives all the counts as cumulative sums.

    Returns ``(thresholds, tp, fp)``: TP and FP (int64) of ``score >= thresholds[i]``. FN and
    TN follow from the totals: ``positives - tp`` and ``negatives - fp``.

    >>> ranked_counts(np.array([0.3, 0.9, 0.8, 0.8, 0.1]), np.array([1, 1, 1, 0, 0]))
    (array([0.9, 0.8, 0.3, 0.1]), array([1, 2, 3, 3]), array([0, 1, 1, 2]))
    """
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(positive).reshape(-1).astype(bool)
    if _ties_interchangeable(s):
        return _ranked_counts_by_search(s, y)
    # highest first, ties in file order; a float NaN after every number. Other types sort by the
    # rank of their value: negating bool raises, and unsigned or a signed type's minimum wrap
    key = -s if np.issubdtype(s.dtype, np.floating) else -np.unique(s, return_inverse=True)[1].reshape(-1)
    order = np.argsort(key, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y, dtype=np.int64)
    fp = np.arange(1, s.size + 1, dtype=np.int64) - tp
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])[:s.size]  # the last entry of each run of ties
    return s[last], tp[last], fp[last]


def _ties_interchangeable(s: np.ndarray) -> bool:
    """Whether the order among equal scores cannot show in :func:`ranked_counts`' result: float
    scores with no NaN (each NaN is a run of its own, counted in file order) and no zero of both
    signs (the run's reported value would take the sign of its last entry)."""
    if not np.issubdtype(s.dtype, np.floating) or np.isnan(s).any():
        return False
    zero_signs = np.signbit(s[s == 0])
    return not (zero_signs.any() and not zero_signs.all())


def _ranked_counts_by_search(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`ranked_counts` from sorted values instead of an argsort and gathers: the same
    arrays, about 5x faster at 1M scores (sorting values is SIMD-fast; gathering by a random
    order misses the cache once the arrays outgrow it)."""
    ascending = np.sort(s)
    starts = np.flatnonzero(np.r_[True, ascending[1:] != ascending[:-1]])[:s.size]  # each run of ties' first entry
    values = ascending[starts]
    # positives per distinct value (each positive's value is one of them), summed from the top
    per_value = np.bincount(np.searchsorted(values, np.sort(s[y])), minlength=values.size)
    tp = np.cumsum(per_value[::-1], dtype=np.int64)
    at_or_above = (s.size - starts[::-1]).astype(np.int64)
    return values[::-1], tp, at_or_above - tp


class AUMetrics(torchmetrics.Metric):
    """EmotioNet Challenge metrics accumulated over batches (DDP-correct through state sync).

    ``update(probs, labels, mask, thresholds=None)`` adds per-AU TP/FP/TN/FN over the labelled
    entries (``thresholds`` None: the constructor's ``threshold``); ``compute()`` returns the
    :func:`au_scores` dict as tensors (``mean_f1``, ``mean_accuracy``, ``score`` 0-dim).

    With ``dedupe_by_index=True``, ``update`` also takes each sample's ``index`` and the
    metric keeps per-sample decisions, so that ``compute`` counts each sample once: under DDP,
    ``DistributedSampler`` pads the evaluation set with repeats, which plain sums would count
    twice. The scores then equal a single process's on the same predictions.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_aus: int, threshold: float = 0.5, dedupe_by_index: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_aus = int(num_aus)
        self.threshold = float(threshold)
        self.dedupe_by_index = dedupe_by_index
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.zeros(self.num_aus, dtype=torch.long), dist_reduce_fx="sum")
        if dedupe_by_index:
            for name in ("index", "pred", "pos", "labelled"):
                self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
               thresholds: Any = None, index: torch.Tensor | None = None) -> None:
        probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
        if probs.ndim != 2 or probs.shape[1] != self.num_aus or labels.shape != probs.shape:
            raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} must be (N, {self.num_aus})")
        labels = labels.to(probs.device)
        if mask is None:
            mask = (labels == 0) | (labels == 1)
        mask = torch.as_tensor(mask, device=probs.device).bool()
        if mask.shape != probs.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must be (N, {self.num_aus})")
        thr = torch.as_tensor(self.threshold if thresholds is None else thresholds, device=probs.device)
        pred = _decisions(probs, thr)
        pos = labels > 0.5
        if self.dedupe_by_index:
            if index is None:
                raise ValueError("AUMetrics(dedupe_by_index=True).update needs the samples' index")
            self.index.append(torch.as_tensor(index, device=probs.device).reshape(-1).long())
            self.pred.append(pred)
            self.pos.append(pos)
            self.labelled.append(mask)
            return
        tp, fp, tn, fn = _count(pred, pos, mask)
        self.tp += tp
        self.fp += fp
        self.tn += tn
        self.fn += fn

    def _deduped_counts(self) -> tuple[torch.Tensor, ...]:
        index, pred, pos, mask = (dim_zero_cat(getattr(self, n)) for n in ("index", "pred", "pos", "labelled"))
        _, pred, pos, mask = dedupe_by_index(index, pred, pos, mask)
        return _count(pred, pos, mask)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.dedupe_by_index and len(self.index) > 0:
            scores = scores_from_counts(*self._deduped_counts())
        else:
            scores = scores_from_counts(self.tp, self.fp, self.tn, self.fn)
        device = self.tp.device
        out = {}
        for key, value in scores.items():
            if key in ("support", "positives"):
                out[key] = torch.as_tensor(value, dtype=torch.long, device=device)
            else:
                out[key] = torch.as_tensor(value, dtype=torch.float32, device=device)
        return out
