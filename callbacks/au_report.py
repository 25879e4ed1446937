"""The per-AU report of a validation: support, threshold (fitted, or the fallback and why), F1 and
accuracy at 0.5 and at the threshold, and with an intensity head ICC(3,1), Pearson correlation and
MAE of the reported intensities, as rows, CSV and Markdown; and the prior predictor's F1, the
figure a model must beat."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from datamodules.io.manifest import au_column_name, positive_rate


def prior_f1(labels: np.ndarray, mask: np.ndarray) -> float:
    """Mean F1 of the prior predictor: a constant score per AU, so at best "always positive"
    (F1 = 2p / (1 + p) at positive rate p). The reference a trained model must beat.

    >>> round(prior_f1(np.array([[1, 0], [0, 0], [0, 1], [0, 1]]), np.ones((4, 2), bool)), 4)  # (0.4 + 0.667) / 2
    0.5333
    """
    p = positive_rate(labels, mask)
    return float(np.nanmean(2 * p / (1 + p)))


INTENSITY_COLUMNS = ("icc", "pcc", "mae")


def au_report(aus, scores_default: dict, scores_fitted: dict, thresholds: np.ndarray,
              fallbacks: dict[str, str] | None = None,
              intensity: dict[str, dict[str, float]] | None = None) -> list[dict]:
    """One row per AU: what the model does at 0.5 and at its threshold; ``threshold_from`` says
    ``fitted`` or, for an AU in ``fallbacks`` (AU name -> reason), why it was not fitted.

    ``intensity`` (a model with an intensity head): per AU name and ``mean``, its ``icc``, ``pcc``
    and ``mae``; they become three more columns (empty for an AU without labelled levels)."""
    fallbacks = fallbacks or {}
    rows = []
    for i, au in enumerate(aus):
        name = au_column_name(au)
        rows.append({
            "AU": name, "support": int(scores_fitted["support"][i]),
            "positives": int(scores_fitted["positives"][i]), "threshold": round(float(thresholds[i]), 4),
            "f1@0.5": _r(scores_default["f1"][i]), "f1@fitted": _r(scores_fitted["f1"][i]),
            "accuracy@0.5": _r(scores_default["accuracy"][i]), "accuracy@fitted": _r(scores_fitted["accuracy"][i]),
            "threshold_from": f"fallback ({fallbacks[name]})" if name in fallbacks else "fitted",
        })
    rows.append({"AU": "mean", "support": sum(r["support"] for r in rows), "positives": sum(r["positives"] for r in rows),
                 "threshold": None, "f1@0.5": _r(scores_default["mean_f1"]), "f1@fitted": _r(scores_fitted["mean_f1"]),
                 "accuracy@0.5": _r(scores_default["mean_accuracy"]),
                 "accuracy@fitted": _r(scores_fitted["mean_accuracy"]),
                 "threshold_from": f"{len(fallbacks)} fell back" if fallbacks else None})
    if intensity is not None:
        for row in rows:
            values = intensity.get(row["AU"], {})
            row.update({key: _r(values.get(key, math.nan)) for key in INTENSITY_COLUMNS})
    return rows


def logged_intensity(metrics: Mapping[str, Any], aus, stage: str = "val") -> dict[str, dict[str, float]] | None:
    """The intensity figures a stage logged (``val/intensity_icc``, ``val/intensity_icc/AU12``, ...)
    as :func:`au_report` takes them; None when it logged none (no intensity head, or no labelled levels)."""
    if f"{stage}/intensity_icc" not in metrics:
        return None
    out: dict[str, dict[str, float]] = {}
    for name in [au_column_name(a) for a in aus] + ["mean"]:
        suffix = "" if name == "mean" else f"/{name}"
        out[name] = {key: float(metrics[f"{stage}/intensity_{key}{suffix}"]) for key in INTENSITY_COLUMNS
                     if f"{stage}/intensity_{key}{suffix}" in metrics}
    return out


def _r(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 4)


def as_csv(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join([",".join(keys)] + [",".join("" if r[k] is None else str(r[k]) for k in keys) for r in rows]) + "\n"


def as_markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
