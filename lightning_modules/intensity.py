"""AU intensity measures: ICC(3,1), Pearson correlation and mean absolute error.

Intensity is coded in FACS levels A-E written as 1-5 (0 = absent); data sets write ``999`` for
an unknown level, which a mask leaves out of every measure. The field reports each measure per
AU and its mean over the AUs.

For one AU, over its n labelled pairs (target t, prediction p), write the centred sums
``v_t = Σ(t - t̄)²``, ``v_p = Σ(p - p̄)²`` and ``c = Σ(t - t̄)(p - p̄)``.

* ICC(3,1) (Shrout & Fleiss 1979: two-way mixed, consistency, single rater), the ground truth
  and the prediction being the k = 2 raters of n targets. From the two-way ANOVA,
  MS_R = SS_R / (n - 1) is the between-target mean square and
  MS_E = SS_E / ((n - 1)(k - 1)) the residual one, and
  ``ICC(3,1) = (MS_R - MS_E) / (MS_R + (k - 1) MS_E)``. With k = 2,
  SS_R = (v_t + v_p + 2c) / 2 and SS_E = (v_t + v_p - 2c) / 2, so ICC(3,1) = 2c / (v_t + v_p).
* PCC = c / sqrt(v_t v_p).
* MAE = Σ|t - p| / n.

So the per-AU sums n, Σt, Σp, Σt², Σp², Σtp and Σ|t - p| (:class:`IntensitySums`) are all
three measures need: :class:`AUIntensityMetrics` keeps only them, as ``sum`` states that DDP
reduces exactly, in float64.

* :func:`intensity_scores` is the pure function (numpy or torch in, numpy out).
* :func:`intensity_sums` and :func:`intensity_scores_from_sums` are its two halves.
* :class:`AUIntensityMetrics` is the torchmetrics version for a LightningModule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torchmetrics
from torchmetrics.utilities import dim_zero_cat

from lightning_modules.evaluation import dedupe_by_index
from lightning_modules.metrics import as_numpy

__all__ = ["IntensitySums", "intensity_sums", "intensity_scores_from_sums", "intensity_scores",
           "AUIntensityMetrics"]

MAX_LEVEL = 5  # FACS level E
# A centred sum of squares at most this fraction of the raw one is taken as 0: the float64
# sums cannot tell a constant column from one that varies this little (Σx² - (Σx)²/n cancels).
_FLAT = 1e-10


@dataclass(frozen=True)
class IntensitySums:
    """Per-AU sufficient statistics of the labelled pairs, each a (K,) float64 tensor."""

    n: torch.Tensor
    t: torch.Tensor  # Σ target
    p: torch.Tensor  # Σ prediction
    tt: torch.Tensor  # Σ target²
    pp: torch.Tensor  # Σ prediction²
    tp: torch.Tensor  # Σ target · prediction
    abs_err: torch.Tensor  # Σ |target - prediction|

    def __add__(self, other: IntensitySums) -> IntensitySums:
        return IntensitySums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _default_mask(target: torch.Tensor) -> torch.Tensor:
    """Labelled = a level 0-5 (so ``999``, ``nan`` and negative codes are unknown)."""
    return (target >= 0) & (target <= MAX_LEVEL)


def _as_2d_tensor(x: Any) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(as_numpy(x)))
    return x.reshape(-1, 1) if x.ndim == 1 else x


def intensity_sums(pred: Any, target: Any, mask: Any = None) -> IntensitySums:
    """The per-AU sums of (N, K) predictions and targets over the labelled entries.

    ``mask`` (N, K) bool, True = labelled; ``None``: labelled where the target is a level 0-5.
    Entries under a False mask may hold anything (``999``, ``nan``, ``inf``): they are replaced,
    not multiplied by 0, so they change nothing. Tensors stay on their device.
    """
    p, t = _as_2d_tensor(pred), _as_2d_tensor(target)
    t = t.to(p.device)
    m = _default_mask(t) if mask is None else _as_2d_tensor(mask).to(device=p.device, dtype=torch.bool)
    if not (p.shape == t.shape == m.shape) or p.ndim != 2:
        raise ValueError(f"pred {tuple(p.shape)}, target {tuple(t.shape)} and mask {tuple(m.shape)} "
                         "must have the same (N, K) shape")
    # float64 before any product: float32 squares summed over many entries lose digits
    p = torch.where(m, p.to(torch.float64), 0.0)
    t = torch.where(m, t.to(torch.float64), 0.0)
    return IntensitySums(n=m.sum(0, dtype=torch.float64), t=t.sum(0), p=p.sum(0), tt=(t * t).sum(0),
                         pp=(p * p).sum(0), tp=(t * p).sum(0), abs_err=(t - p).abs().sum(0))


def _finite_mean(x: np.ndarray) -> float:
    finite = np.isfinite(x)
    return float(x[finite].mean()) if finite.any() else float("nan")


def intensity_scores_from_sums(sums: IntensitySums) -> dict[str, Any]:
    """The measures from per-AU sums (see :func:`intensity_scores` for the keys)."""
    n, st, sp, stt, spp, stp, sabs = (as_numpy(getattr(sums, f.name)).astype(np.float64).reshape(-1)
                                      for f in fields(sums))
    with np.errstate(divide="ignore", invalid="ignore"):
        vt = stt - st * st / n
        vp = spp - sp * sp / n
        cov = stp - st * sp / n
        # a constant column has no variance, whatever the rounding of its sums says
        vt = np.where(vt <= _FLAT * stt, 0.0, vt)
        vp = np.where(vp <= _FLAT * spp, 0.0, vp)
        # |c| <= sqrt(v_t v_p) (Cauchy-Schwarz): c = 0 exactly beside a constant column, |PCC| <= 1
        bound = np.sqrt(vt * vp)
        cov = np.clip(cov, -bound, bound)
        enough = n >= 2
        icc = np.where(enough & (vt + vp > 0), 2 * cov / (vt + vp), np.nan)
        pcc = np.where(enough & (vt > 0) & (vp > 0), cov / bound, np.nan)
        mae = np.where(n > 0, sabs / n, np.nan)
    return {"icc": icc, "pcc": pcc, "mae": mae, "support": np.rint(n).astype(np.int64),
            "mean_icc": _finite_mean(icc), "mean_pcc": _finite_mean(pcc), "mean_mae": _finite_mean(mae)}


def intensity_scores(pred: Any, target: Any, mask: Any = None) -> dict[str, Any]:
    """ICC(3,1), PCC and MAE per AU and averaged, over the labelled entries only.

    Args:
        pred: (N, K) predicted intensities (any float scale; the levels are 0-5).
        target: (N, K) coded levels 0-5.
        mask: (N, K) bool, True = labelled; ``None``: labelled where the target is 0-5.

    Returns a dict: ``icc``, ``pcc``, ``mae`` (K,) float64, ``support`` (K,) labelled entries,
    and the floats ``mean_icc``, ``mean_pcc``, ``mean_mae`` over the AUs where the measure is
    finite (``nan`` if it is nowhere). Which AUs are ``nan``:

    * ``icc``: fewer than 2 labelled entries, or both target and prediction constant
      (MS_R + MS_E = 0). With only one of them constant, ICC(3,1) = 0 (c = 0), as the ANOVA gives.
    * ``pcc``: fewer than 2 labelled entries, or target or prediction constant.
    * ``mae``: no labelled entry.

    Two AUs. AU a: t = [0, 1, 2, 3], p = [0, 1, 2, 4]: t̄ = 1.5, p̄ = 1.75, v_t = 5,
    v_p = 8.75, c = 6.5; SS_R = (5 + 8.75 + 13) / 2 = 13.375, SS_E = (13.75 - 13) / 2 = 0.375,
    MS_R = 13.375 / 3, MS_E = 0.375 / 3, so ICC = (4.4583 - 0.125) / (4.4583 + 0.125)
    = 13 / 13.75 = 0.9455; PCC = 6.5 / sqrt(5 · 8.75) = 0.9827; MAE = 1 / 4.
    AU b, its third level unknown (``999``): t = [2, 2, 2] is constant, p = [1, 3, 2]:
    c = 0, so ICC = 0 and PCC is ``nan``; MAE = (1 + 1 + 0) / 3.

    >>> target = np.array([[0, 2], [1, 2], [2, 999], [3, 2]])
    >>> pred = np.array([[0., 1.], [1., 3.], [2., 0.], [4., 2.]])
    >>> s = intensity_scores(pred, target, target != 999)
    >>> s["icc"].round(4), s["pcc"].round(4), s["mae"].round(4), s["support"]
    (array([0.9455, 0.    ]), array([0.9827,    nan]), array([0.25  , 0.6667]), array([4, 3]))
    >>> round(s["mean_icc"], 4), round(s["mean_pcc"], 4), round(s["mean_mae"], 4)
    (0.4727, 0.9827, 0.4583)
    """
    return intensity_scores_from_sums(intensity_sums(pred, target, mask))


class AUIntensityMetrics(torchmetrics.Metric):
    """AU intensity measures accumulated over batches (DDP-correct through state sync).

    ``update(pred, target, mask)`` adds the labelled entries' :class:`IntensitySums` (float64
    ``sum`` states: constant memory, exact under DDP); ``compute()`` returns the
    :func:`intensity_scores` dict as tensors (``mean_*`` 0-dim).

    With ``dedupe_by_index=True``, ``update`` also takes each sample's ``index`` and the
    metric keeps the per-sample values, so that ``compute`` counts each sample once:
    ``DistributedSampler`` pads the evaluation set with repeats, which plain sums would count
    twice. The scores then equal a single process's on the same predictions.
    """

    is_differentiable = False
    higher_is_better = None  # ICC and PCC are, MAE is not
    full_state_update = False

    def __init__(self, num_aus: int, dedupe_by_index: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_aus = int(num_aus)
        self.dedupe_by_index = dedupe_by_index
        for f in fields(IntensitySums):
            self.add_state(f"sum_{f.name}", default=torch.zeros(self.num_aus, dtype=torch.float64),
                           dist_reduce_fx="sum")
        if dedupe_by_index:
            for name in ("index", "pred", "target", "labelled"):
                self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.ndim != 2 or pred.shape[1] != self.num_aus or target.shape != pred.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be (N, {self.num_aus})")
        target = target.to(pred.device)
        mask = _default_mask(target) if mask is None else torch.as_tensor(mask, device=pred.device).bool()
        if mask.shape != pred.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must be (N, {self.num_aus})")
        if self.dedupe_by_index:
            if index is None:
                raise ValueError("AUIntensityMetrics(dedupe_by_index=True).update needs the samples' index")
            self.index.append(torch.as_tensor(index, device=pred.device).reshape(-1).long())
            self.pred.append(pred)
            self.target.append(target)
            self.labelled.append(mask)
            return
        sums = intensity_sums(pred, target, mask)
        for f in fields(sums):
            state = getattr(self, f"sum_{f.name}")
            state += getattr(sums, f.name)

    def _deduped_sums(self) -> IntensitySums:
        index, pred, target, mask = (dim_zero_cat(getattr(self, n)) for n in ("index", "pred", "target", "labelled"))
        _, pred, target, mask = dedupe_by_index(index, pred, target, mask)
        return intensity_sums(pred, target, mask)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.dedupe_by_index and len(self.index) > 0:
            sums = self._deduped_sums()
        else:
            sums = IntensitySums(*(getattr(self, f"sum_{f.name}") for f in fields(IntensitySums)))
        device = self.sum_n.device
        out = {}
        for key, value in intensity_scores_from_sums(sums).items():
            # float32 like AUMetrics, for the loggers; rounding it adds at most ~1e-7 relative
            dtype = torch.long if key == "support" else torch.float32
            out[key] = torch.as_tensor(value, dtype=dtype, device=device)
        return out
