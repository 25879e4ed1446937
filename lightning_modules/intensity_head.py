"""AU intensity beside occurrence: FACS levels A-E (1-5) predicted given that the AU is present.

The head answers "how strong, if present", never "whether": occurrence stays the occurrence head's
decision at its fitted threshold, and the reported intensity is that decision times the expected
level given presence. So a reported intensity is exactly 0 when the AU is decided absent and at
least 1 (level A) when it is decided present, by construction: intensity and presence cannot
disagree (OpenFace#228's complaint).

Levels are ordered, so the head is an ordinal regression with rank-consistent thresholds (CORAL,
Cao et al. 2020): one score per AU, s = w . x, and four ordered offsets b_1 > b_2 > b_3 > b_4;
P(level > j | present) = sigmoid(s + b_j), which falls with j for every input, so the four binary
answers never say "above C but not above B". It is trained with binary cross-entropy on the four
questions "level > j" of each labelled present AU (a frame without the AU, or with an unknown
level, teaches nothing here: absence is the occurrence head's to learn). Why not regression of
the level: squared error treats B -> D like A -> C and pulls every prediction to the middle
levels; why not five-way softmax: it ignores the order, so neighbouring levels share nothing.

High levels are rare (most occurrences are A-C in DISFA), so each question's positives can be
weighted by the softened inverse of their share in the training data, sqrt((1 - p) / p),
the way balanced training weights rare AUs (:func:`ordinal_pos_weight`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 5  # FACS A-E
MAX_POS_WEIGHT = 10.0


class OrdinalHead(nn.Module):
    """Features (B, D) -> cumulative logits (B, K, LEVELS - 1): logit of P(level > j | present), j = 1..4."""

    def __init__(self, in_features: int, num_aus: int, levels: int = LEVELS):
        super().__init__()
        self.levels = levels
        self.score = nn.Linear(in_features, num_aus)
        # First offset free, each next one lower by a positive step: offsets ordered for any weights.
        # Start at logits (1.5, 0.5, -0.5, -1.5): levels spread over A-E before training.
        first = torch.full((num_aus, 1), 1.5)
        steps = torch.full((num_aus, levels - 2), float(torch.log(torch.expm1(torch.tensor(1.0)))))
        self.offsets = nn.Parameter(torch.cat([first, steps], 1))

    def thresholds(self) -> torch.Tensor:
        """The ordered offsets b_1 > ... > b_{L-1}, (K, L-1)."""
        first, steps = self.offsets[:, :1], F.softplus(self.offsets[:, 1:])
        return torch.cat([first, first - torch.cumsum(steps, 1)], 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(features).unsqueeze(-1) + self.thresholds()


def expected_level(cumulative_logits: torch.Tensor) -> torch.Tensor:
    """E[level | present] = 1 + sum_j P(level > j | present), in [1, LEVELS], (B, K).

    >>> expected_level(torch.tensor([[[10.0, 10.0, -10.0, -10.0]]])).round(decimals=3)  # surely C
    tensor([[3.]])
    """
    return 1 + torch.sigmoid(cumulative_logits.float()).sum(-1)


def reported_intensity(cumulative_logits: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """The intensity a prediction reports: 0 where the AU is decided absent, the expected level
    (>= 1) where it is decided present. (B, K) float."""
    return torch.where(decisions.bool(), expected_level(cumulative_logits), torch.zeros(()))


def ordinal_targets(levels: torch.Tensor, num_thresholds: int = LEVELS - 1) -> torch.Tensor:
    """Level (B, K) -> the answers to "level > j" for j = 1..L-1, (B, K, L-1) float.

    >>> ordinal_targets(torch.tensor([[1, 3, 5]])).tolist()
    [[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]
    """
    j = torch.arange(1, num_thresholds + 1, device=levels.device)
    return (levels.unsqueeze(-1) > j).float()


def ordinal_pos_weight(level_counts: Sequence[Sequence[float]], max_weight: float = MAX_POS_WEIGHT) -> torch.Tensor:
    """Per AU and question "level > j", the weight of its positives: sqrt((1 - p) / p) with p the
    share of the AU's present training frames above level j, in [1 / max_weight, max_weight]
    (1 where the AU has no present frame). ``level_counts`` (K, LEVELS): frames at levels 1-5.

    >>> ordinal_pos_weight([[60, 30, 8, 1, 1]]).round(decimals=2)  # p = .4, .1, .02, .01
    tensor([[1.2200, 3.0000, 7.0000, 9.9500]])
    """
    counts = torch.as_tensor(level_counts, dtype=torch.float64)
    present = counts.sum(-1, keepdim=True)
    above = present - torch.cumsum(counts, -1)[:, :-1]  # frames above level j, j = 1..L-1
    p = above / present.clamp(min=1)
    weight = torch.sqrt((1 - p) / p.clamp(min=1e-12)).clamp(1 / max_weight, max_weight)
    return torch.where(present > 0, weight, torch.ones_like(weight)).float()


def ordinal_loss(cumulative_logits: torch.Tensor, levels: torch.Tensor, mask: torch.Tensor,
                 pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of the L-1 questions "level > j", over the entries whose level is
    known (``mask``) and at least 1 (the AU is present), mean over those entries and questions;
    0 (with a gradient) when a batch has none."""
    present = mask.bool() & (levels >= 1)
    if not present.any():
        return cumulative_logits.sum() * 0.0
    logits = cumulative_logits[present].float()  # (M, L-1)
    targets = ordinal_targets(levels[present].round().long(), logits.shape[-1])
    weight = None
    if pos_weight is not None:
        weight = pos_weight.to(logits.device).unsqueeze(0).expand(*present.shape, -1)[present]
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
