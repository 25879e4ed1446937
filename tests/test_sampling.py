"""Multilabel balanced sampling: weights, rare-AU boost, determinism per (seed, epoch), DDP sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from datamodules.sampling import MultilabelBalancedSampler


def imbalanced(n: int = 4000, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent AUs with rates from 0.5% to 40%, 10% of entries unlabelled."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(0.005, 0.4, k)
    labels = (rng.random((n, k)) < rates).astype(np.float32)
    mask = rng.random((n, k)) >= 0.1
    return labels, mask, rates


def rate(labels: np.ndarray, mask: np.ndarray, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
    y, m = labels[idx], mask[idx]
    return (y * m).sum(0) / m.sum(0)


def test_sampled_epoch_boosts_rare_aus():
    labels, mask, rates = imbalanced()
    sampler = MultilabelBalancedSampler(labels, mask, seed=0)
    draw = np.array(list(sampler))
    assert len(draw) == len(labels)
    raw, sampled, expected = rate(labels, mask), rate(labels, mask, draw), sampler.expected_positive_rate()

    print("\n  AU  target   raw     sampled  expected  sampled/raw")
    for k in range(len(rates)):
        print(f"  {k:2d}  {rates[k]:.4f}  {raw[k]:.4f}  {sampled[k]:.4f}   {expected[k]:.4f}    {sampled[k] / raw[k]:6.1f}x")

    assert raw[0] < 0.005  # the rarest AU: 13 positives among ~3600 labelled entries
    assert sampled[0] >= 5 * raw[0]
    assert sampled[0] > 0.08
    # Each AU's positives get roughly equal mass: every AU below 6% at least doubles, and every
    # AU ends up positive in more than 10% of its drawn labelled entries.
    assert (sampled[rates < 0.06] > 2 * raw[rates < 0.06]).all()
    assert (sampled > 0.1).all()
    # The most common AU is not inflated. With independent AUs its *expected* rate does rise a
    # little (its positives weigh 1/0.4 = 2.5 against 1 for all-negative samples), by ~3.5%
    # here, far from the rare AUs' gains.
    assert sampled[-1] <= raw[-1] * 1.05
    assert expected[-1] <= raw[-1] * 1.05
    assert sampled[-1] / raw[-1] < (sampled[0] / raw[0]) / 20
    # One drawn epoch agrees with the sampler's own expectation.
    np.testing.assert_allclose(sampled, expected, atol=0.03)


def test_same_seed_and_epoch_same_draw_new_epoch_new_draw():
    labels, mask, _ = imbalanced(n=500)
    a = MultilabelBalancedSampler(labels, mask, seed=7)
    b = MultilabelBalancedSampler(labels, mask, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    draw2 = list(a)
    assert draw2 == list(b)
    assert len(draw2) == 500 and all(0 <= i < 500 for i in draw2)

    c = MultilabelBalancedSampler(labels, mask, seed=7)
    e0 = list(c)  # epoch 0
    e1 = list(c)  # no set_epoch: advances to epoch 1 by itself
    e2 = list(c)
    assert e0 != e1 and e1 != e2
    assert e2 == draw2
    assert c.epoch == 3
    c.set_epoch(0)
    assert list(c) == e0
    assert list(c) == e1  # and advancing resumes from there
    assert list(MultilabelBalancedSampler(labels, mask, seed=8)) != e0  # the seed matters

    g = torch.Generator().manual_seed(7 + 2)  # documented recipe: multinomial with seed + epoch
    assert torch.multinomial(a.weights, 500, replacement=True, generator=g).tolist() == draw2


@pytest.mark.parametrize("shuffle", [False, True])
def test_lightning_wrapper_partitions_the_draw_across_ranks(shuffle):
    labels, mask, _ = imbalanced(n=600)
    world, epoch, n = 2, 3, 600

    # what each of two processes builds: its own sampler (same seed) inside Lightning's wrapper
    wrappers = [
        DistributedSamplerWrapper(MultilabelBalancedSampler(labels, mask, seed=11), num_replicas=world, rank=r, shuffle=shuffle)
        for r in range(world)
    ]
    for w in wrappers:
        w.set_epoch(epoch)
    shares = [list(w) for w in wrappers]

    reference = MultilabelBalancedSampler(labels, mask, seed=11)
    reference.set_epoch(epoch)
    draw = list(reference)
    assert wrappers[0].dataset._sampler.epoch == epoch + 1  # set_epoch was forwarded, then drawn

    assert len(shares[0]) == len(shares[1]) == n // 2
    assert sorted(shares[0] + shares[1]) == sorted(draw)
    # Positions: DistributedSampler orders positions 0..n-1 (shuffled with its own seed + epoch
    # when shuffle=True) and gives rank r every world-th one. Reconstruct them to prove the
    # shares are disjoint slices of one common draw, not two overlapping draws.
    if shuffle:
        positions = torch.randperm(n, generator=torch.Generator().manual_seed(0 + epoch)).tolist()
    else:
        positions = list(range(n))
    pos = [positions[r::world] for r in range(world)]
    assert not set(pos[0]) & set(pos[1]) and set(pos[0]) | set(pos[1]) == set(range(n))
    for r in range(world):
        assert shares[r] == [draw[p] for p in pos[r]]

    # the next epoch: a new draw, still partitioned
    for w in wrappers:
        w.set_epoch(epoch + 1)
    nxt = [list(w) for w in wrappers]
    reference.set_epoch(epoch + 1)
    assert sorted(nxt[0] + nxt[1]) == sorted(list(reference)) != sorted(draw)


def test_unseeded_style_draws_would_overlap():
    """Why the seed matters: two ranks drawing independently do not partition anything."""
    labels, mask, _ = imbalanced(n=600)
    a = DistributedSamplerWrapper(MultilabelBalancedSampler(labels, mask, seed=1), num_replicas=2, rank=0, shuffle=False)
    b = DistributedSamplerWrapper(MultilabelBalancedSampler(labels, mask, seed=2), num_replicas=2, rank=1, shuffle=False)
    ref = MultilabelBalancedSampler(labels, mask, seed=1)
    assert sorted(list(a) + list(b)) != sorted(list(ref))


def test_own_sharding_even():
    labels, mask, _ = imbalanced(n=300)
    ranks = [MultilabelBalancedSampler(labels, mask, seed=5, num_samples=200, num_replicas=2, rank=r) for r in range(2)]
    full = MultilabelBalancedSampler(labels, mask, seed=5, num_samples=200)
    for s in (*ranks, full):
        s.set_epoch(4)
    draw = list(full)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [100, 100] and len(full) == 200
    assert shares[0] == draw[0::2] and shares[1] == draw[1::2]  # disjoint positions, together the draw
    assert sorted(shares[0] + shares[1]) == sorted(draw)
    assert list(ranks[0]) == full.draw(5)[0::2]  # advanced in step with the unsharded sampler


def test_own_sharding_odd_pads_by_wrapping():
    labels, mask, _ = imbalanced(n=100)
    full = MultilabelBalancedSampler(labels, mask, seed=3, num_samples=7)
    draw = list(full)
    shares = [list(MultilabelBalancedSampler(labels, mask, seed=3, num_samples=7, num_replicas=3, rank=r)) for r in range(3)]
    padded = draw + draw[:2]  # ceil(7/3) = 3 per rank, 9 in all
    assert shares == [padded[0::3], padded[1::3], padded[2::3]]
    assert all(len(s) == 3 for s in shares)
    assert len(MultilabelBalancedSampler(labels, mask, num_samples=7, num_replicas=3, rank=2)) == 3
    # fewer samples than ranks still fills every rank
    tiny = [list(MultilabelBalancedSampler(labels, mask, seed=3, num_samples=1, num_replicas=4, rank=r)) for r in range(4)]
    one = MultilabelBalancedSampler(labels, mask, seed=3, num_samples=1).draw(0)
    assert len(one) == 1 and tiny == [one] * 4


def test_weights_by_hand():
    # AU A: positive in s0, s3 of 4 labelled -> f = 1/2 -> 2
    # AU B: positive in s1, s3 of 3 labelled (s2 unlabelled) -> f = 2/3 -> 1.5
    # AU C: never positive -> ignored
    # w = [2, 1.5, 1 (no positive), max(2, 1.5) = 2] / 6.5
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)  # s2's B is masked
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
    s = MultilabelBalancedSampler(labels, mask)
    assert s.weights.dtype == torch.float64
    np.testing.assert_allclose(s.weights.numpy(), np.array([2, 1.5, 1, 2]) / 6.5, rtol=0, atol=1e-15)
    assert float(s.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    # expected rate, A: (2 + 2) / 6.5; B over labelled rows s0, s1, s3: (1.5 + 2) / (2 + 1.5 + 2); C: 0
    np.testing.assert_allclose(s.expected_positive_rate(), [4 / 6.5, 3.5 / 5.5, 0.0], atol=1e-12)

    sqrt = MultilabelBalancedSampler(torch.from_numpy(labels), torch.from_numpy(mask), power=0.5)
    w = np.array([math.sqrt(2), math.sqrt(1.5), 1, math.sqrt(2)])
    np.testing.assert_allclose(sqrt.weights.numpy(), w / w.sum(), atol=1e-15)

    uniform = MultilabelBalancedSampler(labels, mask, power=0)
    np.testing.assert_allclose(uniform.weights.numpy(), [0.25] * 4)

    s.weights.mul_(0)  # a copy: callers cannot corrupt the sampler
    assert float(s.weights.sum()) == pytest.approx(1.0)


def test_no_mask_means_all_labelled_and_unlabelled_au_is_nan():
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 0]])
    s = MultilabelBalancedSampler(labels)
    np.testing.assert_allclose(s.weights.numpy(), np.array([4, 1, 1, 1]) / 7)
    s2 = MultilabelBalancedSampler(labels, np.array([[1, 0]] * 4, dtype=bool))
    rate = s2.expected_positive_rate()
    assert rate[0] == pytest.approx(4 / 7) and np.isnan(rate[1])


def test_argument_errors():
    labels = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        MultilabelBalancedSampler(labels, np.ones((4, 2), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        MultilabelBalancedSampler(np.zeros(4))
    with pytest.raises(ValueError, match="no rows"):
        MultilabelBalancedSampler(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="num_samples"):
        MultilabelBalancedSampler(labels, num_samples=0)
    with pytest.raises(ValueError, match="power"):
        MultilabelBalancedSampler(labels, power=-0.5)
    with pytest.raises(ValueError, match="rank 2 is out of range for num_replicas=2"):
        MultilabelBalancedSampler(labels, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank -1 is out of range"):
        MultilabelBalancedSampler(labels, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="rank is required"):
        MultilabelBalancedSampler(labels, num_replicas=2)
    with pytest.raises(ValueError, match="without num_replicas"):
        MultilabelBalancedSampler(labels, rank=0)
    with pytest.raises(ValueError, match="999"):
        MultilabelBalancedSampler(np.array([[1, 999], [0, 1]]))
    # 999 under a False mask is fine
    s = MultilabelBalancedSampler(np.array([[1, 999], [0, 1]]), np.array([[1, 0], [1, 1]], dtype=bool))
    np.testing.assert_allclose(s.weights.numpy(), [2 / 3, 1 / 3])  # f = (1/2, 1/1)
