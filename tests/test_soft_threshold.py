"""Soft thresholding: the vectorised fit equals a brute-force search with scikit-learn; the
callback fits on the de-duplicated, gathered validation set and writes the module's buffer."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from callbacks.au_report import au_report
from callbacks.soft_threshold import (MIN_POSITIVES, SoftThresholdCallback, fallback_thresholds, fit_thresholds,
                                      heldout_scores, labelled_positives, validation_half)
from lightning_modules.evaluation import ValidationBatch, dedupe_by_index
from lightning_modules.metrics import au_scores


def random_case(seed: int, n: int, k: int, decimals: int | None = 2, unlabelled: float = 0.2):
    rng = np.random.default_rng(seed)
    probs = rng.random((n, k))
    if decimals is not None:
        probs = probs.round(decimals)  # many ties
    rates = rng.uniform(0.05, 0.6, size=k)
    # labels loosely follow the probabilities so that the optimum is not trivial
    labels = (rng.random((n, k)) < 0.5 * probs + 0.5 * rates).astype(np.float64)
    mask = rng.random((n, k)) >= unlabelled
    labels[~mask] = 999
    return probs, labels, mask


def _pick(values: np.ndarray, candidates: np.ndarray) -> float:
    """Best value with ties (to rounding) going to the candidate closest to 0.5, then the higher."""
    best = np.isclose(values, values.max(), rtol=0, atol=1e-12)
    c = candidates[best]
    d = np.abs(c - 0.5)
    return float(c[np.isclose(d, d.min(), rtol=0, atol=1e-15)].max())


def brute_force(probs, labels, mask, criterion):
    """Per AU: (best value, chosen threshold, value function) by scikit-learn over every distinct prob."""
    out = []
    for k in range(probs.shape[1]):
        p, y = probs[mask[:, k], k], labels[mask[:, k], k] > 0.5
        if len(p) == 0 or not y.any():
            out.append((None, 0.5, None))
            continue
        cands = np.unique(p)

        def f1(t, p=p, y=y):
            return f1_score(y, p >= t, zero_division=0)

        def score(t, p=p, y=y):
            return (accuracy_score(y, p >= t) + f1_score(y, p >= t, zero_division=0)) / 2

        def gap(t, p=p, y=y):
            return abs(precision_score(y, p >= t, zero_division=0) - recall_score(y, p >= t, zero_division=0))

        if criterion == "f1":
            values = np.array([f1(t) for t in cands])
            out.append((values.max(), _pick(values, cands), f1))
        elif criterion == "score":
            values = np.array([score(t) for t in cands])
            out.append((values.max(), _pick(values, cands), score))
        else:
            # P = R = 0 when nothing positive is predicted correctly is no break-even point
            keep = np.array([((p >= t) & y).any() for t in cands])
            cands = cands[keep]
            gaps = np.array([gap(t) for t in cands])
            f1s = np.array([f1(t) for t in cands])
            tied = np.isclose(gaps, gaps.min(), rtol=0, atol=1e-12)
            f1s_tied = np.where(tied, f1s, -1.0)
            out.append((gaps.min(), _pick(f1s_tied, cands), gap))
    return out


# (seed, n, K, decimals): rounding to 2 decimals gives many tied probabilities
# the two largest cases take seconds each against the brute force: the whole suite runs them
CASES = [(0, 60, 1, 2), pytest.param(1, 120, 4, 2, marks=pytest.mark.slow),
         pytest.param(2, 250, 2, 2, marks=pytest.mark.slow), (3, 25, 6, None), (4, 70, 2, None), (5, 40, 3, 1)]


@pytest.mark.parametrize("criterion", ["f1", "score", "break_even"])
@pytest.mark.parametrize("seed,n,k,decimals", CASES)
def test_fit_matches_brute_force(criterion, seed, n, k, decimals):
    probs, labels, mask = random_case(seed, n, k, decimals)
    got = fit_thresholds(probs, labels, mask, criterion)
    assert got.shape == (k,)
    for j, (best, chosen, value) in enumerate(brute_force(probs, labels, mask, criterion)):
        if best is None:
            assert got[j] == 0.5
            continue
        assert got[j] in probs[mask[:, j], j]  # an actual probability value
        assert value(got[j]) == pytest.approx(best, abs=1e-12)  # achieves the optimum
        assert got[j] == chosen  # and the documented tie-break picks the same one


@pytest.mark.parametrize("criterion", ["f1", "score", "break_even"])
def test_no_positive_or_no_labelled_au_gets_half(criterion):
    probs, labels, mask = random_case(7, 80, 4)
    labels[:, 1] = np.where(mask[:, 1], 0, 999)  # no positive
    mask[:, 3] = False  # nothing labelled
    labels[:, 3] = 1  # (ignored: unlabelled)
    got = fit_thresholds(probs, labels, mask, criterion)
    assert got[1] == 0.5 and got[3] == 0.5
    assert got[0] != 0.5 or got[2] != 0.5


def test_ties_are_one_candidate_and_decisions_reproduce():
    probs = np.array([[0.7], [0.7], [0.7], [0.2], [0.2]])
    labels = np.array([[1], [0], [1], [1], [0]])
    mask = np.ones_like(labels, bool)
    t = fit_thresholds(probs, labels, mask, "f1")
    # at 0.7: TP=2 FP=1 FN=1 -> F1 2/3; at 0.2: TP=3 FP=2 -> F1 0.75
    assert t[0] == 0.2
    assert au_scores(probs, labels, mask, t)["f1"][0] == pytest.approx(0.75)


def test_f1_ties_go_closest_to_half_then_higher():
    labels = np.array([[1], [0], [0], [1]])
    mask = np.ones_like(labels, bool)
    # F1 = 2/3 at 0.9 (TP=1 FN=1) and at the lowest prob (TP=2 FP=2); 0.15 is closer to 0.5
    assert fit_thresholds(np.array([[0.9], [0.8], [0.45], [0.15]]), labels, mask, "f1")[0] == 0.15
    # 0.1 and 0.9 are equally far from 0.5: the higher wins
    assert fit_thresholds(np.array([[0.9], [0.8], [0.45], [0.1]]), labels, mask, "f1")[0] == 0.9


def test_float32_thresholds_reproduce_exactly():
    probs, labels, mask = random_case(8, 100, 3, decimals=None)
    p32 = probs.astype(np.float32)
    t = fit_thresholds(torch.from_numpy(p32), torch.from_numpy(labels), torch.from_numpy(mask), "f1")
    best = [b for b, _, _ in brute_force(p32.astype(np.float64), labels, mask, "f1")]
    got = au_scores(p32, labels, mask, t.astype(np.float32))["f1"]  # as the module's float32 buffer does
    np.testing.assert_allclose(got, best, atol=1e-12)


def test_unknown_criterion():
    with pytest.raises(ValueError, match="break_even"):
        fit_thresholds(np.zeros((2, 1)), np.zeros((2, 1)), np.ones((2, 1), bool), "auc")
    with pytest.raises(ValueError, match="f1"):
        SoftThresholdCallback(criterion="youden")


def _padded_ranks(n: int, world: int = 2) -> list[list[int]]:
    return [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]


def test_dedupe_by_index_drops_distributed_sampler_padding():
    n = 41
    probs, labels, mask = random_case(9, n, 3)
    ranks = _padded_ranks(n)
    assert sum(map(len, ranks)) == n + 1  # one sample repeated
    order = np.array(ranks[0] + ranks[1])  # all_gather then flatten: rank by rank
    index, p, y, m = dedupe_by_index(order, probs[order], labels[order], mask[order])
    np.testing.assert_array_equal(index, np.arange(n))
    np.testing.assert_array_equal(p, probs)
    for criterion in ("f1", "score", "break_even"):
        np.testing.assert_array_equal(fit_thresholds(p, y, m, criterion), fit_thresholds(probs, labels, mask, criterion))
    # the padded data fits differently in general; not a requirement, but the repeat is really there
    assert len(order) == n + 1
    # torch in, torch out; first occurrence kept
    idx_t, vals = dedupe_by_index(torch.tensor([3, 1, 3]), torch.tensor([30.0, 10.0, 31.0]))
    assert isinstance(vals, torch.Tensor) and vals.tolist() == [10.0, 30.0] and idx_t.tolist() == [1, 3]


# --- the callback, without processes: a fake 2-rank gather --------------------------------------

class FakeRank0Module:
    """What the callback uses of a LightningModule on rank 0 of 2; rank 1's local data is given."""

    def __init__(self, k: int, other: dict[str, torch.Tensor]):
        self.thresholds = torch.full((k,), 0.5)
        self.aus = tuple(range(1, k + 1))
        self.other = other
        self.logged: dict[str, float] = {}

    def all_gather(self, data):
        if isinstance(data, torch.Tensor):  # the sizes
            return torch.stack([data, torch.tensor([len(self.other["index"])])])
        longest = len(data["index"])
        out = {}
        for key, mine in data.items():
            theirs = self.other[key].to(mine.dtype)
            theirs = torch.cat([theirs, theirs.new_zeros((longest - len(theirs), *theirs.shape[1:]))])
            out[key] = torch.stack([mine, theirs])
        return out

    def log(self, name, value, sync_dist=False):
        assert sync_dist is False
        self.logged[name] = value


@pytest.mark.parametrize("drop_rank1_padding", [False, True])
def test_callback_gathers_and_dedupes_two_ranks(drop_rank1_padding):
    n, k = 41, 3
    probs, labels, mask = random_case(10, n, k)
    ranks = _padded_ranks(n)
    if drop_rank1_padding:  # unequal counts per rank: the gather must still be right
        ranks[1] = ranks[1][:-1]

    def local(idx):
        idx = np.array(idx)
        return {"probs": torch.from_numpy(probs[idx]).float(), "labels": torch.from_numpy(labels[idx]).float(),
                "mask": torch.from_numpy(mask[idx]), "index": torch.from_numpy(idx)}

    module = FakeRank0Module(k, local(ranks[1]))
    trainer = SimpleNamespace(world_size=2, sanity_checking=False)
    cb = SoftThresholdCallback("f1")
    cb.on_validation_epoch_start(trainer, module)
    r0 = local(ranks[0])
    for start in range(0, len(ranks[0]), 8):
        batch = ValidationBatch(**{key: v[start:start + 8] for key, v in r0.items()})
        cb.on_validation_batch_end(trainer, module, batch, None, start // 8)
        cb.on_validation_batch_end(trainer, module, {"junk": 1}, None, start // 8, dataloader_idx=1)  # ignored
    cb.on_validation_epoch_end(trainer, module)
    p32 = probs.astype(np.float32)
    expected = fit_thresholds(p32, labels, mask, "f1", MIN_POSITIVES)  # the callback's default rule
    np.testing.assert_array_equal(cb.thresholds, expected)
    np.testing.assert_array_equal(module.thresholds.numpy(), expected.astype(np.float32))
    fit = module.threshold_fit  # the one record of this validation
    np.testing.assert_array_equal(fit.index, np.arange(n))
    np.testing.assert_array_equal(fit.thresholds, expected)
    assert fit.criterion == "f1" and fit.aus == (1, 2, 3)
    assert module.logged["val/f1_fitted"] == pytest.approx(au_scores(p32, labels, mask, expected)["mean_f1"])
    assert module.logged["val/threshold/AU2"] == pytest.approx(expected[1])
    assert fit.at_default["mean_f1"] == pytest.approx(au_scores(p32, labels, mask, 0.5)["mean_f1"])
    heldout = heldout_scores(p32, labels, mask, np.arange(n), "f1", MIN_POSITIVES)
    assert module.logged["val/score_heldout"] == fit.heldout["score"] == pytest.approx(heldout["score"])
    assert module.logged == fit.metrics()


def test_callback_says_what_validation_step_must_return():
    module = FakeRank0Module(3, {})
    trainer = SimpleNamespace(world_size=1, sanity_checking=False)
    cb = SoftThresholdCallback()
    outputs = {"probs": torch.zeros(2, 3), "labels": torch.zeros(2, 3)}
    with pytest.raises(TypeError, match=r"FakeRank0Module.validation_step returns: a "
                                        r"lightning_modules.evaluation.ValidationBatch\('probs', 'labels', 'mask', "
                                        r"'index'\), not dict"):
        cb.on_validation_batch_end(trainer, module, outputs, None, 0)


def test_callback_state_roundtrip():
    cb = SoftThresholdCallback("score")
    cb.thresholds = np.array([0.25, 0.5, 0.75])
    state = cb.state_dict()
    other = SoftThresholdCallback("score")
    other.load_state_dict(state)
    assert other.criterion == "score"
    np.testing.assert_array_equal(other.thresholds, cb.thresholds)
    assert SoftThresholdCallback().state_dict() == {"criterion": "f1", "thresholds": None}


# --- the callback in a real (single-process) Trainer ---------------------------------------------

class AUData(Dataset):
    def __init__(self, n: int, k: int, d: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        w = torch.randn(d, k, generator=g)
        self.labels = ((self.x @ w + 0.5 * torch.randn(n, k, generator=g)) > 0.8).float()
        self.mask = torch.rand(n, k, generator=g) >= 0.2
        self.labels[~self.mask] = 999

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i], "mask": self.mask[i], "index": i}


class TinyAU(L.LightningModule):
    def __init__(self, d: int = 8, aus=(1, 6, 12)):
        super().__init__()
        self.aus = tuple(aus)
        self.layer = nn.Linear(d, len(self.aus))
        self.register_buffer("thresholds", torch.full((len(self.aus),), 0.5))

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        logits = self(batch["x"])
        m = batch["mask"].float()
        target = torch.where(batch["mask"], batch["labels"], torch.zeros_like(logits))
        return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * m).sum() / m.sum()

    def validation_step(self, batch, batch_idx):
        probs = torch.sigmoid(self(batch["x"]))
        return ValidationBatch(probs, batch["labels"], batch["mask"], batch["index"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_in_trainer():
    torch.manual_seed(0)
    train, val = AUData(64, 3, 8, seed=1), AUData(45, 3, 8, seed=2)
    model = TinyAU()
    cb = SoftThresholdCallback("f1")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb])
    val_loader = DataLoader(val, batch_size=8)
    trainer.fit(model, DataLoader(train, batch_size=16), val_loader)

    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(b["x"])) for b in val_loader]).numpy()
    labels, mask = val.labels.numpy(), val.mask.numpy()
    expected = fit_thresholds(probs, labels, mask, "f1", MIN_POSITIVES)
    np.testing.assert_array_equal(model.thresholds.numpy(), expected.astype(np.float32))
    assert len(model.threshold_fit.probs) == len(val)  # the whole val set, sanity-check batches not kept
    scores = au_scores(probs, labels, mask, expected)
    metrics = trainer.callback_metrics
    assert float(metrics["val/f1_fitted"]) == pytest.approx(scores["mean_f1"], abs=1e-6)
    assert float(metrics["val/score_fitted"]) == pytest.approx(scores["score"], abs=1e-6)
    heldout = heldout_scores(probs, labels, mask, np.arange(len(val)), "f1", MIN_POSITIVES)
    assert float(metrics["val/score_heldout"]) == pytest.approx(heldout["score"], abs=1e-6)
    assert float(metrics["val/f1_heldout"]) == pytest.approx(heldout["mean_f1"], abs=1e-6)
    assert float(metrics["val/threshold/AU12"]) == pytest.approx(expected[2], abs=1e-7)
    assert float(metrics["val/f1_fitted/AU6"]) == pytest.approx(scores["f1"][1], abs=1e-6)
    # the fitted thresholds beat (or tie) 0.5 on F1, as they were fitted for it
    assert scores["mean_f1"] >= au_scores(probs, labels, mask, 0.5)["mean_f1"] - 1e-12


def _sklearn_f1_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """Best-F1 threshold of one AU by brute force over its distinct probabilities (scikit-learn's F1)."""
    if y.sum() == 0:
        return 0.5
    candidates = np.unique(p)
    f1s = np.array([f1_score(y, p >= t, zero_division=0) for t in candidates])
    return _pick(f1s, candidates)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_heldout_scores_decide_each_half_at_thresholds_fitted_on_the_other(seed):
    from callbacks.soft_threshold import heldout_scores, validation_half

    probs, labels, mask = random_case(seed, 301, 4)
    index = np.arange(1000, 1301)
    half = validation_half(index)
    assert 0.4 < half.mean() < 0.6
    decisions = np.zeros_like(probs, dtype=bool)
    for h in (0, 1):
        fit, decide = half != h, half == h
        for k in range(probs.shape[1]):
            m = mask[fit, k]
            t = _sklearn_f1_threshold(probs[fit, k][m], labels[fit, k][m] > 0.5)
            decisions[decide, k] = probs[decide, k] >= t
    f1 = [f1_score(labels[mask[:, k], k] > 0.5, decisions[mask[:, k], k], zero_division=0) for k in range(4)]
    acc = [accuracy_score(labels[mask[:, k], k] > 0.5, decisions[mask[:, k], k]) for k in range(4)]
    got = heldout_scores(probs, labels, mask, index, "f1")
    np.testing.assert_allclose(got["f1"], f1, atol=1e-12)
    np.testing.assert_allclose(got["accuracy"], acc, atol=1e-12)
    assert got["score"] == pytest.approx((np.mean(f1) + np.mean(acc)) / 2, abs=1e-12)
    # Scoring where the thresholds were fitted can only flatter: the in-sample F1 is the best there is.
    assert au_scores(probs, labels, mask, fit_thresholds(probs, labels, mask, "f1"))["mean_f1"] >= got["mean_f1"]
    # The halves depend on the sample, not on the order the samples arrive in (DDP gathers shuffle them).
    order = np.random.default_rng(seed).permutation(len(index))
    again = heldout_scores(probs[order], labels[order], mask[order], index[order], "f1")
    assert again["score"] == got["score"]


# -- AUs with too few positives to fit ------------------------------------------------------------
def rare_case(seed: int = 0, n: int = 200):
    """AU1 frequent (~40 % positive), AU2 with 3 positives scoring low: a fit on them cuts far below 0.5."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 2))
    labels[:, 0] = rng.random(n) < 0.4
    labels[rng.choice(n, 3, replace=False), 1] = 1
    probs = np.clip(0.25 + 0.5 * labels[:, :1] + rng.normal(0, 0.15, (n, 1)), 0, 1)
    probs = np.hstack([probs, np.clip(rng.normal(0.08, 0.05, (n, 1)) + 0.06 * labels[:, 1:], 0, 1)])
    return probs, labels, np.ones_like(labels, bool)


def test_fallback_thresholds_by_hand():
    fitted, positives = np.array([0.1, 0.2, 0.9, 0.3]), np.array([0, 4, 5, 12])
    np.testing.assert_array_equal(fallback_thresholds(fitted, positives, 5, "default"), [0.5, 0.5, 0.9, 0.3])
    # shrink (the default): 0.5 + (t - 0.5) * n / 5 for n < 5 -> 0.5, 0.5 - 0.3 * 4/5 = 0.26; the rest as fitted
    np.testing.assert_allclose(fallback_thresholds(fitted, positives, 5), [0.5, 0.26, 0.9, 0.3])
    np.testing.assert_array_equal(fallback_thresholds(fitted, positives, 0), fitted)
    with pytest.raises(ValueError, match="unknown threshold fallback 'median'"):
        fallback_thresholds(fitted, positives, 5, "median")
    with pytest.raises(ValueError, match="min_positives must be a whole number"):
        fit_thresholds(np.zeros((2, 1)), np.zeros((2, 1)), min_positives=-1)


def test_rare_au_falls_back_and_frequent_au_keeps_its_fit():
    probs, labels, mask = rare_case()
    free = fit_thresholds(probs, labels, mask, "f1")
    assert free[1] < 0.3  # three positives: the fit follows them down
    ruled = fit_thresholds(probs, labels, mask, "f1", min_positives=10, fallback="default")
    assert ruled[0] == free[0] and ruled[1] == 0.5
    shrunk = fit_thresholds(probs, labels, mask, "f1", min_positives=10)  # 3 of 10 positives: 30 % of the fit's move
    assert shrunk[0] == free[0] and shrunk[1] == pytest.approx(0.5 + (free[1] - 0.5) * 0.3)
    np.testing.assert_array_equal(labelled_positives(labels, mask), [labels[:, 0].sum(), 3])
    # a masked-out positive does not count
    mask2 = mask.copy()
    mask2[np.flatnonzero(labels[:, 1])[0], 1] = False
    assert labelled_positives(labels, mask2)[1] == 2


def test_heldout_score_applies_the_rule_to_each_half():
    probs, labels, mask = rare_case(1)
    index = np.arange(len(probs))
    got = heldout_scores(probs, labels, mask, index, "f1", 10, "default")
    half = validation_half(index)
    tp = fp = fn = 0
    for h in (0, 1):  # by hand: the rare AU never has 10 positives in a half, so it is decided at 0.5
        fit, decide = half != h, half == h
        t = fit_thresholds(probs[fit], labels[fit], mask[fit], "f1")[1]
        assert t != 0.5 or labels[fit, 1].sum() == 0
        d, y = probs[decide, 1] >= 0.5, labels[decide, 1] > 0.5
        tp, fp, fn = tp + int((d & y).sum()), fp + int((d & ~y).sum()), fn + int((~d & y).sum())
    expected_f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan
    assert got["f1"][1] == pytest.approx(expected_f1, nan_ok=True)


def test_callback_reports_which_aus_fell_back():
    probs, labels, mask = rare_case(2)
    n, k = labels.shape
    module = FakeRank0Module(k, None)
    trainer = SimpleNamespace(world_size=1, sanity_checking=False)
    cb = SoftThresholdCallback("f1", min_positives=MIN_POSITIVES)
    cb.on_validation_epoch_start(trainer, module)
    batch = ValidationBatch(torch.from_numpy(probs).float(), torch.from_numpy(labels).float(),
                            torch.from_numpy(mask), torch.arange(n))
    cb.on_validation_batch_end(trainer, module, batch, None, 0)
    cb.on_validation_epoch_end(trainer, module)
    fit = module.threshold_fit
    assert fit.fell_back.tolist() == [False, True] and fit.min_positives == MIN_POSITIVES
    assert fit.fallback_reasons() == {"AU2": f"3 validation positives < {MIN_POSITIVES}: shrunk toward 0.5"}
    free = fit_thresholds(probs, labels, mask, "f1")[1]
    assert module.logged["val/threshold_fallbacks"] == 1.0
    assert module.logged["val/threshold/AU2"] == pytest.approx(0.5 + (free - 0.5) * 3 / MIN_POSITIVES)
    rows = au_report(fit.aus, fit.at_default, fit.fitted, fit.thresholds, fit.fallback_reasons())
    assert [r["threshold_from"] for r in rows] == [
        "fitted", "fallback (3 validation positives < 10: shrunk toward 0.5)", "1 fell back"]
    with pytest.raises(ValueError, match="unknown threshold fallback"):
        SoftThresholdCallback(fallback="nearest")
