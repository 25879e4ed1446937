"""EmotioNet Challenge metrics: numpy functions and the torchmetrics class agree with scikit-learn."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

import lightning_modules.metrics as metrics_module
from lightning_modules.metrics import AUMetrics, au_confusion, au_scores


def random_case(seed: int, n: int = 200, k: int = 6, unlabelled: float = 0.2):
    rng = np.random.default_rng(seed)
    probs = rng.random((n, k))
    rates = rng.uniform(0.05, 0.6, size=k)
    labels = (rng.random((n, k)) < rates).astype(np.float64)
    mask = rng.random((n, k)) >= unlabelled
    labels[~mask] = 999  # EmotioNet's unlabelled code: must never count
    return probs, labels, mask


def sklearn_scores(probs, labels, mask, thresholds):
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=float), (probs.shape[1],))
    out = {"f1": [], "accuracy": [], "precision": [], "recall": []}
    for k in range(probs.shape[1]):
        m = mask[:, k]
        y, pred = labels[m, k] > 0.5, probs[m, k] >= thresholds[k]
        if not m.any():
            for key in out:
                out[key].append(np.nan)
            continue
        out["f1"].append(f1_score(y, pred, zero_division=0))
        out["accuracy"].append(accuracy_score(y, pred))
        out["precision"].append(precision_score(y, pred, zero_division=0))
        out["recall"].append(recall_score(y, pred, zero_division=0))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_au", [False, True])
def test_au_scores_match_sklearn(seed, per_au):
    probs, labels, mask = random_case(seed)
    thresholds = np.random.default_rng(seed + 10).uniform(0.2, 0.9, probs.shape[1]) if per_au else 0.5
    s = au_scores(probs, labels, mask, thresholds)
    ref = sklearn_scores(probs, labels, mask, thresholds)
    for key in ref:
        np.testing.assert_allclose(s[key], ref[key], rtol=0, atol=1e-12, err_msg=key)
    np.testing.assert_array_equal(s["support"], mask.sum(0))
    np.testing.assert_array_equal(s["positives"], ((labels == 1) & mask).sum(0))
    assert s["mean_f1"] == pytest.approx(ref["f1"].mean())
    assert s["mean_accuracy"] == pytest.approx(ref["accuracy"].mean())
    assert s["score"] == pytest.approx((ref["f1"].mean() + ref["accuracy"].mean()) / 2)


def test_unlabelled_entries_never_count():
    probs, labels, mask = random_case(3)
    s = au_scores(probs, labels, mask)
    # whatever sits under a False mask (label and prob) changes nothing
    probs2, labels2 = probs.copy(), labels.copy()
    probs2[~mask] = 1.0
    labels2[~mask] = 1
    s2 = au_scores(probs2, labels2, mask)
    for key in ("f1", "accuracy", "precision", "recall", "support"):
        np.testing.assert_array_equal(s[key], s2[key])
    # mask=None treats 999 as unlabelled
    s3 = au_scores(probs, labels)
    np.testing.assert_array_equal(s["f1"], s3["f1"])


def test_au_without_labels_is_nan_and_excluded():
    probs, labels, mask = random_case(4, k=4)
    mask[:, 2] = False
    labels[:, 2] = 999
    s = au_scores(probs, labels, mask)
    for key in ("f1", "accuracy", "precision", "recall"):
        assert np.isnan(s[key][2])
        assert np.isfinite(np.delete(s[key], 2)).all()
    assert s["support"][2] == 0
    keep = [0, 1, 3]
    assert s["mean_f1"] == pytest.approx(s["f1"][keep].mean())
    assert s["mean_accuracy"] == pytest.approx(s["accuracy"][keep].mean())
    assert np.isfinite(s["score"])
    # nothing labelled at all: nan everywhere
    empty = au_scores(probs, labels, np.zeros_like(mask))
    assert np.isnan(empty["score"]) and np.isnan(empty["mean_f1"])


def test_no_positive_au_has_f1_zero():
    probs = np.array([[0.9], [0.1], [0.2]])
    labels = np.zeros((3, 1))
    s = au_scores(probs, labels, np.ones((3, 1), bool))
    assert s["f1"][0] == 0.0 and s["accuracy"][0] == pytest.approx(2 / 3)
    # no positive and no positive prediction: sklearn's zero_division=0 gives F1 = 0 too
    s = au_scores(probs, labels, np.ones((3, 1), bool), thresholds=0.95)
    assert s["f1"][0] == 0.0 and s["accuracy"][0] == 1.0


def test_torch_inputs_and_decision_rule():
    probs = torch.tensor([[0.5, 0.49], [0.7, 0.2]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    tp, fp, tn, fn = au_confusion(probs, labels, mask, 0.5)  # prob == threshold is positive
    np.testing.assert_array_equal(tp, [1, 0])
    np.testing.assert_array_equal(fp, [1, 0])
    np.testing.assert_array_equal(tn, [0, 1])
    np.testing.assert_array_equal(fn, [0, 1])
    with pytest.raises(ValueError):
        au_confusion(probs, labels, mask, [0.5, 0.5, 0.5])


@pytest.mark.parametrize("per_au", [False, True])
def test_aumetrics_accumulates_like_au_scores(per_au):
    probs, labels, mask = random_case(5, n=150, k=5)
    mask[:, 4] = False  # an AU with no labelled entry
    thresholds = np.array([0.3, 0.5, 0.7, 0.4, 0.6]) if per_au else None
    metric = AUMetrics(5)
    for chunk in np.array_split(np.arange(150), 4):
        metric.update(torch.from_numpy(probs[chunk]).float(), torch.from_numpy(labels[chunk]).float(),
                      torch.from_numpy(mask[chunk]),
                      thresholds=None if thresholds is None else torch.from_numpy(thresholds).float())
    got = metric.compute()
    ref = au_scores(torch.from_numpy(probs).float(), labels, mask, 0.5 if thresholds is None else
                    torch.from_numpy(thresholds).float())
    for key in ("f1", "accuracy", "precision", "recall"):
        np.testing.assert_allclose(got[key].numpy(), ref[key], atol=1e-6, equal_nan=True, err_msg=key)
    np.testing.assert_array_equal(got["support"].numpy(), ref["support"])
    np.testing.assert_array_equal(got["positives"].numpy(), ref["positives"])
    for key in ("mean_f1", "mean_accuracy", "score"):
        assert float(got[key]) == pytest.approx(ref[key], abs=1e-6)
    metric.reset()
    metric.update(torch.from_numpy(probs[:10]).float(), torch.from_numpy(labels[:10]).float(), torch.from_numpy(mask[:10]))
    assert int(metric.compute()["support"].sum()) == int(mask[:10].sum())


def test_aumetrics_constructor_threshold_and_shapes():
    probs = torch.tensor([[0.6, 0.6]])
    labels = torch.tensor([[1.0, 1.0]])
    metric = AUMetrics(2, threshold=0.7)
    metric.update(probs, labels, torch.ones(1, 2, dtype=torch.bool))
    assert metric.compute()["f1"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        metric.update(torch.zeros(3, 3), torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool))


def test_doctests():
    result = doctest.testmod(metrics_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_dedupe_by_index_counts_each_sample_once():
    """DistributedSampler's padding repeats a sample; the deduplicating metric ignores the repeat."""
    rng = np.random.default_rng(3)
    probs = rng.random((13, 4)).astype(np.float32)
    labels = (rng.random((13, 4)) < 0.4).astype(np.float32)
    mask = rng.random((13, 4)) > 0.2
    order = list(range(13)) + [0]  # 13 samples padded to 14 for 2 ranks: sample 0 twice
    metric = AUMetrics(4, dedupe_by_index=True)
    for part in (order[0::2], order[1::2]):  # what the two ranks see
        metric.update(torch.tensor(probs[part]), torch.tensor(labels[part]), torch.tensor(mask[part]),
                      index=torch.tensor(part))
    expected = au_scores(probs, labels, mask)
    out = metric.compute()
    assert float(out["mean_f1"]) == pytest.approx(expected["mean_f1"], abs=1e-6)
    assert float(out["mean_accuracy"]) == pytest.approx(expected["mean_accuracy"], abs=1e-6)
    plain = AUMetrics(4)
    plain.update(torch.tensor(probs[order]), torch.tensor(labels[order]), torch.tensor(mask[order]))
    assert int(plain.compute()["support"].sum()) == int(mask.sum() + mask[0].sum())  # the repeat counted
    with pytest.raises(ValueError, match="index"):
        metric.update(torch.tensor(probs), torch.tensor(labels), torch.tensor(mask))
