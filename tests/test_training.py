"""au-detect fit from the demo config, read back from MLflow: SQLite store and a real HTTP server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.cli import main

from .training_helpers import check_run, small_fit_args, write_mlflow_yaml


def test_fit_logs_everything_to_mlflow(synthau, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", uri)
    main(["fit", *small_fit_args(synthau, tmp_path / "cache", cfg, tmp_path / "runs", onnx=True)])
    out = capsys.readouterr().out
    assert "See the run: mlflow ui --backend-store-uri" in out
    facts = check_run(uri, "au-detect-test")
    # log_onnx: the network as an MLflow ONNX model beside the pyfunc model
    exp = facts["client"].get_run(facts["run_id"]).info.experiment_id
    assert sorted(m.name for m in facts["client"].search_logged_models([exp])) == ["model", "model_onnx"]
    # Test with the fitted thresholds stored in the checkpoint, into the same run.
    ckpt = facts["client"].download_artifacts(facts["run_id"], "checkpoints", str(tmp_path))
    (path,) = list(Path(ckpt).glob("*.ckpt"))
    main(["test", *small_fit_args(synthau, tmp_path / "cache", cfg, tmp_path / "runs"), "--ckpt_path", str(path)])
    run = facts["client"].get_run(facts["run_id"])
    assert {"test/f1", "test/f1_default", "test/score", "test/f1/AU12"} <= set(run.data.metrics)
    # Validating a checkpoint continues its run but leaves the fit's best-epoch files as they were.
    before = Path(facts["client"].download_artifacts(facts["run_id"], "thresholds.json", str(tmp_path / "a"))).read_text()
    main(["validate", *small_fit_args(synthau, tmp_path / "cache", cfg, tmp_path / "runs"), "--ckpt_path", str(path),
          "--soft_threshold.criterion", "score"])
    after = Path(facts["client"].download_artifacts(facts["run_id"], "thresholds.json", str(tmp_path / "b"))).read_text()
    assert after == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` process on loopback, with its own SQLite store and artifact root."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        # no job runner: nothing the tests use, and it would leave a folder in /dev/shm each time
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start in 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_fit_against_an_mlflow_server(synthau, tmp_path, mlflow_server):
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", mlflow_server, "au-detect-http")
    main(["fit", *small_fit_args(synthau, tmp_path / "cache", cfg, tmp_path / "runs")])
    check_run(mlflow_server, "au-detect-http")
