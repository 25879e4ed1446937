"""EmotioNet Challenge metrics: numpy functions and the torchmetrics class agree with scikit-learn, and so
do the curves over thresholds; evaluation outputs of every rank are gathered and de-duplicated."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_curve, precision_score,
                             recall_score, roc_curve)

from callbacks.plots import precision_recall
from lightning_modules.evaluation import dedupe_by_index, gather_rows
from lightning_modules.metrics import AUMetrics, _ties_interchangeable, au_confusion, au_scores, ranked_counts


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_f1_matches_sklearn_on_the_labelled_decisions(seed):
    probs, labels, mask = random_case(seed)
    thresholds = np.random.default_rng(seed + 10).uniform(0.2, 0.9, probs.shape[1])
    s = au_scores(probs, labels, mask, thresholds)
    # scikit-learn's multilabel micro average cannot mask: pool the labelled entries as one column
    y = (labels > 0.5)[mask]
    pred = (probs >= thresholds)[mask]
    assert s["micro_f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
    full = np.ones_like(mask)
    assert au_scores(probs, labels == 1, full, thresholds)["micro_f1"] == pytest.approx(
        f1_score(labels == 1, probs >= thresholds, average="micro", zero_division=0), abs=1e-12)


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


def test_au_confusion_matches_sklearn_confusion_matrix():
    probs, labels, mask = random_case(6, n=300, k=4)
    probs[:20] = 0.5  # on the threshold: positive
    counts = np.stack(au_confusion(probs, labels, mask, 0.5))
    for k in range(4):
        m = mask[:, k]
        (tn, fp), (fn, tp) = confusion_matrix(labels[m, k] > 0.5, probs[m, k] >= 0.5, labels=[False, True])
        np.testing.assert_array_equal(counts[:, k], [tp, fp, tn, fn])
    one = np.stack(au_confusion(probs[:, 0], labels[:, 0], mask[:, 0], 0.5))  # a single AU, 1-D
    np.testing.assert_array_equal(one[:, 0], counts[:, 0])


# -- the counting behind curves: ranked_counts ------------------------------------------------

def test_ranked_counts_by_hand():
    # sorted: 0.9 (+), 0.8 (+), 0.8 (-), 0.3 (+), 0.1 (-); the tied 0.8 is one threshold
    thresholds, tp, fp = ranked_counts(np.array([0.3, 0.9, 0.8, 0.8, 0.1]), np.array([1, 1, 1, 0, 0]))
    np.testing.assert_array_equal(thresholds, [0.9, 0.8, 0.3, 0.1])
    np.testing.assert_array_equal(tp, [1, 2, 3, 3])
    np.testing.assert_array_equal(fp, [0, 1, 1, 2])
    t32, _, _ = ranked_counts(np.array([0.7, 0.2], dtype=np.float32), np.array([True, False]))
    assert t32.dtype == np.float32  # thresholds are score values: score >= t reproduces the counts
    empty = ranked_counts(np.zeros(0), np.zeros(0, bool))
    assert all(len(a) == 0 for a in empty)


@pytest.mark.parametrize("seed", [0, 1])
def test_ranked_counts_match_sklearn_at_every_threshold(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random(400).round(2)  # many ties
    positive = rng.random(400) < 0.3 + 0.4 * scores
    thresholds, tp, fp = ranked_counts(scores, positive)
    np.testing.assert_array_equal(thresholds, np.unique(scores)[::-1])
    for t, a, b in zip(thresholds, tp, fp):
        (_, fp_ref), (_, tp_ref) = confusion_matrix(positive, scores >= t, labels=[False, True])
        assert (a, b) == (tp_ref, fp_ref)
    # the F1 curve from the counts is scikit-learn's F1 at each threshold
    f1 = 2 * tp / (tp + positive.sum() + fp)
    np.testing.assert_allclose(f1, [f1_score(positive, scores >= t, zero_division=0) for t in thresholds],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_curve_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random(300).round(2).astype(np.float32)
    positive = rng.random(300) < 0.2 + 0.5 * scores
    precision, recall, thresholds = precision_recall(scores, positive)
    # scikit-learn: thresholds ascending, and a last point (P = 1, R = 0) without a threshold
    ref_p, ref_r, ref_t = precision_recall_curve(positive, scores)
    np.testing.assert_array_equal(thresholds, ref_t[::-1])
    np.testing.assert_allclose(precision, ref_p[:-1][::-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(recall, ref_r[:-1][::-1], rtol=0, atol=1e-12)


def test_pr_curves_figure_draws_sklearns_curve_of_each_au_on_its_labelled_entries():
    import matplotlib.pyplot as plt

    from callbacks.plots import pr_curves_figure

    rng = np.random.default_rng(2)
    aus = [1, 2, 4, 6, 12, 25, 26]  # two rows of 6: the last row's empty panels hidden
    probs = rng.random((40, 7)).round(2)
    labels = (rng.random((40, 7)) < 0.4).astype(float)
    mask = rng.random((40, 7)) < 0.8
    labels[:, 3] = 0  # AU6: no positive
    thresholds = rng.random(7)
    fig = pr_curves_figure(aus, probs, labels, mask.astype(float), thresholds)
    try:
        axes = fig.axes
        assert len(axes) == 12 and not any(ax.axison for ax in axes[7:])
        for i, ax in enumerate(axes[:7]):
            m = mask[:, i]
            y = labels[m, i] > 0.5
            assert ax.get_title() == f"AU{aus[i]}  (n+={int(y.sum())})"
            if not y.any():
                assert [t.get_text() for t in ax.texts] == ["no positive"] and not ax.lines
                continue
            curve, prior, dot = ax.lines
            ref_p, ref_r, ref_t = precision_recall_curve(y, probs[m, i])
            np.testing.assert_allclose(curve.get_xdata(), ref_r[:-1][::-1], atol=1e-12)
            np.testing.assert_allclose(curve.get_ydata(), ref_p[:-1][::-1], atol=1e-12)
            assert prior.get_ydata()[0] == pytest.approx(y.mean())
            j = int(np.argmin(np.abs(ref_t - thresholds[i])))  # the point nearest the fitted threshold
            assert (dot.get_xdata()[0], dot.get_ydata()[0]) == (pytest.approx(ref_r[j]), pytest.approx(ref_p[j]))
        # tick labels on the outer panels only: the first column's y, each column's lowest x
        left = [ax.yaxis.get_tick_params()["labelleft"] for ax in axes[:7]]
        bottom = [ax.xaxis.get_tick_params()["labelbottom"] for ax in axes[:7]]
        assert left == [True, False, False, False, False, False, True]
        assert bottom == [False, True, True, True, True, True, True]
    finally:
        plt.close(fig)


# -- ranked_counts' order-keeping path: NaN, both signs of zero, integer and bool scores ------
# Scores whose ties cannot be told apart take a sorted-values path; the rest are sorted with
# their file order kept. Both are checked here against counts made entry by entry and against
# scikit-learn's ROC counts, and against each other wherever both apply.

def counted_by_hand(scores, positive):
    """Thresholds (distinct numbers among the scores, highest first) and TP, FP of ``score >= t``
    at each, counted over every entry; a NaN score is never ``>=`` a threshold."""
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(positive).reshape(-1).astype(bool)
    numbers = s[~np.isnan(s)] if np.issubdtype(s.dtype, np.floating) else s
    thresholds = np.unique(numbers)[::-1]  # -0.0 and 0.0 are one value here, as under >=
    taken = s[None, :] >= thresholds[:, None]
    return thresholds, (taken & y).sum(1), (taken & ~y).sum(1)


def sklearn_counts(scores, positive):
    """The same from scikit-learn's ROC curve with every threshold kept (finite scores, both classes)."""
    y = np.asarray(positive, bool)
    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    # its first point is the threshold above every score (nothing taken in)
    return (thresholds[1:], np.rint(tpr[1:] * y.sum()).astype(np.int64),
            np.rint(fpr[1:] * (~y).sum()).astype(np.int64))


def assert_counts_equal(got, want):
    for a, b, name in zip(got, want, ("thresholds", "tp", "fp")):
        np.testing.assert_array_equal(a, b, err_msg=name)


def both_classes(rng, n):
    y = rng.random(n) < 0.4
    y[:2] = [True, False]  # scikit-learn's counts need a positive and a negative
    rng.shuffle(y)
    return y


SIZES = [2, 9, 64, 301]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", SIZES)
def test_ranked_counts_with_nan_count_numbers_then_each_nan_in_file_order(seed, n):
    # A NaN ranks below every number and each NaN is a threshold of its own, taken in file
    # order: at every number the counts are those of ``score >= t`` (no NaN is ever taken in),
    # and the last counts take in every entry.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, n) / 5  # ties
    positive = rng.random(n) < 0.5
    nan = rng.random(n) < 0.3
    nan[rng.integers(n)] = True
    scores[nan] = np.nan
    assert not _ties_interchangeable(scores)  # the order-keeping path
    thresholds, tp, fp = ranked_counts(scores, positive)

    assert thresholds.dtype == scores.dtype and len(thresholds) == len(np.unique(scores[~nan])) + nan.sum()
    head = (thresholds[:len(thresholds) - nan.sum()], tp[:len(tp) - nan.sum()], fp[:len(fp) - nan.sum()])
    assert_counts_equal(head, counted_by_hand(scores, positive))
    # the numbers alone go through the sorted-values path: the same counts
    assert_counts_equal(head, ranked_counts(scores[~nan], positive[~nan]))
    assert not np.isnan(head[0]).any() and np.isnan(thresholds[len(head[0]):]).all()
    # after the numbers, one NaN at a time in file order
    above_tp, above_fp = np.count_nonzero(positive & ~nan), np.count_nonzero(~positive & ~nan)
    np.testing.assert_array_equal(tp[len(head[0]):], above_tp + np.cumsum(positive[nan]))
    np.testing.assert_array_equal(fp[len(head[0]):], above_fp + np.cumsum(~positive[nan]))
    assert (tp[-1], fp[-1]) == (positive.sum(), n - positive.sum())
    if np.unique(positive[~nan]).size == 2:  # scikit-learn takes finite scores of both classes only
        assert_counts_equal(head, sklearn_counts(scores[~nan], positive[~nan]))


def test_ranked_counts_all_nan():
    thresholds, tp, fp = ranked_counts(np.full(4, np.nan), np.array([1, 0, 0, 1]))
    assert np.isnan(thresholds).all() and len(thresholds) == 4
    np.testing.assert_array_equal(tp, [1, 1, 1, 2])
    np.testing.assert_array_equal(fp, [0, 1, 2, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", SIZES)
def test_ranked_counts_with_both_signs_of_zero(seed, n):
    # -0.0 and 0.0 are one threshold (``score >= 0.0`` takes in both); the value reported for
    # it is the last zero in file order, whatever the sort does with equal values
    rng = np.random.default_rng(seed)
    scores = rng.choice([-0.5, -0.0, 0.0, 0.25, 0.5], n)
    scores[:2] = [-0.0, 0.0]
    rng.shuffle(scores)
    positive = both_classes(rng, n)
    assert not _ties_interchangeable(scores)
    thresholds, tp, fp = ranked_counts(scores, positive)
    assert_counts_equal((thresholds, tp, fp), counted_by_hand(scores, positive))
    assert_counts_equal((thresholds, tp, fp), sklearn_counts(scores, positive))
    zeros = scores[scores == 0]
    assert np.signbit(thresholds[thresholds == 0]).tolist() == [np.signbit(zeros[-1])]
    # with every zero made +0.0, the sorted-values path gives the same counts
    plus = scores + 0.0  # -0.0 + 0.0 is 0.0
    assert _ties_interchangeable(plus)
    assert_counts_equal((thresholds, tp, fp), ranked_counts(plus, positive))


INT_TYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", INT_TYPES)
def test_ranked_counts_with_integer_scores(dtype, n, seed):
    # thresholds in the scores' own type; the type's smallest and largest values rank as numbers
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    pool = np.array([info.min, info.min + 1, 0, 1, 2, 7, info.max - 1, info.max], dtype=dtype)
    scores = rng.choice(np.unique(pool), n)
    positive = both_classes(rng, n)
    assert not _ties_interchangeable(scores)
    thresholds, tp, fp = ranked_counts(scores, positive)
    assert thresholds.dtype == dtype
    assert_counts_equal((thresholds, tp, fp), counted_by_hand(scores, positive))
    if info.bits <= 32:  # exact as float64: scikit-learn's thresholds and the sorted-values path
        assert_counts_equal((thresholds, tp, fp), sklearn_counts(scores, positive))
        assert_counts_equal((thresholds, tp, fp), ranked_counts(scores.astype(np.float64), positive))
    # small values, many ties: the same through the sorted-values path
    small = rng.integers(0, 5, n).astype(dtype)
    got = ranked_counts(small, positive)
    assert_counts_equal(got, counted_by_hand(small, positive))
    assert_counts_equal(got, ranked_counts(small.astype(np.float32), positive))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", SIZES)
def test_ranked_counts_with_bool_scores(seed, n):
    rng = np.random.default_rng(seed)
    scores = rng.random(n) < 0.5
    scores[:2] = [True, False]
    positive = both_classes(rng, n)
    assert not _ties_interchangeable(scores)
    thresholds, tp, fp = ranked_counts(scores, positive)
    assert thresholds.dtype == bool and thresholds.tolist() == [True, False]
    assert_counts_equal((thresholds, tp, fp), counted_by_hand(scores, positive))
    assert_counts_equal((thresholds, tp, fp), sklearn_counts(scores, positive))
    assert_counts_equal((thresholds, tp, fp), ranked_counts(scores.astype(np.float64), positive))
    only_true = ranked_counts(np.ones(n, bool), positive)  # one threshold taking in everything
    assert_counts_equal(only_true, ([True], [positive.sum()], [n - positive.sum()]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ranked_counts_both_paths_agree_on_tied_floats(dtype, n, seed, monkeypatch):
    import lightning_modules.metrics as metrics

    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, max(n // 4, 2), n) / 7).astype(dtype)  # many ties
    positive = rng.random(n) < 0.5
    assert _ties_interchangeable(scores)
    by_values = ranked_counts(scores, positive)
    monkeypatch.setattr(metrics, "_ties_interchangeable", lambda s: False)
    in_order = ranked_counts(scores, positive)
    assert_counts_equal(in_order, by_values)
    assert in_order[0].dtype == by_values[0].dtype == dtype
    assert_counts_equal(in_order, counted_by_hand(scores, positive))


# -- evaluation outputs of every rank as one set ----------------------------------------------

def test_dedupe_by_index_keeps_first_occurrence_ordered_by_index():
    index = np.array([5, 2, 5, 0, 2])
    values = np.array([50.0, 20.0, 51.0, 0.0, 21.0])
    rows = np.arange(10).reshape(5, 2)
    idx, v, r = dedupe_by_index(index, values, rows)
    np.testing.assert_array_equal(idx, [0, 2, 5])
    np.testing.assert_array_equal(v, [0.0, 20.0, 50.0])
    np.testing.assert_array_equal(r, [[6, 7], [2, 3], [0, 1]])
    idx_t, v_t, mask_t = dedupe_by_index(torch.from_numpy(index), torch.from_numpy(values),
                                         torch.tensor([True, False, False, True, True]))
    assert isinstance(idx_t, torch.Tensor) and idx_t.tolist() == [0, 2, 5]
    assert v_t.tolist() == [0.0, 20.0, 50.0] and mask_t.tolist() == [True, False, True]
    idx_mixed, v_np = dedupe_by_index(torch.from_numpy(index), values)  # each output keeps its input's type
    assert isinstance(idx_mixed, torch.Tensor) and isinstance(v_np, np.ndarray)
    with pytest.raises(ValueError, match="length 4"):
        dedupe_by_index(index, values[:4])


class FakeRanks:
    """What gather_rows uses of a LightningModule on rank 0, with the other ranks' rows given."""

    def __init__(self, others: list[dict[str, torch.Tensor]]):
        self.others = others

    def all_gather(self, data):
        if isinstance(data, torch.Tensor):  # the row counts
            return torch.stack([data] + [torch.tensor([len(o["index"])]) for o in self.others])
        out = {}
        for key, mine in data.items():
            theirs = [o[key].to(mine.dtype) for o in self.others]  # as the backend sees them
            theirs = [torch.cat([t, t.new_zeros((len(mine) - len(t), *t.shape[1:]))]) for t in theirs]
            out[key] = torch.stack([mine, *theirs])
        return out


def test_gather_rows_unequal_counts_rank_by_rank():
    rows = [{"index": torch.tensor([0, 3, 6]), "mask": torch.tensor([[True], [False], [True]])},
            {"index": torch.tensor([1, 4]), "mask": torch.tensor([[False], [False]])},
            {"index": torch.tensor([2, 5, 8, 0]), "mask": torch.tensor([[True], [True], [False], [True]])}]
    got = gather_rows(FakeRanks(rows[1:]), rows[0], world_size=3)
    assert got["index"].tolist() == [0, 3, 6, 1, 4, 2, 5, 8, 0]
    assert got["mask"].dtype == torch.bool  # bools travel as uint8 and come back as bools
    assert got["mask"].reshape(-1).tolist() == [True, False, True, False, False, True, True, False, True]
    index, mask = dedupe_by_index(got["index"], got["mask"])  # the repeated sample 0: rank 0's row
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 8] and mask[0].item() is True
    alone = gather_rows(None, rows[0], world_size=1)  # one rank: its own rows, nothing gathered
    assert all(torch.equal(alone[k], rows[0][k]) for k in rows[0])
    with pytest.raises(ValueError, match="one row per sample"):
        gather_rows(FakeRanks(rows[1:]), {"index": torch.zeros(2), "mask": torch.zeros(3)}, world_size=3)
