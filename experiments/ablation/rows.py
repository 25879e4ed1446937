"""The rows of the ablation: what the AU model is trained with in each, and what the paper reports.

A row is the demo's training with a few config changes (:meth:`Row.overrides`); the keys and what
each row adds are tabled in :mod:`experiments.ablation.run`'s docstring.
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
# Table 1 of the seed paper, "preliminary backbone selection": Acc, F1, Avg.
PAPER_TABLE1 = {
    "resnet18": (0.901, 0.364, 0.633),
    "resnet50": (0.905, 0.409, 0.657),
    "resnet152": (0.905, 0.474, 0.690),
}
PAPER = {**PAPER_TABLE2, **PAPER_TABLE1}
# Test figures of every row, at 0.5 and at the thresholds fitted on validation: rows are only ever
# compared at the same kind of threshold.
AT_HALF = ("accuracy", "f1", "avg")
AT_FITTED = ("accuracy_fitted", "f1_fitted", "avg_fitted")
COLUMNS = AT_HALF + AT_FITTED
METRICS = COLUMNS


def threshold_kind(metric: str) -> str:
    return "at fitted thresholds" if metric.endswith("_fitted") else "at 0.5"


@dataclass(frozen=True)
class Row:
    """One row of the ablation: what the AU model is trained with."""

    key: str
    label: str
    branches: tuple[str, ...] = ("face", "emotion")
    crop: str = "mtcnn"  # alignment.method: mtcnn (landmark warp), box (detected box) or center
    sampling: bool = False
    selective: bool = False
    target: str | float = 0.5  # selective learning's target_rate: a number or "prior"
    thresholds: bool = False
    pretrained: bool = True
    backbone: str | None = None  # None: the AU config's
    orthogonality: float = 0.0
    intensity: bool | None = None  # the intensity head: None when the data has levels, False: occurrence only
    intensity_detach: bool = False  # the head trained on the features without changing them

    def overrides(self, weights: dict[str, str]) -> dict[str, Any]:
        """What this row changes in the AU config."""
        changes = {
            "model.branches": list(self.branches),
            "model.face_weights": weights.get("face") if self.pretrained and "face" in self.branches else None,
            "model.emotion_weights": weights.get("emotion") if self.pretrained and "emotion" in self.branches else None,
            "model.loss": "selective" if self.selective else "bce",
            "model.target_rate": self.target,
            "model.orthogonality": self.orthogonality,
            "data.balanced_sampling": self.sampling,
            "data.alignment.method": self.crop,
            # Without soft thresholds the run is judged, and its checkpoint chosen, at 0.5; with
            # them, by thresholds fitted on one half of validation and scored on the other.
            "checkpoint.monitor": "val/score_heldout" if self.thresholds else "val/score",
            "model.intensity": self.intensity,
            "model.intensity_detach": self.intensity_detach,
        }
        if self.backbone:
            changes["model.backbone"] = self.backbone
        return changes


BALANCED = {"sampling": True, "selective": True, "thresholds": True}
ROWS = (
    # Table 2, built up. Unaligned rows crop the detected face box (what a pipeline without
    # landmark alignment does); dual_center crops the scene's middle instead, without detection.
    Row("face", "F_face", branches=("face",), crop="box"),
    Row("emotion", "F_emotion", branches=("emotion",), crop="box"),
    Row("dual", "F_face + F_emotion", crop="box"),
    Row("dual_center", "F_face + F_emotion, scene center crop", crop="center"),
    Row("align", "Align + F_face + F_emotion"),
    Row("balanced", "Align + F_face + F_emotion + balancing", **BALANCED),
    # The balancing breakdown: one strategy at a time, and selective learning's two targets.
    Row("balanced_prior", "... + balancing, selective target = prior", target="prior", **BALANCED),
    Row("sampling", "Align + dual + balanced sampling only", sampling=True),
    Row("selective", "Align + dual + selective learning only (target 0.5)", selective=True),
    Row("selective_prior", "Align + dual + selective learning only (target prior)", selective=True, target="prior"),
    Row("scratch", "Align + dual + balancing, no transfer (random branches)", pretrained=False, **BALANCED),
    Row("decorrelated", "... + balancing + decorrelated branches (orthogonality 0.1)", orthogonality=0.1,
        **BALANCED),
    # The main job's method (demo.yaml: sampling and soft thresholds, plain BCE) with and without the
    # intensity head: what joint training with intensities does to occurrence F1 (data with levels).
    Row("joint", "Align + dual + sampling + thresholds, intensity head (the demo's method)", sampling=True,
        thresholds=True),
    Row("occurrence", "... the same, occurrence only (no intensity head)", sampling=True, thresholds=True,
        intensity=False),
    Row("detached", "... the same, intensity head on detached features", sampling=True, thresholds=True,
        intensity_detach=True),
    # The branch comparison again, aligned.
    Row("face_align", "Align + F_face", branches=("face",)),
    Row("emotion_align", "Align + F_emotion", branches=("emotion",)),
    # Table 1, preliminary backbone selection: one branch from random weights, aligned, with balanced
    # sampling (from random weights at a CPU budget, without it every depth stays at always-negative).
    Row("resnet18", "ResNet-18", branches=("face",), pretrained=False, backbone="resnet18", sampling=True),
    Row("resnet50", "ResNet-50", branches=("face",), pretrained=False, backbone="resnet50", sampling=True),
    Row("resnet152", "ResNet-152", branches=("face",), pretrained=False, backbone="resnet152", sampling=True),
)
ROW_BY_KEY = {r.key: r for r in ROWS}
TABLE2_ROWS = [r.key for r in ROWS if r.backbone is None]
# (claim, better row, worse row, metrics): the paper's orderings, each at one kind of threshold.
ORDERINGS = (
    ("transfer over scratch", "balanced", "scratch", ("f1_fitted", "avg_fitted")),
    ("dual over F_face", "dual", "face", ("f1", "f1_fitted")),
    ("dual over F_emotion", "dual", "emotion", ("f1", "f1_fitted")),
    ("dual over F_face, aligned", "align", "face_align", ("f1", "f1_fitted")),
    ("dual over F_emotion, aligned", "align", "emotion_align", ("f1", "f1_fitted")),
    ("landmark alignment over the face box", "align", "dual", ("f1", "f1_fitted")),
    ("the face box over the scene's center", "dual", "dual_center", ("f1", "f1_fitted")),
    ("balancing raises mean F1", "balanced", "align", ("f1", "f1_fitted")),
    ("balancing raises Avg", "balanced", "align", ("avg", "avg_fitted")),
    ("prior target over 0.5, selective learning alone", "selective_prior", "selective", ("f1", "f1_fitted")),
    ("prior target over 0.5, with sampling and thresholds", "balanced_prior", "balanced", ("f1", "f1_fitted")),
    ("decorrelated branches over plain", "decorrelated", "balanced", ("f1_fitted",)),
    ("ResNet-50 over ResNet-18", "resnet50", "resnet18", ("f1", "avg")),
    ("ResNet-152 over ResNet-50", "resnet152", "resnet50", ("f1", "avg")),
)
# (what is added, row without it, row with it): the per-AU analysis.
STRATEGIES = (
    ("balanced sampling", "align", "sampling"),
    ("selective learning, target 0.5", "align", "selective"),
    ("selective learning, prior target", "align", "selective_prior"),
    ("prior target instead of 0.5, with sampling", "balanced", "balanced_prior"),
    ("all three balancing strategies", "align", "balanced"),
    ("transfer (pretrained branches)", "scratch", "balanced"),
    ("landmark alignment (vs the face box)", "dual", "align"),
    ("intensity head, trained jointly", "occurrence", "joint"),
    ("intensity head on detached features", "occurrence", "detached"),
)


def row_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A row's Acc, F1 and Avg from its test metrics, at 0.5 and at the fitted thresholds.

    >>> row_metrics({"test/accuracy": 0.9, "test/f1": 0.5, "test/accuracy_default": 0.8, "test/f1_default": 0.4})
    {'accuracy': 0.8, 'f1': 0.4, 'avg': 0.6000000000000001, 'accuracy_fitted': 0.9, 'f1_fitted': 0.5, 'avg_fitted': 0.7}
    """
    out = {}
    for suffix, label in (("_default", ""), ("", "_fitted")):
        acc, f1 = float(metrics[f"test/accuracy{suffix}"]), float(metrics[f"test/f1{suffix}"])
        out.update({f"accuracy{label}": acc, f"f1{label}": f1, f"avg{label}": (acc + f1) / 2})
    return out
