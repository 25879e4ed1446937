"""The rows of the ablation: what the AU model is trained with in each, and what the paper reports.

A row is the demo's training with a few config changes (:meth:`Row.overrides`); the keys and what
each row adds are tabled in :mod:`experiments.ablation`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Table 2 of the seed paper (EmotioNet 2020 validation): Acc, F1, Avg.
PAPER_TABLE2 = {
    "face": (0.921, 0.384, 0.652),
    "emotion": (0.925, 0.429, 0.677),
    "dual": (0.925, 0.494, 0.710),
    "align": (0.927, 0.527, 0.727),
    "balanced": (0.915, 0.552, 0.734),
}
METRICS = ("accuracy", "f1", "avg")  # as the paper reports them, at each row's own decision rule
# F1 at the fitted thresholds whatever the row: how good the scores are, apart from the decision
# rule (a short run without soft thresholds may decide almost nothing positive at 0.5).
COLUMNS = METRICS + ("f1_fitted",)


@dataclass(frozen=True)
class Row:
    """One row of the ablation: what the AU model is trained with."""

    key: str
    label: str
    branches: tuple[str, ...] = ("face", "emotion")
    align: bool = True
    sampling: bool = False
    selective: bool = False
    thresholds: bool = False
    pretrained: bool = True
    source: str | None = None  # evaluated from another row's model instead of trained

    def overrides(self, weights: dict[str, str]) -> dict[str, Any]:
        """What this row changes in the AU config."""
        return {
            "model.branches": list(self.branches),
            "model.face_weights": weights.get("face") if self.pretrained and "face" in self.branches else None,
            "model.emotion_weights": weights.get("emotion") if self.pretrained and "emotion" in self.branches else None,
            "model.loss": "selective" if self.selective else "bce",
            "data.balanced_sampling": self.sampling,
            "data.alignment.method": "mtcnn" if self.align else "center",
            # Without soft thresholds the run is judged, and its checkpoint chosen, at 0.5.
            "checkpoint.monitor": "val/score_heldout" if self.thresholds else "val/score",
        }


ROWS = (
    Row("face", "F_face", branches=("face",), align=False),
    Row("emotion", "F_emotion", branches=("emotion",), align=False),
    Row("dual", "F_face + F_emotion", align=False),
    Row("align", "Align + F_face + F_emotion"),
    Row("balanced", "Align + F_face + F_emotion + balancing", sampling=True, selective=True, thresholds=True),
    Row("scratch", "Align + dual + balancing, no transfer (random branches)", sampling=True, selective=True,
        thresholds=True, pretrained=False),
    Row("sampling", "Align + dual + balanced sampling only", sampling=True),
    Row("selective", "Align + dual + selective learning only", selective=True),
    Row("thresholds", "Align + dual + soft thresholds only", thresholds=True, source="align"),
    # The branch comparison again, aligned: without alignment a small face in a scene's center
    # crop may carry too little signal for any branch to show.
    Row("face_align", "Align + F_face", branches=("face",)),
    Row("emotion_align", "Align + F_emotion", branches=("emotion",)),
)
ROW_BY_KEY = {r.key: r for r in ROWS}
# (claim, better row, worse row, metrics): the orderings the paper's Table 2 argues for.
ORDERINGS = (
    ("transfer over scratch", "balanced", "scratch", ("avg", "f1_fitted")),
    ("dual over F_face", "dual", "face", ("avg", "f1_fitted")),
    ("dual over F_emotion", "dual", "emotion", ("avg", "f1_fitted")),
    ("dual over F_face, aligned", "align", "face_align", ("avg", "f1_fitted")),
    ("dual over F_emotion, aligned", "align", "emotion_align", ("avg", "f1_fitted")),
    ("aligned over unaligned", "align", "dual", ("avg", "f1_fitted")),
    ("balancing raises mean F1", "balanced", "align", ("f1",)),
)


def row_metrics(metrics: dict[str, float], thresholds: bool) -> dict[str, float]:
    """A row's Acc, F1 and Avg from its test metrics: at the fitted thresholds or at 0.5.

    >>> row_metrics({"test/accuracy": 0.9, "test/f1": 0.5, "test/accuracy_default": 0.8, "test/f1_default": 0.4}, False)
    {'accuracy': 0.8, 'f1': 0.4, 'avg': 0.6000000000000001}
    """
    suffix = "" if thresholds else "_default"
    acc, f1 = float(metrics[f"test/accuracy{suffix}"]), float(metrics[f"test/f1{suffix}"])
    return {"accuracy": acc, "f1": f1, "avg": (acc + f1) / 2}
