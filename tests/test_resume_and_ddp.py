"""A killed training resumes into the same MLflow run; DDP on 2 CPU processes fits the same thresholds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from lightning_modules.checkpoints import load_checkpoint
from datamodules.synthetic import SynthAUSettings, generate_synthau

from .training_helpers import matches_one_process, small_fit_args, write_mlflow_yaml

AU_DETECT = str(Path(sys.executable).with_name("au-detect"))


def _metric_steps(client: MlflowClient, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


@pytest.mark.slow
def test_killed_fit_resumes_the_same_run(synthau, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", uri, "resume")
    args = small_fit_args(synthau, tmp_path / "cache", cfg, tmp_path / "runs", epochs=2, train_batches=16)
    args += ["--data.batch_size", "4",  # 16 steps an epoch: time to be killed in the middle of one
             "--mlflow_artifacts.log_model", "false"]  # what a fit end logs: test_crash_consistency
    # The client creates the SQLite store's tables: before the fit starts, not while it creates them
    # too (two processes migrating one new SQLite file race in MLflow's schema setup).
    client = MlflowClient(uri)
    proc = subprocess.Popen([AU_DETECT, "fit", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    died = None
    deadline, run_id = time.time() + 240, None
    try:
        while time.time() < deadline:  # wait until epoch 1 is under way, then kill -9
            if proc.poll() is not None:
                died = proc.stderr.read()[-3000:]
                break
            if list(tmp_path.glob("runs/**/last.ckpt")):
                exp = client.get_experiment_by_name("resume")
                run_id = client.search_runs([exp.experiment_id])[0].info.run_id
                steps = _metric_steps(client, run_id, "train/loss")
                if steps and max(steps) >= 16 + 3:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("training did not reach epoch 1 in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert died is None, died
    (last,) = tmp_path.glob("runs/**/last.ckpt")
    assert load_checkpoint(last)["epoch"] == 0
    assert len(_metric_steps(client, run_id, "val/f1")) == 1  # epoch 1 never validated

    done = subprocess.run([AU_DETECT, "fit", *args, "--ckpt_path", str(last)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run_id  # no duplicate run
    assert runs[0].info.status == "FINISHED"
    epochs = sorted({int(m.value) for m in client.get_metric_history(run_id, "epoch")})
    assert epochs == [0, 1]
    val_steps = _metric_steps(client, run_id, "val/f1")
    assert len(val_steps) == 2 and val_steps == sorted(set(val_steps))  # one validation per epoch
    assert "(resumed)" in done.stdout


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_one_process(tmp_path):
    """Validation on 2 ranks (DistributedSampler pads 13 samples to 14) fits the thresholds and
    scores that one process computes from the same model's predictions. The two ranks aligned
    the data together."""
    root = tmp_path / "synthau"
    generate_synthau(root, SynthAUSettings(num_images=130, seed=3), workers=2)  # val: 13 scenes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", uri, "ddp")
    args = small_fit_args(root, tmp_path / "cache", cfg, tmp_path / "runs", epochs=1, train_batches=2)
    args += ["--data.synth.num_images", "130", "--data.batch_size", "4", "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    done = subprocess.run([AU_DETECT, "fit", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.data.params["trainer.devices"] == "2" and run.data.params["trainer.strategy"] == "ddp"
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "thresholds.json")).read_text())
    ddp_thresholds = np.array(list(stored["thresholds"].values()))

    matches_one_process(tmp_path / "runs", tmp_path / "cache", run, ddp_thresholds, ranks=2)
