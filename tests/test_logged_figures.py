"""The figures a fit and its test log to MLflow, recomputed apart from the code that logged them.

The session's small fit (conftest's ``small_fit``: SynthAU's 120 scenes, one epoch of two batches)
and ``au-detect test`` on its best checkpoint, into one run. The checkpoint's network is then run
on the validation and test crops as the DataModule feeds them in evaluation, and every figure is
recomputed with scikit-learn per AU over the labelled entries only (``999`` never counts): F1 and
accuracy at 0.5 and at the thresholds, their means over the AUs with a labelled entry, the score,
micro-F1, the thresholds fitted on validation, the held-out figures (each half decided at
thresholds fitted on the other) and the prior predictor's F1. Each must equal the logged value to 1e-5.

The splits have AUs with positives, negatives and unlabelled entries, and the fitted thresholds
change test decisions, so that figures made with the mask ignored, or at 0.5 instead of the
thresholds, differ from the right ones (checked below as well).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from callbacks.soft_threshold import SoftThresholdCallback
from lightning_modules.au_detector import AUDetector
from lightning_modules.checkpoints import load_checkpoint

from .training_helpers import torch_threads

TOL = 1e-5


def _predictions(model: AUDetector, datamodule, loader) -> dict[str, np.ndarray]:
    """The network's probabilities on an evaluation loader's batches, with the batches' labels,
    mask and sample index (normalised as the DataModule does after the transfer)."""
    out = {"probs": [], "labels": [], "mask": [], "index": []}
    with torch.no_grad():
        for batch in loader:
            batch = datamodule.on_after_batch_transfer(batch, 0)
            out["probs"].append(torch.sigmoid(model(batch["image"])).numpy())
            for key in ("labels", "mask", "index"):
                out[key].append(np.asarray(batch[key]))
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def logged(small_fit):
    """The fit's and the test's run, the checkpoint the test ran, and its predictions on both splits."""
    fit, test, run_id, best = small_fit["fit"], small_fit["test"], small_fit["run_id"], small_fit["best"]
    # `au-detect fit` does not test: `au-detect test --ckpt_path <best>` does, into the fit's run
    assert test.trainer.logger.run_id == run_id and load_checkpoint(best)["mlflow_run_id"] == run_id
    client = small_fit["client"]
    run = client.get_run(run_id)
    model = AUDetector.load_from_checkpoint(best, map_location="cpu").eval()
    with torch_threads(2):  # as the fit ran
        val = _predictions(model, fit.datamodule, fit.datamodule.val_dataloader())
        tested = _predictions(model, test.datamodule, test.datamodule.test_dataloader())
    # the validation the figures came from saw these predictions (the best epoch is the only one)
    np.testing.assert_allclose(val["probs"], fit.model.threshold_fit.probs, atol=1e-6)
    return {"run": run, "client": client, "model": model, "aus": [f"AU{a}" for a in model.aus],
            "val": val, "test": tested,
            "val_split": fit.datamodule.splits["val"], "thresholds": model.thresholds.numpy(),
            "soft_threshold": next(c for c in fit.trainer.callbacks if isinstance(c, SoftThresholdCallback))}


# -- the recomputation, with scikit-learn ------------------------------------------------------

def per_au(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, thresholds, aus: list[str]) -> dict:
    """F1 and accuracy of each AU with a labelled entry, over its labelled entries, of the
    decisions ``probs >= threshold``; F1 is 0 without a true positive."""
    decisions = probs >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (probs.shape[1],))
    return scores_of_decisions(decisions, labels, mask, aus)


def scores_of_decisions(decisions: np.ndarray, labels: np.ndarray, mask: np.ndarray, aus: list[str]) -> dict:
    f1, acc = {}, {}
    for k, au in enumerate(aus):
        m = mask[:, k].astype(bool)
        if m.any():
            y, d = labels[m, k] > 0.5, decisions[m, k]
            f1[au] = f1_score(y, d, zero_division=0)
            acc[au] = accuracy_score(y, d)
    labelled = mask.astype(bool)
    micro = f1_score((labels > 0.5)[labelled], decisions[labelled], zero_division=0)  # every labelled entry pooled
    mean_f1, mean_acc = float(np.mean(list(f1.values()))), float(np.mean(list(acc.values())))
    return {"f1": f1, "accuracy": acc, "mean_f1": mean_f1, "mean_accuracy": mean_acc,
            "score": (mean_f1 + mean_acc) / 2, "micro_f1": micro}


def figures(stage: str, scores: dict, suffix: str = "", per_au_figures: bool = True) -> dict[str, float]:
    """The names the module logs the scores under."""
    out = {f"{stage}/f1{suffix}": scores["mean_f1"], f"{stage}/accuracy{suffix}": scores["mean_accuracy"],
           f"{stage}/score{suffix}": scores["score"]}
    if per_au_figures:
        out |= {f"{stage}/f1{suffix}/{au}": v for au, v in scores["f1"].items()}
        out |= {f"{stage}/accuracy{suffix}/{au}": v for au, v in scores["accuracy"].items()}
    return out


def f1_threshold(probs: np.ndarray, positive: np.ndarray) -> float:
    """The threshold of best F1 among the AU's labelled probabilities; ties to the one nearest
    0.5, then the higher; 0.5 without a labelled positive."""
    if not positive.any():
        return 0.5
    candidates = np.unique(probs.astype(np.float64))
    f1 = np.array([f1_score(positive, probs >= t, zero_division=0) for t in candidates])
    best = candidates[f1 >= f1.max() - 1e-12]
    nearest = best[np.abs(best - 0.5) <= np.abs(best - 0.5).min() + 1e-15]
    return float(nearest.max())


def fitted_thresholds(probs, labels, mask, min_positives: int) -> np.ndarray:
    """Per AU the F1-best threshold, moved toward 0.5 by the share of ``min_positives`` positives missing."""
    out = []
    for k in range(probs.shape[1]):
        m = mask[:, k].astype(bool)
        positive = labels[m, k] > 0.5
        t = f1_threshold(probs[m, k], positive)
        n = int(positive.sum())
        out.append(t if n >= min_positives else 0.5 + (t - 0.5) * n / min_positives)
    return np.array(out)


def knuth_half(index: np.ndarray) -> np.ndarray:
    """0 or 1 per sample: the top bit of the 32-bit product of its index with Knuth's constant."""
    return np.array([((int(i) * 2654435761) % 2 ** 32) >> 31 for i in index])


def mask_ignored(mask: np.ndarray) -> np.ndarray:
    """Every entry taken as labelled (``999`` read as a negative): the mistake the figures must show."""
    return np.ones_like(mask, dtype=bool)


def compare(expected: dict[str, float], logged: dict[str, float]) -> float:
    """Every expected figure logged and equal to 1e-5; returns the largest difference."""
    missing = sorted(set(expected) - set(logged))
    assert not missing, f"not logged: {missing}"
    wrong = {k: (logged[k], v) for k, v in expected.items() if not abs(logged[k] - v) <= TOL}
    assert not wrong, f"logged vs recomputed: {wrong}"
    return max(abs(logged[k] - v) for k, v in expected.items())


def threshold_rule(logged) -> int:
    """The fit's fallback floor, after checking that its rule is the one recomputed here."""
    callback = logged["soft_threshold"]
    assert (callback.criterion, callback.fallback) == ("f1", "shrink")
    return callback.min_positives


def has_mixed_and_masked_au(labels: np.ndarray, mask: np.ndarray) -> bool:
    mask = mask.astype(bool)
    pos, neg = ((labels > 0.5) & mask).any(0), ((labels < 0.5) & mask).any(0)
    return bool((pos & neg & (~mask).any(0)).any())


# -- the tests ---------------------------------------------------------------------------------

def test_test_figures_are_sklearns_on_the_checkpoints_predictions(logged):
    metrics, aus, t = logged["run"].data.metrics, logged["aus"], logged["thresholds"]
    p, y, m = (logged["test"][k] for k in ("probs", "labels", "mask"))
    assert len(p) >= 10 and has_mixed_and_masked_au(y, m)
    fitted, default = per_au(p, y, m, t, aus), per_au(p, y, m, 0.5, aus)
    expected = figures("test", fitted) | figures("test", default, "_default")
    expected |= {"test/f1_micro": fitted["micro_f1"], "test/f1_micro_default": default["micro_f1"]}
    for k, au in enumerate(aus):
        if m[:, k].any():
            positives = int(((y[:, k] > 0.5) & m[:, k]).sum())
            expected |= {f"test/positives/{au}": positives, f"test/negatives/{au}": int(m[:, k].sum()) - positives}
    compare(expected, metrics)
    # what makes this a check of the mask and of the thresholds: either mistake moves the figures
    unmasked = per_au(p, y, mask_ignored(m), t, aus)
    assert abs(unmasked["mean_accuracy"] - fitted["mean_accuracy"]) > 1e-3
    changed = max(abs(fitted[kind][au] - default[kind][au]) for kind in ("f1", "accuracy") for au in fitted["f1"])
    assert changed > 1e-3  # some labelled test decision differs between the thresholds and 0.5


def test_thresholds_are_fitted_on_validation_as_the_rule_says(logged, tmp_path):
    min_positives = threshold_rule(logged)
    v = logged["val"]
    mine = fitted_thresholds(v["probs"], v["labels"], v["mask"], min_positives)
    np.testing.assert_allclose(logged["thresholds"], mine, atol=1e-6)  # the checkpoint's, which the test used
    expected = {f"val/threshold/{au}": t for au, t in zip(logged["aus"], mine)}
    positives = ((v["labels"] > 0.5) & v["mask"]).sum(0)
    expected["val/threshold_fallbacks"] = int((positives < min_positives).sum())
    compare(expected, logged["run"].data.metrics)
    path = logged["client"].download_artifacts(logged["run"].info.run_id, "thresholds.json", str(tmp_path))
    thresholds = json.loads(open(path).read())
    np.testing.assert_allclose(list(thresholds["thresholds"].values()), mine, atol=1e-6)
    assert (thresholds["min_positives"], thresholds["fallback"], thresholds["criterion"]) == (min_positives, "shrink", "f1")


def test_validation_figures_are_sklearns_on_the_checkpoints_predictions(logged):
    min_positives = threshold_rule(logged)
    metrics, aus = logged["run"].data.metrics, logged["aus"]
    p, y, m, index = (logged["val"][k] for k in ("probs", "labels", "mask", "index"))
    assert len(p) >= 10 and has_mixed_and_masked_au(y, m)
    thresholds = fitted_thresholds(p, y, m, min_positives)
    at_half, fitted = per_au(p, y, m, 0.5, aus), per_au(p, y, m, thresholds, aus)
    # held out: each half decided at thresholds fitted on the other half, the decisions pooled
    half = knuth_half(index)
    assert 0 < half.sum() < len(half)
    decisions = np.zeros_like(p, dtype=bool)
    for h in (0, 1):
        other = fitted_thresholds(p[half != h], y[half != h], m[half != h], min_positives)
        decisions[half == h] = p[half == h] >= other
    heldout = scores_of_decisions(decisions, y, m, aus)
    # the prior predictor: every entry positive, F1 = 2p / (1 + p), over AUs with a labelled entry
    split = logged["val_split"]
    prior = np.mean([f1_score(split.labels[split.mask[:, k], k] > 0.5, np.ones(split.mask[:, k].sum(), bool),
                              zero_division=0) for k in range(len(aus)) if split.mask[:, k].any()])
    expected = figures("val", at_half)
    expected |= {f"val/f1_fitted/{au}": v for au, v in fitted["f1"].items()}
    for kind, scores in (("fitted", fitted), ("heldout", heldout)):
        expected |= {f"val/f1_{kind}": scores["mean_f1"], f"val/accuracy_{kind}": scores["mean_accuracy"],
                     f"val/score_{kind}": scores["score"]}
    expected["val/f1_prior"] = prior
    compare(expected, metrics)
    # ignoring the mask moves the figures
    unmasked = per_au(p, y, mask_ignored(m), 0.5, aus)
    assert abs(unmasked["mean_accuracy"] - at_half["mean_accuracy"]) > 1e-3
