"""The ablation command: rows trained through the real CLIs, tracked in MLflow, the table read back."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from experiments.ablation.report import markdown_table, orderings, per_au_changes, per_au_figure, per_au_summary
from experiments.ablation.rows import PAPER_TABLE2, ROW_BY_KEY, row_metrics
from experiments.cli import main

from .training_helpers import SMALL, write_mlflow_yaml


def test_rows_change_only_what_they_name():
    weights = {"face": "f.pt", "emotion": "e.pt"}
    face = ROW_BY_KEY["face"].overrides(weights)
    assert face["model.branches"] == ["face"] and face["model.emotion_weights"] is None
    assert face["model.face_weights"] == "f.pt" and face["data.alignment.method"] == "box"
    assert face["model.loss"] == "bce" and face["data.balanced_sampling"] is False
    balanced, scratch = ROW_BY_KEY["balanced"].overrides(weights), ROW_BY_KEY["scratch"].overrides(weights)
    assert {k for k in balanced if balanced[k] != scratch[k]} == {"model.face_weights", "model.emotion_weights"}
    assert scratch["model.face_weights"] is None and balanced["model.loss"] == "selective"
    assert balanced["checkpoint.monitor"] == "val/score_heldout"
    sampling = ROW_BY_KEY["sampling"].overrides(weights)
    align = ROW_BY_KEY["align"].overrides(weights)
    assert {k for k in align if align[k] != sampling[k]} == {"data.balanced_sampling"}
    prior, half = ROW_BY_KEY["selective_prior"].overrides(weights), ROW_BY_KEY["selective"].overrides(weights)
    assert {k: v for k, v in prior.items() if half[k] != v} == {"model.target_rate": "prior"}
    dual, center = ROW_BY_KEY["dual"].overrides(weights), ROW_BY_KEY["dual_center"].overrides(weights)
    assert {k: v for k, v in center.items() if dual[k] != v} == {"data.alignment.method": "center"}
    deep = ROW_BY_KEY["resnet152"].overrides(weights)
    assert deep["model.backbone"] == "resnet152" and deep["model.face_weights"] is None
    assert deep["data.balanced_sampling"] is True and deep["model.loss"] == "bce"
    assert "model.backbone" not in align


def _entry(**means):
    entry = {"seeds": [0, 1]}
    for m in ("accuracy", "f1", "avg", "accuracy_fitted", "f1_fitted", "avg_fitted"):
        entry[f"{m}_mean"], entry[f"{m}_std"] = means.get(m, 0.5), means.get(f"{m}_std", 0.01)
    return entry


def test_table_text_and_orderings_by_hand():
    table = {"dual": _entry(accuracy=0.90, f1=0.40, avg=0.65, f1_fitted=0.5, f1_fitted_std=0.03),
             "align": _entry(accuracy=0.92, f1=0.38, f1_std=0.05, avg=0.60, f1_fitted=0.55)}
    text = markdown_table(table)
    assert ("| dual | F_face + F_emotion | 2 | 0.900 ± 0.010 | 0.400 ± 0.010 | 0.650 ± 0.010 | 0.500 ± 0.010 "
            "| 0.500 ± 0.030 | 0.500 ± 0.010 | 0.925 | 0.494 | 0.710 |") in text
    at_half, at_fitted = orderings(table)  # only the pair present is judged, each at one kind of threshold
    assert at_half == ("landmark alignment over the face box, by f1 at 0.5: does not hold (align 0.380 vs dual "
                       "0.400, difference -0.020, largest seed spread 0.050)")
    assert at_fitted.startswith("landmark alignment over the face box, by f1 at fitted thresholds: holds "
                                "(align 0.550 vs dual 0.500, difference +0.050")


def test_per_au_changes_by_hand():
    per_au = {
        "align": {"f1": {"AU1": [0.2, 0.4], "AU2": [0.5, 0.5]}, "f1_fitted": {"AU1": [0.3, 0.5], "AU2": [0.6, 0.6]},
                  "positives": {"AU1": 2, "AU2": 40}, "negatives": {"AU1": 98, "AU2": 60}},
        "sampling": {"f1": {"AU1": [0.5, 0.5], "AU2": [0.4, 0.4]}, "f1_fitted": {"AU1": [0.6, 0.6], "AU2": [0.7, 0.5]},
                     "positives": {"AU1": 2, "AU2": 40}, "negatives": {"AU1": 98, "AU2": 60}},
    }
    (rare, frequent) = per_au_changes(per_au)  # only balanced sampling's pair is there; rarest AU first
    assert (rare["au"], rare["positives"], rare["negatives"]) == ("AU1", 2, 98)
    assert rare["delta_f1"] == pytest.approx(0.5 - 0.3) and rare["delta_f1_fitted"] == pytest.approx(0.2)
    assert frequent["delta_f1"] == pytest.approx(-0.1) and frequent["delta_f1_fitted"] == pytest.approx(0.0)
    (line,) = per_au_summary([rare, frequent])
    assert line.startswith("balanced sampling (align -> sampling): at 0.5: rare (1) +0.200, frequent (1) -0.100")
    import matplotlib.pyplot as plt

    plt.close(per_au_figure([rare, frequent]))


@pytest.mark.slow
def test_ablation_end_to_end_resumes_and_reads_mlflow(synthau, tmp_path, capsys):
    """Pretrain both branches, train rows at two seeds, read the table back; then resume."""
    write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", "ablation-test")
    tiny = {"data.alignment.crop_size": 64, "data.cache_dir": str(tmp_path / "cache"), "data.num_workers": 0,
            "data.batch_size": 16, "trainer.max_epochs": 1, "trainer.limit_train_batches": 2}
    config = {
        "name": "t2", "fit_config": "experiments/configs/demo.yaml",
        "fit_overrides": {**tiny, "data.data_root": str(synthau), "data.synth.num_images": SMALL.num_images,
                          "data.synth.seed": SMALL.seed, "model.scheduler.init_args.T_max": 1,
                          "mlflow_artifacts.log_model": False},
        "pretrain_overrides": tiny, "pretrain_data": {"num_images": 40, "seed": 5},
        "pretrain_data_root": str(tmp_path / "pretrain_data"),
        "seeds": [0, 1], "rows": ["align", "sampling"], "out": str(tmp_path / "runs"),
        "mlflow": str(tmp_path / "mlflow.yaml"),
    }
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(config))
    main(["ablation", "--config", str(tmp_path / "ablation.yaml")])
    printed = capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("ablation-test").experiment_id
    runs = client.search_runs([exp], "tags.ablation = 't2'")
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags["ablation.role"], []).append(r)
    assert {len(v) for v in by_role.values()} and len(by_role["summary"]) == 1 and len(by_role["pretrain"]) == 2
    summary = by_role["summary"][0].info.run_id
    rows = {(r.data.tags["ablation.row"], int(r.data.tags["ablation.seed"])): r for r in by_role["row"]}
    assert sorted(rows) == [(k, s) for k in ("align", "sampling") for s in (0, 1)]
    assert all(r.data.tags["mlflow.parentRunId"] == summary for r in by_role["row"] + by_role["pretrain"])

    # Each row's figures are its own test metrics, at 0.5 and at the fitted thresholds.
    for seed in (0, 1):
        align, sampling = (rows[(k, seed)] for k in ("align", "sampling"))
        m = align.data.metrics
        assert m["ablation/f1"] == pytest.approx(m["test/f1_default"])
        assert m["ablation/f1_fitted"] == pytest.approx(m["test/f1"])
        assert m["ablation/avg_fitted"] == pytest.approx((m["test/accuracy"] + m["test/f1"]) / 2)
        assert align.data.params["data.alignment.method"] == "mtcnn"
        assert align.data.params["data.balanced_sampling"] == "False"
        assert sampling.data.params["data.balanced_sampling"] == "True"
        assert align.data.params["model.face_weights"] == str(tmp_path / "runs" / "t2" / "branches" / "face.pt")
        assert m["test/positives/AU12"] + m["test/negatives/AU12"] > 0

    # The printed table is the mean and sample spread of what MLflow holds.
    f1 = np.array([rows[("align", s)].data.metrics["ablation/f1"] for s in (0, 1)])
    fitted = np.array([rows[("align", s)].data.metrics["test/f1"] for s in (0, 1)])
    assert "| align | Align + F_face + F_emotion | 2 | " in printed
    assert f"{f1.mean():.3f} ± {f1.std(ddof=1):.3f}" in printed
    assert f"{fitted.mean():.3f} ± {fitted.std(ddof=1):.3f}" in printed
    artifacts = {a.path for a in client.list_artifacts(summary)}
    assert {"ablation_table.md", "ablation_table.csv", "ablation.png", "ablation_per_au.csv",
            "ablation_per_au.png"} <= artifacts
    assert "balanced sampling (align -> sampling): at 0.5:" in printed
    md = client.download_artifacts(summary, "ablation_table.md", str(tmp_path))
    text = open(md).read()
    assert f"{PAPER_TABLE2['align'][1]:.3f}" in text and "pretrain-face: val/verification_accuracy" in text

    # A second call trains nothing: every row and seed is found finished in MLflow.
    main(["ablation", "--config", str(tmp_path / "ablation.yaml")])
    assert len(client.search_runs([exp], "tags.ablation = 't2'")) == len(runs)
    assert "finished before" in capsys.readouterr().out


def test_row_metrics_at_both_kinds_of_threshold():
    metrics = {"test/accuracy": 0.9, "test/f1": 0.5, "test/accuracy_default": 0.8, "test/f1_default": 0.3}
    assert row_metrics(metrics) == pytest.approx({"accuracy": 0.8, "f1": 0.3, "avg": 0.55, "accuracy_fitted": 0.9,
                                                  "f1_fitted": 0.5, "avg_fitted": 0.7})
