"""AU intensity measures: ICC(3,1) agrees with pingouin, PCC with scipy and MAE with scikit-learn;
the torchmetrics class agrees with the pure function over any batching, deduplicates DistributedSampler's
repeats, ignores whatever lies under the mask and keeps float64 accuracy on float32 inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pingouin
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error

from lightning_modules.intensity import AUIntensityMetrics, intensity_scores, intensity_sums

UNKNOWN = 999


def random_case(seed: int, n: int, k: int = 5, unknown: float = 0.2, integer_pred: bool = False):
    """Levels 0-5 (mostly absent, as in DISFA), float predictions near them, ``999`` where unknown."""
    rng = np.random.default_rng(seed)
    target = rng.choice(6, size=(n, k), p=[0.5, 0.15, 0.12, 0.1, 0.08, 0.05]).astype(np.float64)
    pred = np.clip(target + rng.normal(0, rng.uniform(0.3, 1.5, size=k), size=(n, k)), -0.5, 5.5)
    if integer_pred:
        pred = np.rint(pred).clip(0, 5)
    mask = rng.random((n, k)) >= unknown
    target[~mask] = UNKNOWN
    return pred, target, mask


def pingouin_icc3(t: np.ndarray, p: np.ndarray) -> float:
    """ICC(3,1) of n targets rated by the ground truth and the prediction (pingouin needs n >= 3)."""
    n = len(t)
    long = pd.DataFrame({"target": np.tile(np.arange(n), 2), "rater": ["truth"] * n + ["pred"] * n,
                         "rating": np.concatenate([t, p])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant columns: 0/0 in its F test
        table = pingouin.intraclass_corr(long, targets="target", raters="rater", ratings="rating")
    # the row is "ICC3" ("Single fixed raters") before pingouin 0.6, "ICC(C,1)" since
    return float(table.loc[table["Type"].isin(["ICC3", "ICC(C,1)"]), "ICC"].iloc[0])


def anova_icc3(t: np.ndarray, p: np.ndarray) -> float:
    """ICC(3,1) from the Shrout & Fleiss two-way ANOVA of the (n, 2) table, for n = 2 where pingouin refuses."""
    x = pd.DataFrame({"truth": t, "pred": p})
    n, k = x.shape
    grand = x.to_numpy().mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((x - grand) ** 2).to_numpy().sum() - ss_rows - ss_cols
    ms_r, ms_e = ss_rows / (n - 1), ss_error / ((n - 1) * (k - 1))
    return (ms_r - ms_e) / (ms_r + (k - 1) * ms_e)


def reference_scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {"icc": [], "pcc": [], "mae": []}
    for k in range(pred.shape[1]):
        t, p = target[mask[:, k], k], pred[mask[:, k], k]
        if len(t) < 2:
            out["icc"].append(np.nan)
            out["pcc"].append(np.nan)
        else:
            out["icc"].append(pingouin_icc3(t, p) if len(t) >= 3 else anova_icc3(t, p))
            constant = np.ptp(t) == 0 or np.ptp(p) == 0  # scipy warns and returns nan too
            out["pcc"].append(np.nan if constant else float(pearsonr(t, p).statistic))
        out["mae"].append(mean_absolute_error(t, p) if len(t) else np.nan)
    return {key: np.array(v) for key, v in out.items()}


def assert_scores_close(got: dict, ref: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    for key in ("icc", "pcc", "mae"):
        values = np.asarray(got[key], dtype=np.float64)
        np.testing.assert_allclose(values, ref[key], rtol=0, atol=atol, equal_nan=True, err_msg=key)
        finite = ref[key][np.isfinite(ref[key])]
        expected_mean = finite.mean() if finite.size else np.nan
        np.testing.assert_allclose(float(got[f"mean_{key}"]), expected_mean, rtol=0, atol=atol, equal_nan=True,
                                   err_msg=f"mean_{key}")


@pytest.mark.parametrize("seed, n, integer_pred", [(0, 3, False), (1, 4, True), (2, 9, False), (3, 40, False),
                                                  (4, 150, True), (5, 500, False)])
def test_intensity_scores_match_pingouin_scipy_and_sklearn(seed, n, integer_pred):
    pred, target, mask = random_case(seed, n, integer_pred=integer_pred)
    got = intensity_scores(pred, target, mask)
    assert_scores_close(got, reference_scores(pred, target, mask))
    np.testing.assert_array_equal(got["support"], mask.sum(0))
    assert_scores_close(intensity_scores(torch.tensor(pred), torch.tensor(target)),  # default mask: 999 is unknown
                        reference_scores(pred, target, mask))


def test_hand_computed_case():
    # t = [0, 1, 2, 3], p = [0, 1, 2, 4]: t̄ = 1.5, p̄ = 1.75; v_t = Σ(t - t̄)² = 5,
    # v_p = 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75, c = 2.625 + 0.375 + 0.125 + 3.375 = 6.5.
    # Two-way ANOVA, n = 4, k = 2: SS_R = (v_t + v_p + 2c) / 2 = 13.375, SS_E = (v_t + v_p - 2c) / 2 = 0.375,
    # MS_R = 13.375 / 3, MS_E = 0.375 / 3: ICC(3,1) = (MS_R - MS_E) / (MS_R + MS_E) = 13 / 13.75 = 52 / 55.
    # PCC = c / sqrt(v_t v_p) = 6.5 / sqrt(43.75); MAE = |3 - 4| / 4 = 0.25.
    s = intensity_scores(np.array([0.0, 1, 2, 4]), np.array([0, 1, 2, 3]))
    assert s["icc"][0] == pytest.approx(52 / 55, abs=1e-12)
    assert s["pcc"][0] == pytest.approx(6.5 / np.sqrt(43.75), abs=1e-12)
    assert s["mae"][0] == pytest.approx(0.25, abs=1e-12)
    assert s["support"].tolist() == [4]
    assert pingouin_icc3(np.array([0.0, 1, 2, 3]), np.array([0.0, 1, 2, 4])) == pytest.approx(52 / 55, abs=1e-12)


def test_nan_cases():
    target = np.array([[2, 0, 1, UNKNOWN, 1], [2, 0, UNKNOWN, UNKNOWN, 2], [2, 0, UNKNOWN, UNKNOWN, 4]], dtype=float)
    pred = np.array([[1.0, 0, 0.5, 3, 0.3], [3, 0, 9, 9, 0.3], [2, 0, 9, 9, 0.3]])
    s = intensity_scores(pred, target)
    # AU 0: constant target, varying prediction: c = 0 gives ICC 0, PCC nan (a variance is 0)
    # AU 1: both constant (MS_R + MS_E = 0): ICC and PCC nan; MAE 0
    # AU 2: one labelled entry: ICC and PCC nan; MAE still |1 - 0.5|
    # AU 3: no labelled entry: all nan, support 0
    # AU 4: constant prediction: ICC 0, PCC nan
    np.testing.assert_array_equal(s["support"], [3, 3, 1, 0, 3])
    np.testing.assert_allclose(s["icc"], [0, np.nan, np.nan, np.nan, 0], atol=1e-12)
    assert np.isnan(s["pcc"]).all()
    np.testing.assert_allclose(s["mae"], [2 / 3, 0, 0.5, np.nan, (0.7 + 1.7 + 3.7) / 3], atol=1e-12)
    assert s["mean_icc"] == 0 and np.isnan(s["mean_pcc"])
    assert s["mean_mae"] == pytest.approx((2 / 3 + 0 + 0.5 + 6.1 / 3) / 4)
    # a constant float prediction whose float64 sums do not cancel exactly is still constant
    t = np.arange(1000) % 6
    p = np.full(1000, 0.1)
    s = intensity_scores(p, t)
    assert s["icc"][0] == 0 and np.isnan(s["pcc"][0])
    # the metric agrees, nan and all
    metric = AUIntensityMetrics(5)
    metric.update(torch.tensor(pred), torch.tensor(target), torch.tensor(target != UNKNOWN))
    out = metric.compute()
    assert_scores_close(out, {k: intensity_scores(pred, target)[k] for k in ("icc", "pcc", "mae")})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_equals_function_over_arbitrary_batches(seed):
    pred, target, mask = random_case(10 + seed, 357)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, 357), size=6, replace=False))
    metric = AUIntensityMetrics(5)
    garbage = [np.nan, np.inf, -1e30, UNKNOWN]
    for rows in np.split(np.arange(357), cuts):
        p, t, m = pred[rows].copy(), target[rows].copy(), mask[rows]
        p[~m] = rng.choice(garbage, size=int((~m).sum()))  # whatever lies under the mask changes nothing
        t[~m] = rng.choice(garbage, size=int((~m).sum()))
        metric.update(torch.tensor(p, dtype=torch.float32), torch.tensor(t), torch.tensor(m))
    out = metric.compute()
    ref = intensity_scores(pred.astype(np.float32), target, mask)
    assert_scores_close(out, ref)
    assert out["support"].dtype == torch.long and out["support"].tolist() == mask.sum(0).tolist()
    assert out["mean_icc"].ndim == 0 and set(out) == set(ref)
    metric.reset()
    with pytest.raises(ValueError, match="must be"):
        metric.update(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool))


def test_dedupe_by_index_counts_each_sample_once():
    """DistributedSampler's padding repeats samples; the deduplicating metric counts them once."""
    pred, target, mask = random_case(21, 13)
    order = list(range(13)) + [0, 5, 5]  # padded with repeats; what each of two ranks sees
    metric = AUIntensityMetrics(5, dedupe_by_index=True)
    for part in (order[0::2], order[1::2]):
        metric.update(torch.tensor(pred[part]), torch.tensor(target[part]), torch.tensor(mask[part]),
                      index=torch.tensor(part))
    out = metric.compute()
    assert_scores_close(out, reference_scores(pred, target, mask))
    assert out["support"].tolist() == mask.sum(0).tolist()
    plain = AUIntensityMetrics(5)
    plain.update(torch.tensor(pred[order]), torch.tensor(target[order]), torch.tensor(mask[order]))
    assert int(plain.compute()["support"].sum()) == int(mask[order].sum())  # the repeats counted
    with pytest.raises(ValueError, match="index"):
        metric.update(torch.tensor(pred), torch.tensor(target), torch.tensor(mask))


def test_float32_inputs_with_large_n_keep_float64_accuracy():
    """300k float32 rows at levels D-E (a large mean beside the spread, where Σx² - (Σx)²/n cancels the
    most) against a two-pass, centred float64 computation on the same values. Sums kept in float32
    would be about 1.4e-5 off in ICC and PCC here; float64 sums are within 3e-8."""
    n, k = 300_000, 5
    rng = np.random.default_rng(7)
    target = rng.integers(4, 6, size=(n, k)).astype(np.float32)
    pred = (target + rng.normal(0, 0.3, size=(n, k))).astype(np.float32)
    mask = rng.random((n, k)) >= 0.1
    metric = AUIntensityMetrics(k)
    for rows in np.array_split(np.arange(n), 37):
        metric.update(torch.from_numpy(pred[rows]), torch.from_numpy(target[rows]), torch.from_numpy(mask[rows]))
    out = metric.compute()
    ref: dict[str, list[float]] = {"icc": [], "pcc": [], "mae": []}
    for j in range(k):
        t, p = target[mask[:, j], j].astype(np.float64), pred[mask[:, j], j].astype(np.float64)
        dt, dp = t - t.mean(), p - p.mean()
        ref["icc"].append(2 * (dt @ dp) / (dt @ dt + dp @ dp))
        ref["pcc"].append(np.corrcoef(t, p)[0, 1])
        ref["mae"].append(np.abs(t - p).mean())
    assert_scores_close(out, {key: np.array(v) for key, v in ref.items()})
    assert_scores_close(intensity_scores(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask)),
                        {key: np.array(v) for key, v in ref.items()})


def test_sums_add_up_over_parts():
    pred, target, mask = random_case(30, 50)
    whole = intensity_sums(pred, target, mask)
    parts = intensity_sums(pred[:20], target[:20], mask[:20]) + intensity_sums(pred[20:], target[20:], mask[20:])
    for a, b in zip(vars(whole).values(), vars(parts).values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert whole.n.dtype == torch.float64
