"""DDP on 2 CPU processes fits the thresholds one process fits (a killed fit's resume: test_crash_consistency)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from .training_helpers import matches_one_process, small_fit_args, write_mlflow_yaml

AU_DETECT = str(Path(sys.executable).with_name("au-detect"))


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_one_process(synthau_13_val, tmp_path):
    """Validation on 2 ranks (DistributedSampler pads 13 samples to 14) fits the thresholds and
    scores that one process computes from the same model's predictions. The two ranks aligned
    the data together."""
    root = synthau_13_val  # val: 13 scenes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", uri, "ddp")
    args = small_fit_args(root, tmp_path / "cache", cfg, tmp_path / "runs", epochs=1, train_batches=2)
    args += ["--data.synth.num_images", "130", "--data.batch_size", "4",
             "--mlflow_artifacts.log_model", "false",  # what is compared is the checkpoint
             "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    done = subprocess.run([AU_DETECT, "fit", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.data.params["trainer.devices"] == "2" and run.data.params["trainer.strategy"] == "ddp"
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "thresholds.json")).read_text())
    ddp_thresholds = np.array(list(stored["thresholds"].values()))

    matches_one_process(tmp_path / "runs", tmp_path / "cache", run, ddp_thresholds, ranks=2)
