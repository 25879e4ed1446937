"""au-detect fit, test and validate from the demo config, read back from MLflow (against a real server:
test_tracking_outage and test_ddp_fit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.cli import main

from .training_helpers import check_run, small_fit_args, write_mlflow_yaml


@pytest.mark.slow
def test_fit_logs_everything_to_mlflow(synthau, fit_cache, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", uri)
    main(["fit", *small_fit_args(synthau, fit_cache, cfg, tmp_path / "runs", onnx=True)])
    out = capsys.readouterr().out
    facts = check_run(uri, "au-detect-test")
    # it ends with commands to paste: predict with the run's model on a test photo, the UI on the store
    assert "Next, from the project folder:" in out and f"mlflow ui --backend-store-uri {uri}" in out
    (line,) = [x.strip() for x in out.splitlines() if x.strip().startswith("au-detect predict --model runs:/")]
    assert line.startswith(f"au-detect predict --model runs:/{facts['run_id']}/model --input ")
    assert Path(line.split(" --input ")[1].split()[0]).is_file()
    # log_onnx: the network as an MLflow ONNX model beside the pyfunc model
    exp = facts["client"].get_run(facts["run_id"]).info.experiment_id
    assert sorted(m.name for m in facts["client"].search_logged_models([exp])) == ["model", "model_onnx"]
    # Test with the fitted thresholds stored in the checkpoint, into the same run.
    ckpt = facts["client"].download_artifacts(facts["run_id"], "checkpoints", str(tmp_path))
    (path,) = list(Path(ckpt).glob("*.ckpt"))
    main(["test", *small_fit_args(synthau, fit_cache, cfg, tmp_path / "runs"), "--ckpt_path", str(path)])
    run = facts["client"].get_run(facts["run_id"])
    assert {"test/f1", "test/f1_default", "test/score", "test/f1/AU12"} <= set(run.data.metrics)
    # Validating a checkpoint continues its run but leaves the fit's best-epoch files as they were.
    before = Path(facts["client"].download_artifacts(facts["run_id"], "thresholds.json", str(tmp_path / "a"))).read_text()
    main(["validate", *small_fit_args(synthau, fit_cache, cfg, tmp_path / "runs"), "--ckpt_path", str(path),
          "--soft_threshold.criterion", "score"])
    after = Path(facts["client"].download_artifacts(facts["run_id"], "thresholds.json", str(tmp_path / "b"))).read_text()
    assert after == before
