"""The ablation command: rows trained through the real CLIs, tracked in MLflow, the table read back."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from experiments.ablation_report import markdown_table, orderings
from experiments.ablation_rows import PAPER_TABLE2, ROW_BY_KEY, row_metrics
from experiments.cli import main

from .conftest import SMALL


def test_rows_change_only_what_they_name():
    weights = {"face": "f.pt", "emotion": "e.pt"}
    face = ROW_BY_KEY["face"].overrides(weights)
    assert face["model.branches"] == ["face"] and face["model.emotion_weights"] is None
    assert face["model.face_weights"] == "f.pt" and face["data.alignment.method"] == "center"
    assert face["model.loss"] == "bce" and face["data.balanced_sampling"] is False
    balanced, scratch = ROW_BY_KEY["balanced"].overrides(weights), ROW_BY_KEY["scratch"].overrides(weights)
    assert {k for k in balanced if balanced[k] != scratch[k]} == {"model.face_weights", "model.emotion_weights"}
    assert scratch["model.face_weights"] is None and balanced["model.loss"] == "selective"
    sampling = ROW_BY_KEY["sampling"].overrides(weights)
    align = ROW_BY_KEY["align"].overrides(weights)
    assert {k for k in align if align[k] != sampling[k]} == {"data.balanced_sampling"}
    assert ROW_BY_KEY["thresholds"].source == "align"


def test_table_text_and_orderings_by_hand():
    table = {
        "dual": {"seeds": [0, 1], "accuracy_mean": 0.90, "accuracy_std": 0.01, "f1_mean": 0.40, "f1_std": 0.02,
                 "avg_mean": 0.65, "avg_std": 0.01, "f1_fitted_mean": 0.5, "f1_fitted_std": 0.03},
        "align": {"seeds": [0, 1], "accuracy_mean": 0.92, "accuracy_std": 0.0, "f1_mean": 0.38, "f1_std": 0.05,
                  "avg_mean": 0.60, "avg_std": 0.02, "f1_fitted_mean": 0.55, "f1_fitted_std": 0.01},
    }
    text = markdown_table(table)
    assert ("| dual | F_face + F_emotion | 2 | 0.900 ± 0.010 | 0.400 ± 0.020 | 0.650 ± 0.010 | 0.500 ± 0.030 "
            "| 0.925 | 0.494 | 0.710 |") in text
    by_avg, by_fitted = orderings(table)  # only the pair present is judged, on Avg and fitted F1
    assert by_avg == ("aligned over unaligned, by avg: does not hold (align 0.600 vs dual 0.650, "
                      "difference -0.050, largest seed spread 0.020)")
    assert by_fitted.startswith("aligned over unaligned, by f1_fitted: holds (align 0.550 vs dual 0.500, "
                                "difference +0.050")


@pytest.mark.slow
def test_ablation_end_to_end_resumes_and_reads_mlflow(synthau, tmp_path, capsys):
    """Pretrain both branches, train rows at two seeds, read the table back; then resume."""
    (tmp_path / "mlflow.yaml").write_text(yaml.safe_dump(
        {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment_name": "ablation-test",
         "artifact_location": str(tmp_path / "artifacts")}))
    tiny = {"data.alignment.crop_size": 64, "data.cache_dir": str(tmp_path / "cache"), "data.num_workers": 0,
            "data.batch_size": 16, "trainer.max_epochs": 1, "trainer.limit_train_batches": 2}
    config = {
        "name": "t2", "fit_config": "experiments/demo.yaml",
        "fit_overrides": {**tiny, "data.data_root": str(synthau), "data.synth.num_images": SMALL.num_images,
                          "data.synth.seed": SMALL.seed, "model.scheduler.init_args.T_max": 1,
                          "mlflow_artifacts.log_model": False},
        "pretrain_overrides": tiny, "pretrain_data": {"num_images": 40, "seed": 5},
        "pretrain_data_root": str(tmp_path / "pretrain_data"),
        "seeds": [0, 1], "rows": ["face", "thresholds"], "out": str(tmp_path / "runs"),
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
    # the derived row's source comes along: align + thresholds + face at 2 seeds
    assert sorted(rows) == [(k, s) for k in ("align", "face", "thresholds") for s in (0, 1)]
    assert all(r.data.tags["mlflow.parentRunId"] == summary for r in by_role["row"] + by_role["pretrain"])

    # Each row's figures come from its own test metrics: at 0.5 without soft thresholds, at the
    # fitted thresholds with them (the thresholds row is the align row's model, so its numbers
    # are that run's fitted-threshold figures).
    for seed in (0, 1):
        align, thr, face = (rows[(k, seed)] for k in ("align", "thresholds", "face"))
        assert align.data.metrics["ablation/f1"] == pytest.approx(align.data.metrics["test/f1_default"])
        assert thr.data.tags["ablation.source_run"] == align.info.run_id
        assert thr.data.metrics["ablation/f1"] == pytest.approx(align.data.metrics["test/f1"])
        assert thr.data.metrics["ablation/avg"] == pytest.approx(
            (align.data.metrics["test/accuracy"] + align.data.metrics["test/f1"]) / 2)
        assert face.data.params["model.branches"] == "['face']"
        assert face.data.params["data.alignment.method"] == "center"
        assert align.data.params["data.alignment.method"] == "mtcnn"
        assert face.data.params["model.face_weights"] == str(tmp_path / "runs" / "t2" / "branches" / "face.pt")

    # The printed table is the mean and sample spread of what MLflow holds.
    f1 = np.array([rows[("face", s)].data.metrics["ablation/f1"] for s in (0, 1)])
    fitted = np.array([rows[("face", s)].data.metrics["test/f1"] for s in (0, 1)])
    assert "| face | F_face | 2 | " in printed
    assert f"{f1.mean():.3f} ± {f1.std(ddof=1):.3f}" in printed
    assert f"{fitted.mean():.3f} ± {fitted.std(ddof=1):.3f}" in printed
    artifacts = {a.path for a in client.list_artifacts(summary)}
    assert {"ablation_table.md", "ablation_table.csv", "ablation.png"} <= artifacts
    md = client.download_artifacts(summary, "ablation_table.md", str(tmp_path))
    text = open(md).read()
    assert f"{PAPER_TABLE2['face'][1]:.3f}" in text and "pretrain-face: val/verification_accuracy" in text

    # A second call trains nothing: every row and seed is found finished in MLflow.
    main(["ablation", "--config", str(tmp_path / "ablation.yaml")])
    assert len(client.search_runs([exp], "tags.ablation = 't2'")) == len(runs)
    assert "finished before" in capsys.readouterr().out


def test_row_metrics_at_each_rows_decision_rule():
    metrics = {"test/accuracy": 0.9, "test/f1": 0.5, "test/accuracy_default": 0.8, "test/f1_default": 0.3}
    assert row_metrics(metrics, thresholds=True) == pytest.approx({"accuracy": 0.9, "f1": 0.5, "avg": 0.7})
    assert row_metrics(metrics, thresholds=False) == pytest.approx({"accuracy": 0.8, "f1": 0.3, "avg": 0.55})
