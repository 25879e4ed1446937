"""Masked AU losses and selective learning's weights (lightning_modules/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import (
    FrequencyWeightedBCEWithLogits,
    MaskedBCEWithLogits,
    SelectiveLearningLoss,
    build_loss,
    selective_weights,
)

UNLABELLED = 999.0
BASE_RATES = (0.01, 0.05, 0.2, 0.5, 0.9)


def make_batch(batch: int, k: int, seed: int, unlabelled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (999 where unlabelled) and mask; per-AU base rates from 1% to 90%, 10-30% unlabelled."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.tensor([BASE_RATES[(seed + j) % len(BASE_RATES)] for j in range(k)])
    targets = (torch.rand(batch, k, generator=g) < rates).float()
    if unlabelled:
        frac = 0.1 + 0.2 * torch.rand((), generator=g).item()
        mask = torch.rand(batch, k, generator=g) >= frac
    else:
        mask = torch.ones(batch, k, dtype=torch.bool)
    return targets.masked_fill(~mask, UNLABELLED), mask


def share(w: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted positive share per AU, over labelled entries (float64)."""
    w, y = w.double(), torch.where(mask, y, torch.zeros_like(y)).double()
    return (w * y).sum(0) / w.sum(0)


def check_selective(w, y, mask, t, exact: bool = True, drops_capped: bool = False) -> int:
    """Assert selective learning's invariants on every AU; returns how many AUs were rebalanced.

    Without caps the kept majority count is the documented split: about minority * (1 - t) / t
    (positive minority) or minority * t / (1 - t) (negative minority), rounded, at least 1.
    """
    k = y.shape[1]
    t = torch.as_tensor(t, dtype=torch.float64).expand(k)
    assert w.shape == y.shape and not w.requires_grad
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w[~mask] == 0).all(), "unlabelled entries must weigh exactly 0"
    pos, neg = mask & (y == 1), mask & (y == 0)
    rebalanced = 0
    for j in range(k):
        n_pos, n_neg = int(pos[:, j].sum()), int(neg[:, j].sum())
        if n_pos == 0 or n_neg == 0:
            assert (w[mask[:, j], j] == 1).all()
            continue
        rate = n_pos / (n_pos + n_neg)
        if abs(rate - t[j].item()) < 1e-9:
            assert (w[mask[:, j], j] == 1).all()
            continue
        rebalanced += 1
        minority, majority = (pos, neg) if rate < t[j] else (neg, pos)
        assert (w[minority[:, j], j] > 0).all(), "every minority entry is kept"
        assert (w[majority[:, j], j] > 0).sum() >= 1, "at least one majority entry is kept"
        dropped = mask[:, j] & (w[:, j] == 0)
        assert not (dropped & minority[:, j]).any(), "only majority entries are dropped"
        assert ((w[majority[:, j], j] == 0) | (w[majority[:, j], j] == 1)).all(), "kept majority entries weigh 1"
        if exact:
            assert share(w, y, mask)[j].item() == pytest.approx(t[j].item(), abs=1e-5)
        if exact and not drops_capped:
            m = int(minority[:, j].sum())
            ideal = m * ((1 - t[j]) / t[j] if rate < t[j] else t[j] / (1 - t[j])).item()
            assert abs(int((w[majority[:, j], j] > 0).sum()) - max(1.0, ideal)) <= 0.5 + 1e-4
    return rebalanced


# ----------------------------------------------------------------------------------------------
# selective_weights


@pytest.mark.parametrize("batch", [8, 32, 128, 257])
@pytest.mark.parametrize("k", [1, 5, 23])
@pytest.mark.parametrize("unlabelled", [False, True])
def test_selective_share_is_exact_on_random_batches(batch, k, unlabelled):
    rebalanced = 0
    for seed, rate in enumerate([0.1, 0.3, 0.5, 0.7, "per_au"]):
        y, mask = make_batch(batch, k, seed=100 * batch + 10 * k + seed, unlabelled=unlabelled)
        t = torch.linspace(0.1, 0.8, k) if rate == "per_au" else rate
        w = selective_weights(y, mask, target_rate=t, generator=torch.Generator().manual_seed(seed))
        rebalanced += check_selective(w, y, mask, t)
    if batch >= 32:
        assert rebalanced > 0  # the batches do exercise the rebalancing


def test_selective_hand_values_positive_minority():
    # 2 positives, 10 negatives, t = 0.3: keep round(2 * 0.7 / 0.3) = round(4.67) = 5 negatives,
    # positive weight 5 / 4.67 = 15 / 14 so that 2w / (2w + 5) = 0.3.
    y = torch.tensor([1.0] * 2 + [0.0] * 10).unsqueeze(1)
    mask = torch.ones_like(y, dtype=torch.bool)
    w = selective_weights(y, mask, 0.3, generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.allclose(w[:2], torch.full((2,), 15 / 14))
    assert int((w[2:] == 1).sum()) == 5 and int((w[2:] == 0).sum()) == 5
    assert share(w[:, None], y, mask).item() == pytest.approx(0.3, abs=1e-6)


def test_selective_hand_values_negative_minority():
    # 8 positives, 2 negatives, t = 0.3: keep round(2 * 0.3 / 0.7) = 1 positive,
    # negative weight 1 / 0.857 = 7 / 6 so that 1 / (1 + 2w) = 0.3.
    y = torch.tensor([1.0] * 8 + [0.0] * 2).unsqueeze(1)
    mask = torch.ones_like(y, dtype=torch.bool)
    w = selective_weights(y, mask, 0.3, generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.allclose(w[8:], torch.full((2,), 7 / 6))
    assert int((w[:8] == 1).sum()) == 1 and int((w[:8] == 0).sum()) == 7


def test_selective_single_rare_positive_keeps_one_majority_entry():
    # 1 positive in 100 at t = 0.5: keep exactly 1 negative, both weigh 1.
    y = torch.zeros(100, 1)
    y[37] = 1
    w = selective_weights(y, torch.ones(100, 1, dtype=torch.bool), 0.5)
    assert w[37].item() == 1 and w.sum().item() == 2


def test_selective_rare_minority_when_target_is_high():
    # 1 positive, 3 negatives, t = 0.9: round(1 * 0.1 / 0.9) = 0 -> keep 1 negative, positive weight 9.
    y = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    w = selective_weights(y, torch.ones(4, 1, dtype=torch.bool), 0.9)
    assert w[0].item() == pytest.approx(9.0)
    assert (w[1:] > 0).sum().item() == 1
    assert share(w, y, torch.ones_like(y, dtype=torch.bool)).item() == pytest.approx(0.9, abs=1e-6)


def test_selective_au_without_labels_and_one_class_aus():
    y = torch.tensor([[1.0, 0.0, UNLABELLED, 1.0], [1.0, 0.0, UNLABELLED, 0.0],
                      [UNLABELLED, 0.0, UNLABELLED, 0.0], [1.0, UNLABELLED, UNLABELLED, 0.0]])
    mask = y != UNLABELLED
    w = selective_weights(y, mask, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(w).all()
    assert w[:, 0].tolist() == [1, 1, 0, 1]  # all labelled positive: weight 1
    assert w[:, 1].tolist() == [1, 1, 1, 0]  # all labelled negative: weight 1
    assert w[:, 2].tolist() == [0, 0, 0, 0]  # no labelled entry
    assert w[:, 3].sum().item() == pytest.approx(2.0)  # 1 positive vs 3 negatives: one negative kept


@pytest.mark.parametrize("t, n_pos, n", [(0.5, 4, 8), (0.3, 3, 10), (0.25, 8, 32), (0.7, 7, 10), (0.1, 1, 10)])
def test_selective_rate_at_target_keeps_all_weights_one(t, n_pos, n):
    y = torch.zeros(n + 3, 2)
    y[:n_pos, 0] = 1
    y[:n_pos, 1] = 1
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[n:] = False  # unlabelled rows do not change the rate
    y[n:, 0] = UNLABELLED
    y[n:, 1] = 1.0  # unlabelled "positives" must not count either
    for rate in (t, torch.tensor([t, t])):
        w = selective_weights(y, mask, rate)
        assert (w[:n] == 1).all() and (w[n:] == 0).all()


def test_selective_unlabelled_targets_are_never_read():
    y, mask = make_batch(64, 5, seed=7, unlabelled=True)
    g = torch.Generator().manual_seed(3)
    w999 = selective_weights(y, mask, 0.5, generator=g)
    for fill in (0.0, 1.0, float("nan")):
        w = selective_weights(y.masked_fill(~mask, fill), mask, 0.5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(w, w999)


def test_selective_max_drop_zero_up_weights_only():
    y, mask = make_batch(128, 5, seed=11, unlabelled=True)
    w = selective_weights(y, mask, 0.5, max_drop=0.0)
    assert ((w > 0) == mask).all(), "max_drop=0 drops nothing"
    assert check_selective(w, y, mask, 0.5, drops_capped=True) > 0  # the minority weight alone makes the share exact


def test_selective_max_drop_fraction_caps_drops():
    # 1 positive, 9 negatives, t = 0.5, max_drop = 0.5: at most floor(4.5) = 4 dropped -> 5 kept, w = 5.
    y = torch.tensor([1.0] + [0.0] * 9).unsqueeze(1)
    mask = torch.ones_like(y, dtype=torch.bool)
    w = selective_weights(y, mask, 0.5, max_drop=0.5)
    assert w[0].item() == pytest.approx(5.0) and int((w[1:] == 1).sum()) == 5
    assert share(w, y, mask).item() == pytest.approx(0.5, abs=1e-6)
    for max_drop in (0.0, 0.3, 0.7, 1.0):  # never more than floor(max_drop * majority) dropped
        w = selective_weights(y, mask, 0.5, max_drop=max_drop)
        assert int((w[1:] == 0).sum()) <= math.floor(max_drop * 9 + 1e-9)


def test_selective_max_weight_caps_and_moves_share_towards_target():
    y, mask = make_batch(128, 5, seed=5, unlabelled=True)
    raw = share(mask.double(), y, mask)
    for max_weight in (1.0, 1.5, 3.0):
        w = selective_weights(y, mask, 0.5, max_drop=0.0, max_weight=max_weight)
        assert (w <= max_weight).all()
        check_selective(w, y, mask, 0.5, exact=False)
        s = share(w, y, mask)
        lo, hi = torch.minimum(raw, torch.tensor(0.5)), torch.maximum(raw, torch.tensor(0.5))
        assert ((s >= lo - 1e-6) & (s <= hi + 1e-6)).all()
        both = ((mask & (y == 1)).any(0) & (mask & (y == 0)).any(0)) & ((raw - 0.5).abs() > 1e-9)
        assert both.sum() >= 3
        if max_weight > 1:  # the cap still leaves some progress on every AU to rebalance
            assert ((s - 0.5).abs() < (raw - 0.5).abs())[both].all()


def test_selective_max_weight_prefers_exactness_when_drops_allow():
    # 2 positives, 10 negatives, t = 0.3: rounding 4.67 up needs w = 1.07 > 1; keeping 4 instead
    # gives w = 0.857 <= 1 and the share stays exact.
    y = torch.tensor([1.0] * 2 + [0.0] * 10).unsqueeze(1)
    mask = torch.ones_like(y, dtype=torch.bool)
    w = selective_weights(y, mask, 0.3, max_weight=1.0)
    assert (w <= 1).all() and int((w[2:] == 1).sum()) == 4
    assert share(w, y, mask).item() == pytest.approx(0.3, abs=1e-6)


def test_selective_determinism():
    y, mask = make_batch(128, 5, seed=2, unlabelled=True)

    def weights(seed):
        return selective_weights(y, mask, 0.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(weights(0), weights(0))
    drops = [(weights(s) == 0) & mask for s in range(3)]
    assert drops[0].any()
    assert not torch.equal(drops[0], drops[1]) and not torch.equal(drops[1], drops[2])


def test_selective_drops_are_uniform():
    # 1 positive, 4 negatives at t = 0.5: each negative is the kept one about 1/4 of the time.
    y = torch.tensor([[1.0], [0.0], [0.0], [0.0], [0.0]])
    mask = torch.ones_like(y, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = sum(selective_weights(y, mask, 0.5, generator=g)[1:, 0] for _ in range(2000))
    assert counts.sum().item() == 2000
    assert ((counts / 2000 - 0.25).abs() < 0.04).all()


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_selective_rejects_bad_target_rate(bad):
    y, mask = torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="target_rate"):
        selective_weights(y, mask, bad)
    with pytest.raises(ValueError, match=str(bad).replace(".", r"\.")):
        selective_weights(y, mask, torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match="target_rate"):
        SelectiveLearningLoss(target_rate=bad)


def test_selective_rejects_bad_caps_and_shapes():
    y, mask = torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_drop"):
        selective_weights(y, mask, 0.5, max_drop=1.5)
    with pytest.raises(ValueError, match="max_weight"):
        selective_weights(y, mask, 0.5, max_weight=0.5)
    with pytest.raises(ValueError, match="3 values for 2 AUs"):
        selective_weights(y, mask, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="same shape"):
        selective_weights(y, mask[:, :1], 0.5)


# ----------------------------------------------------------------------------------------------
# losses


def random_problem(batch=32, k=6, seed=0):
    y, mask = make_batch(batch, k, seed=seed, unlabelled=True)
    logits = torch.randn(batch, k, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    return logits, y, mask


def test_masked_bce_matches_torch_on_labelled_entries():
    logits, y, mask = random_problem()
    loss = MaskedBCEWithLogits()(logits, y, mask)
    expected = F.binary_cross_entropy_with_logits(logits[mask], y[mask])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).all()


def test_masked_bce_ignores_nan_targets_of_unlabelled_entries():
    logits, y, mask = random_problem()
    loss = MaskedBCEWithLogits()(logits, y.masked_fill(~mask, float("nan")), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()


def test_frequency_weights_from_labels_match_hand_count():
    U = UNLABELLED
    labels = torch.tensor([
        # AUs: 1 pos/3 neg -> 3, no pos/3 neg -> max_weight, none labelled -> 1, 3 pos/1 neg -> 1 (clipped)
        [1, 0, U, 1],
        [0, 0, U, 1],
        [0, 0, U, 1],
        [0, U, U, 0],
    ])
    mask = labels != U
    fw = FrequencyWeightedBCEWithLogits.from_labels(labels, mask, max_weight=100.0)
    assert fw.pos_weight.tolist() == [3.0, 100.0, 1.0, 1.0]
    many = torch.zeros(251, 1)
    many[0] = 1
    assert FrequencyWeightedBCEWithLogits.from_labels(many, torch.ones_like(many, dtype=torch.bool),
                                                      max_weight=100.0).pos_weight.tolist() == [100.0]
    y, m = make_batch(257, 5, seed=3, unlabelled=True)
    fw = FrequencyWeightedBCEWithLogits.from_labels(y, m, max_weight=1e9)
    for j in range(5):
        n_pos, n_neg = int((y[m[:, j], j] == 1).sum()), int((y[m[:, j], j] == 0).sum())
        if n_pos:
            assert fw.pos_weight[j].item() == pytest.approx(max(1.0, n_neg / n_pos))


def test_frequency_weighted_bce_matches_torch():
    logits, y, mask = random_problem(k=4)
    pos_weight = torch.tensor([1.0, 3.0, 10.0, 0.5])
    loss_fn = FrequencyWeightedBCEWithLogits(pos_weight)
    assert "pos_weight" in loss_fn.state_dict()
    loss = loss_fn(logits, y, mask)
    expected = F.binary_cross_entropy_with_logits(logits[mask], y[mask], pos_weight=pos_weight.expand_as(y)[mask])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~mask] == 0).all()
    full = torch.ones_like(mask)
    y01 = y.masked_fill(~mask, 0)
    assert loss_fn(logits, y01, full).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, y01, pos_weight=pos_weight).item(), rel=1e-6)
    # pos_weight=None is plain masked BCE
    assert FrequencyWeightedBCEWithLogits()(logits, y, mask).item() == pytest.approx(
        MaskedBCEWithLogits()(logits, y, mask).item(), rel=1e-6)


def test_selective_loss_at_batch_rate_equals_masked_bce():
    # Per-AU labelled positive rates 3/10, 5/10 and 2/8 (two unlabelled rows in the last AU).
    y = torch.zeros(10, 3)
    y[[0, 4, 7], 0] = 1
    y[[1, 2, 3, 5, 9], 1] = 1
    y[[2, 6], 2] = 1
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[[3, 8], 2] = False
    y[[3, 8], 2] = UNLABELLED
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    selective = SelectiveLearningLoss(target_rate=[0.3, 0.5, 0.25], seed=0)
    assert (selective.weights(y, mask) == mask).all()
    assert selective(logits, y, mask).item() == pytest.approx(MaskedBCEWithLogits()(logits, y, mask).item(), rel=1e-6)


def test_selective_loss_is_weighted_mean_with_its_generator():
    logits, y, mask = random_problem(batch=64, k=5, seed=4)
    loss = SelectiveLearningLoss(target_rate=0.5, seed=123)(logits, y, mask)
    w = selective_weights(y, mask, 0.5, generator=torch.Generator().manual_seed(123))
    bce = F.binary_cross_entropy_with_logits(logits, y.masked_fill(~mask, 0), reduction="none")
    assert loss.item() == pytest.approx(((w * bce).sum() / w.sum()).item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[w == 0] == 0).all() and (logits.grad[w > 0] != 0).all()


def test_selective_loss_seed_and_buffer():
    logits, y, mask = random_problem(batch=64, k=5, seed=8)
    a, b, c = (SelectiveLearningLoss(target_rate=[0.5, 0.4, 0.3, 0.2, 0.1], seed=s) for s in (1, 1, 2))
    assert a.target_rate.tolist() == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    assert "target_rate" in dict(a.named_buffers()) and "target_rate" not in a.state_dict()
    wa, wb, wc = a.weights(y, mask), b.weights(y, mask), c.weights(y, mask)
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(a.weights(y, mask), wa)  # the generator moves on between batches
    check_selective(wa, y, mask, [0.5, 0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("name", ["bce", "weighted_bce", "selective"])
def test_losses_without_labels(name):
    loss_fn = build_loss(name, pos_weight=[2.0, 2.0, 2.0]) if name == "weighted_bce" else build_loss(name)
    logits = torch.randn(8, 3, requires_grad=True)
    y = torch.full((8, 3), UNLABELLED)
    loss = loss_fn(logits, y, torch.zeros(8, 3, dtype=torch.bool))
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert (logits.grad == 0).all()

    # An AU with no labelled entry contributes nothing: same loss as without that column.
    logits2, y2, mask2 = random_problem(batch=16, k=3, seed=9)
    y2[:, 1], mask2[:, 1] = UNLABELLED, False
    if name == "selective":
        # the random drops depend on K, so check the column's weights instead of a K-1 batch
        loss_fn = SelectiveLearningLoss(seed=0)
        loss = loss_fn(logits2, y2, mask2)
        assert torch.isfinite(loss)
        assert (loss_fn.weights(y2, mask2)[:, 1] == 0).all()
        return
    keep = [0, 2]
    sub = loss_fn if name == "bce" else FrequencyWeightedBCEWithLogits([2.0, 2.0])
    assert loss_fn(logits2, y2, mask2).item() == pytest.approx(
        sub(logits2[:, keep], y2[:, keep], mask2[:, keep]).item(), rel=1e-6)


def test_build_loss_names_and_error():
    assert isinstance(build_loss("bce"), MaskedBCEWithLogits)
    weighted = build_loss("weighted_bce", pos_weight=[1.0, 4.0])
    assert isinstance(weighted, FrequencyWeightedBCEWithLogits) and weighted.pos_weight.tolist() == [1.0, 4.0]
    selective = build_loss("selective", target_rate=0.3, max_drop=0.5, max_weight=10.0, seed=0)
    assert isinstance(selective, SelectiveLearningLoss)
    assert (selective.max_drop, selective.max_weight, selective.target_rate.item()) == (0.5, 10.0, pytest.approx(0.3))
    with pytest.raises(ValueError, match="bce, selective, weighted_bce"):
        build_loss("focal")


def test_weighted_bce_rejects_bad_pos_weight():
    with pytest.raises(ValueError, match="pos_weight"):
        FrequencyWeightedBCEWithLogits([1.0, -2.0])
    with pytest.raises(ValueError, match="2 values for 3 AUs"):
        FrequencyWeightedBCEWithLogits([1.0, 2.0])(torch.zeros(2, 3), torch.zeros(2, 3),
                                                   torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selective_on_cuda_matches_cpu():
    y, mask = make_batch(257, 23, seed=1, unlabelled=True)
    t = torch.linspace(0.1, 0.8, 23)
    cpu = selective_weights(y, mask, t, generator=torch.Generator().manual_seed(0))
    cuda = selective_weights(y.cuda(), mask.cuda(), t.cuda(), generator=torch.Generator().manual_seed(0))
    assert cuda.device.type == "cuda"
    check_selective(cuda.cpu(), y, mask, t)
    assert torch.allclose(cuda.cpu(), cpu)  # the keys come from the same CPU generator
    loss_fn = SelectiveLearningLoss(target_rate=t.tolist(), seed=0).cuda()
    logits = torch.randn(257, 23, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(logits, y.cuda(), mask.cuda())
    loss.backward()
    assert torch.isfinite(loss) and (logits.grad[~mask.cuda()] == 0).all()
    empty = loss_fn(logits, y.cuda(), torch.zeros_like(mask).cuda())
    assert empty.item() == 0 and empty.grad_fn is not None
