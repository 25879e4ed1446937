"""The dual-branch model's own pieces: the decorrelation penalty between the branches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.au_detector import AUDetector, decorrelation_penalty


def test_decorrelation_penalty_is_the_mean_squared_cross_correlation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    b = np.c_[a[:, 0] * 0.5 + rng.normal(size=50), rng.normal(size=(50, 2))]  # widths 4 and 3
    cross = np.corrcoef(a.T, b.T)[:4, 4:]  # numpy's Pearson correlations, features of a vs b
    got = decorrelation_penalty(torch.tensor(a), torch.tensor(b)).item()
    assert got == pytest.approx((cross ** 2).mean(), rel=1e-4)


def test_the_penalty_trains_the_branches_apart():
    torch.manual_seed(0)
    model = AUDetector(aus=[1, 2], backbone="resnet18", orthogonality=1.0)
    batch = {"image": torch.randn(8, 3, 32, 32), "labels": torch.zeros(8, 2), "mask": torch.ones(8, 2, dtype=torch.bool)}
    _, _, parts = model.model_step(batch)
    assert set(parts) == {"main", "orthogonality"} and parts["orthogonality"] > 0
    optimizer = torch.optim.SGD(model.net.branches.parameters(), lr=0.5)
    before = parts["orthogonality"].item()
    for _ in range(10):
        optimizer.zero_grad()
        _, _, feats = model.net.forward_all(batch["image"])
        decorrelation_penalty(*feats.values()).backward()
        optimizer.step()
    _, _, feats = model.net.forward_all(batch["image"])
    assert decorrelation_penalty(*feats.values()).item() < before
    with pytest.raises(ValueError, match="both"):
        AUDetector(aus=[1], backbone="resnet18", branches=["face"], orthogonality=0.1)
