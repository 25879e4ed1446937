"""Evaluation outputs of every rank as one set.

Under DDP each rank sees its own share of the evaluation set, and ``DistributedSampler`` pads the
shares to equal length by repeating samples. Metrics that need the whole set (fitted thresholds,
verification pairs, de-duplicated AU counts) therefore gather every rank's rows
(:func:`gather_rows`) and keep one row per sample index (:func:`dedupe_by_index`), so that they
equal a single process's result on the same predictions.

Two records carry a validation's results between the parts that make and report them:
:class:`ValidationBatch` is what the AU detector's ``validation_step`` returns, and
:class:`ThresholdFit` is one validation's fitted thresholds with the predictions and scores behind
them, made once by the soft-threshold callback and kept on the module for whoever reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch

from datamodules.io.manifest import au_column_name

__all__ = ["ThresholdFit", "ValidationBatch", "dedupe_by_index", "gather_rows"]


class ValidationBatch(NamedTuple):
    """One validation batch's predictions, as ``validation_step`` returns them."""

    probs: torch.Tensor  # (B, K) probabilities
    labels: torch.Tensor  # (B, K), positive when > 0.5
    mask: torch.Tensor  # (B, K) bool, True = labelled
    index: torch.Tensor  # (B,) each sample's position in the validation set


@dataclass(frozen=True, eq=False)
class ThresholdFit:
    """One validation's per-AU thresholds and what they score.

    The predictions are those of every rank, each sample once, ordered by index. Scores are
    :func:`~lightning_modules.metrics.au_scores` dicts: at 0.5 (``at_default``), at the fitted
    thresholds on the samples they were fitted on (``fitted``, optimistic) and with each half of
    the samples decided at thresholds fitted on the other half (``heldout``). AUs with fewer
    than ``min_positives`` labelled positives were not fitted but given the ``fallback`` rule's
    threshold (:attr:`fell_back`).
    """

    criterion: str
    aus: tuple[int, ...]
    probs: np.ndarray  # (N, K)
    labels: np.ndarray  # (N, K)
    mask: np.ndarray  # (N, K) bool
    index: np.ndarray  # (N,)
    thresholds: np.ndarray  # (K,)
    at_default: dict
    fitted: dict
    heldout: dict
    positives: np.ndarray  # (K,) labelled positives of each AU
    min_positives: int = 0
    fallback: str = "shrink"

    @property
    def fell_back(self) -> np.ndarray:
        """(K,) bool: the AUs whose threshold is the fallback's, not fitted."""
        return np.asarray(self.positives) < self.min_positives

    def fallback_reasons(self) -> dict[str, str]:
        """Why each AU that fell back did, by AU name, e.g. ``{"AU56": "3 positives < 10"}``."""
        rule = "0.5" if self.fallback == "default" else "shrunk toward 0.5"
        return {au_column_name(au): f"{int(n)} validation positives < {self.min_positives}: {rule}"
                for au, n, low in zip(self.aus, self.positives, self.fell_back) if low}

    def metrics(self, per_au: bool = True) -> dict[str, float]:
        """The validation figures it gives: ``val/{f1,accuracy,score}_{fitted,heldout}`` and, with
        ``per_au``, ``val/f1_fitted/AU<n>`` (AUs with labelled entries) and ``val/threshold/AU<n>``."""
        out = {}
        for kind, scores in (("fitted", self.fitted), ("heldout", self.heldout)):
            out |= {f"val/f1_{kind}": float(scores["mean_f1"]), f"val/accuracy_{kind}": float(scores["mean_accuracy"]),
                    f"val/score_{kind}": float(scores["score"])}
        out["val/threshold_fallbacks"] = float(self.fell_back.sum())
        if per_au:
            for i, au in enumerate(self.aus):
                if np.isfinite(self.fitted["f1"][i]):
                    out[f"val/f1_fitted/{au_column_name(au)}"] = float(self.fitted["f1"][i])
                out[f"val/threshold/{au_column_name(au)}"] = float(self.thresholds[i])
        return out


def dedupe_by_index(index: Any, *arrays: Any) -> tuple:
    """Keep the first occurrence of each sample index; return ``(index, *arrays)`` ordered by index.

    ``DistributedSampler`` pads the evaluation set by repeating samples so that every rank gets
    the same number; the gathered outputs must drop the repeats. Works on numpy arrays and torch
    tensors (each output has its input's type, tensors stay on their device).

    >>> dedupe_by_index(np.array([2, 0, 1, 2]), np.array([20., 0., 10., 21.]))
    (array([0, 1, 2]), array([ 0., 10., 20.]))
    >>> dedupe_by_index(torch.tensor([3, 1, 3]), torch.tensor([30., 10., 31.]))
    (tensor([1, 3]), tensor([10., 30.]))
    """
    is_tensor = isinstance(index, torch.Tensor)
    idx = (index.detach().cpu().numpy() if is_tensor else np.asarray(index)).reshape(-1)
    unique, first = np.unique(idx, return_index=True)  # first: where each index occurs first
    out: list[Any] = [torch.as_tensor(unique, device=index.device) if is_tensor else unique]
    for a in arrays:
        if len(a) != len(idx):
            raise ValueError(f"array of length {len(a)} does not match the index's {len(idx)}")
        if isinstance(a, torch.Tensor):
            out.append(a[torch.as_tensor(first, device=a.device)])
        else:
            out.append(np.asarray(a)[first])
    return tuple(out)


def gather_rows(module: pl.LightningModule, rows: dict[str, torch.Tensor],
                world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's rows, rank by rank, on the CPU; ranks may hold different numbers of rows.

    ``rows`` maps names to tensors that share their first dimension (one row per sample).
    ``all_gather`` needs equal shapes, so each rank pads to the longest count and the padding is
    cut off again; bool tensors travel as uint8, which every backend gathers.
    """
    counts = {len(v) for v in rows.values()}
    if len(counts) != 1:
        raise ValueError(f"gather_rows needs one row per sample in every tensor, got lengths {sorted(counts)}")
    if world_size <= 1:
        return {k: v.cpu() for k, v in rows.items()}
    n = counts.pop()
    sizes = module.all_gather(torch.tensor([n], dtype=torch.long))
    sizes = [int(s) for s in torch.as_tensor(sizes).reshape(-1).cpu()]
    longest = max(sizes)
    padded = {k: _sendable(v) for k, v in rows.items()}
    padded = {k: torch.cat([v, v.new_zeros((longest - n, *v.shape[1:]))]) for k, v in padded.items()}
    gathered = module.all_gather(padded)  # each (world, longest, ...)
    return {k: torch.cat([v.cpu()[r, :sizes[r]] for r in range(len(sizes))]).to(rows[k].dtype)
            for k, v in gathered.items()}


def _sendable(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
