"""SynthAU's label model: which AUs a face shows, and which of them its manifest row leaves unlabelled.

Expressions are prototype AU combinations of the basic emotions; spontaneous AUs outside any
prototype and a share of ``999`` labels give the EmotioNet-like statistics: most AUs rare, a
few common, head movements unlabelled more often than the rest.
"""

from __future__ import annotations

import numpy as np

from datamodules.io.manifest import UNLABELLED

# Prototype AU combinations of the basic emotions (after Ekman & Friesen's EMFACS tables,
# restricted to the EmotioNet-2020 AUs), each AU kept with probability p.
EXPRESSIONS: dict[str, dict[int, float]] = {
    "neutral": {},
    "happiness": {6: 0.85, 12: 0.95, 25: 0.6},
    "sadness": {1: 0.85, 4: 0.85, 15: 0.85, 17: 0.5},
    "surprise": {1: 0.9, 2: 0.9, 5: 0.85, 25: 0.9, 26: 0.85},
    "fear": {1: 0.85, 2: 0.85, 4: 0.85, 5: 0.85, 20: 0.85, 25: 0.85},
    "anger": {4: 0.9, 5: 0.7, 24: 0.85, 17: 0.3},
    "disgust": {9: 0.9, 10: 0.85, 15: 0.5, 17: 0.3},
    "contempt": {12: 0.9},  # unilateral: one lip corner only
}
EXPRESSION_PRIOR = {
    "neutral": 0.36, "happiness": 0.25, "sadness": 0.08, "surprise": 0.08,
    "fear": 0.05, "anger": 0.07, "disgust": 0.04, "contempt": 0.07,
}
# Spontaneous AUs outside any prototype, so AUs also occur alone and in odd combinations.
BACKGROUND_RATE = {
    1: 0.02, 2: 0.01, 4: 0.03, 5: 0.01, 6: 0.02, 9: 0.005, 10: 0.01, 12: 0.03, 15: 0.02,
    17: 0.03, 18: 0.02, 20: 0.01, 24: 0.02, 25: 0.12, 26: 0.04, 28: 0.012, 43: 0.03,
    51: 0.03, 52: 0.03, 53: 0.025, 54: 0.025, 55: 0.03, 56: 0.03,
}
EXCLUSIVE = ((51, 52), (53, 54), (55, 56), (43, 5))
# EmotioNet leaves many AUs unlabelled; head movements more often than the rest.
UNLABELLED_RATE = {51: 0.2, 52: 0.2, 53: 0.2, 54: 0.2, 55: 0.2, 56: 0.2}
UNLABELLED_RATE_DEFAULT = 0.07


def sample_aus(rng: np.random.Generator) -> tuple[str, dict[int, float], bool]:
    """Expression and active AUs (with intensities) of one face, and whether it is one-sided (contempt)."""
    names = list(EXPRESSION_PRIOR)
    expression = names[rng.choice(len(names), p=np.array([EXPRESSION_PRIOR[n] for n in names]))]
    active = {au for au, p in EXPRESSIONS[expression].items() if rng.uniform() < p}
    active |= {au for au, p in BACKGROUND_RATE.items() if rng.uniform() < p}
    for a, b in EXCLUSIVE:
        if a in active and b in active:
            active.discard(b if rng.uniform() < 0.5 else a)
    if 26 in active and rng.uniform() < 0.9:
        active.add(25)
    if 28 in active:
        active -= {18, 25, 26}
    intensity = {au: float(rng.uniform(0.65, 1.0)) for au in sorted(active)}
    return expression, intensity, expression == "contempt"


def sample_labels(rng: np.random.Generator, intensity: dict[int, float], aus: tuple[int, ...]) -> list[int]:
    """A manifest row's labels for ``aus``: 1 for an active AU, 0 for an inactive one, or ``UNLABELLED``."""
    out = []
    for au in aus:
        if rng.uniform() < UNLABELLED_RATE.get(au, UNLABELLED_RATE_DEFAULT):
            out.append(UNLABELLED)
        else:
            out.append(int(au in intensity))
    return out
