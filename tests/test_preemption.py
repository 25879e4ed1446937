"""Preemption and checkpoints that never lose progress: real fits in subprocesses, real signals, a
real SQLite MLflow store.

- SIGTERM / SIGINT mid-epoch: exit 143 / 130, the run KILLED, ``last.ckpt`` where it stopped, and
  ``fit --ckpt_path last`` continues the same run to FINISHED;
- a plateau: ``last.ckpt`` follows every epoch, not only the improving ones;
- a damaged ``last.ckpt``: the resume falls back to the run's newest readable full checkpoint;
- a checkpoint save killed with SIGKILL, or failing for want of room, leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
from mlflow import MlflowClient

from lightning_modules.checkpoints import PARTIAL, load_checkpoint, save_atomically

from .training_helpers import small_fit_args, write_mlflow_yaml

ROOT = Path(__file__).resolve().parents[1]
AU_DETECT = str(Path(sys.executable).with_name("au-detect"))
EXPERIMENT = "preemption"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


class Pace(L.Callback):
    """Logs ``pace/score`` = ``scores[epoch]`` after each validation (the checkpoint's monitor). In
    epoch ``slow_epoch`` it writes ``marker`` before the second training batch and then takes
    ``delay`` seconds a batch, so that a signal sent on the marker lands mid-epoch. With
    ``kill_epoch`` it sends itself SIGKILL as that epoch starts."""

    def __init__(self, scores: list[float], marker: str | None = None, slow_epoch: int = 1, delay: float = 1.0,
                 kill_epoch: int | None = None):
        self.scores, self.marker, self.slow_epoch, self.delay = scores, marker, slow_epoch, delay
        self.kill_epoch = kill_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.marker and trainer.current_epoch == self.slow_epoch and batch_idx >= 1:
            Path(self.marker).touch()
            time.sleep(self.delay)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("pace/score", self.scores[trainer.current_epoch])


def _args(synthau: Path, cache: Path, tmp_path: Path, epochs: int, pace: dict) -> list[str]:
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path / 'mlflow.db'}", EXPERIMENT)
    args = small_fit_args(synthau, cache, cfg, tmp_path / "runs", epochs=epochs, train_batches=3)
    args += ["--checkpoint.monitor", "pace/score", "--mlflow_artifacts.sample_grid", "0",
             "--mlflow_artifacts.log_model", "false", "--trainer.num_sanity_val_steps", "0",
             "--model.backbone", "resnet10t", "--model.branches", "[face]",  # small checkpoints, quick saves
             f"--trainer.callbacks+={json.dumps({'class_path': f'{__name__}.Pace', 'init_args': pace})}"]
    return [AU_DETECT, "fit", *args]


def _resume(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([*command, "--ckpt_path", "last"], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    return client, run


def _validation_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val/f1"))


def _signalled_in_epoch_1(synthau, cache, tmp_path, env: dict, sig: int):
    """A 3-epoch fit in a subprocess, sent ``sig`` once its epoch 1 has begun; ``(process, its command
    line, stderr)`` once it has ended."""
    marker = tmp_path / "epoch1-started"
    command = _args(synthau, cache, tmp_path, 3, {"scores": [0.5, 0.6, 0.7], "marker": str(marker)})
    fit = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 240
    while not marker.exists():
        assert fit.poll() is None and time.time() < deadline, "the fit ended before epoch 1"
        time.sleep(0.05)
    fit.send_signal(sig)
    _, err = fit.communicate(timeout=240)
    return fit, command, err


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_epoch_saves_where_it_stopped_and_the_run_resumes(synthau, fit_cache, tmp_path, sig, status):
    """What SLURM or Kubernetes sends before a kill (SIGTERM), or Ctrl+C (SIGINT): each ends the fit
    where it is, KILLED; the SIGTERM'd one is resumed to the end."""
    fit, _, err = _signalled_in_epoch_1(synthau, fit_cache, tmp_path, ENV, sig)
    assert fit.returncode == status, f"rc {fit.returncode}\n{err[-3000:]}"
    assert f"Stopped by {sig.name}" in err and f"exit status {status}" in err

    client, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    (last,) = (tmp_path / "runs").glob(f"*/{run.info.run_id}/checkpoints/last.ckpt")
    state = load_checkpoint(last)
    # where it stopped: inside epoch 1, with what a resume needs
    assert state["mlflow_run_id"] == run.info.run_id and state["epoch"] == 1 and 3 < state["global_step"] < 6
    assert state["optimizer_states"] and state["loops"]
    assert _validation_steps(client, run.info.run_id) == [2]  # epoch 0's only: the spool was flushed
    if sig != signal.SIGTERM:
        return  # the resume is the same for either signal: once is enough

    done = _resume(_args(synthau, fit_cache, tmp_path, 3, {"scores": [0.5, 0.6, 0.7]}))
    assert f"--ckpt_path last: resuming MLflow run {run.info.run_id} from {last}" in done.stdout
    client, again = _only_run(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert _validation_steps(client, run.info.run_id) == [2, 5, 8]  # each epoch validated once


@pytest.mark.slow
def test_plateau_keeps_every_epoch_and_a_damaged_last_falls_back(synthau, fit_cache, tmp_path):
    """The score never improves after epoch 0; the fit is killed (SIGKILL) as epoch 3 starts:
    ``last.ckpt`` is epoch 2's, not epoch 0's. Then ``last.ckpt`` is torn (as a kill or a full disk
    during an in-place copy leaves it): ``--ckpt_path last`` says so and continues the same run from
    the run's newest readable full-state checkpoint (epoch 0's, the only other one)."""
    scores = [0.9, 0.1, 0.1, 0.1]
    command = _args(synthau, fit_cache, tmp_path, 4, {"scores": scores, "kill_epoch": 3})
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client, run = _only_run(tmp_path)
    run_id = run.info.run_id
    folder = next((tmp_path / "runs").glob(f"*/{run_id}/checkpoints"))
    last = folder / "last.ckpt"
    state = load_checkpoint(last)
    assert state["epoch"] == 2 and state["global_step"] == 9 and state["mlflow_run_id"] == run_id
    (best,) = [p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"]
    assert load_checkpoint(best)["epoch"] == 0
    assert not list(folder.glob(f"*{PARTIAL}"))

    size = last.stat().st_size
    with open(last, "r+b") as f:  # torn: the first part of the file only
        f.truncate(size // 3)
    done = _resume(_args(synthau, fit_cache, tmp_path, 4, {"scores": scores}))
    said = [line for line in done.stdout.splitlines() if line.startswith("--ckpt_path last:")]
    assert len(said) == 1 and f"{last} is damaged" in said[0], done.stdout[-2000:]
    assert f"resuming MLflow run {run_id} from {best} (epoch 0)" in said[0]
    client, again = _only_run(tmp_path)  # no new run
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert load_checkpoint(last)["epoch"] == 3  # written whole again
    assert sorted(set(_validation_steps(client, run_id))) == [2, 5, 8, 11]


# A child that saves a small checkpoint, then a large one; the test kills it during the second.
SAVER = textwrap.dedent("""
    import sys, torch
    from lightning_modules.checkpoints import save_atomically

    path = sys.argv[1]
    save_atomically({"marker": "old", "w": torch.ones(4)}, path)
    print("old saved", flush=True)
    save_atomically({"marker": "new", "w": torch.zeros(64 * 2**20)}, path)  # 256 MB
    print("new saved", flush=True)
""")


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    for attempt in range(5):
        target.unlink(missing_ok=True)
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True,
                                 env=ENV, cwd=ROOT)
        assert saver.stdout.readline().strip() == "old saved"
        partial = None
        while saver.poll() is None and partial is None:
            partial = next((p for p in tmp_path.glob(f".last.ckpt.*{PARTIAL}") if p.stat().st_size > 2**20), None)
        saver.kill()  # SIGKILL: nothing runs after it
        saver.wait()
        if partial is not None and load_checkpoint(target)["marker"] == "old":
            break  # killed mid-write
    else:
        pytest.skip("the large save finished before the kill each time")
    assert partial.exists() and partial.stat().st_size < 256 * 2**20
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]  # no partial file under a final name
    # the next save removes what the killed process left
    save_atomically({"marker": "next"}, target)
    assert load_checkpoint(target)["marker"] == "next" and not list(tmp_path.glob(f"*{PARTIAL}"))


# A child whose files may not grow past 1 MiB (RLIMIT_FSIZE: the kernel refuses the write, as a full
# disk does with ENOSPC); it keeps the old checkpoint and says so.
LIMITED = textwrap.dedent("""
    import resource, signal, sys, torch
    from lightning_modules.checkpoints import save_atomically

    path = sys.argv[1]
    save_atomically({"marker": "old"}, path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write (EFBIG), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    try:
        save_atomically({"marker": "new", "w": torch.zeros(2**20)}, path)  # 4 MiB
    except OSError as e:
        print(f"{e.errno} {e}")
""")


@pytest.mark.slow
def test_failed_write_keeps_the_previous_file_and_says_so(tmp_path):
    target = tmp_path / "last.ckpt"
    done = subprocess.run([sys.executable, "-c", LIMITED, str(target)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"checkpoint {target} was not written (File too large); the previous one is kept as it was" in done.stdout
    assert load_checkpoint(target)["marker"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file removed



@pytest.mark.slow
def test_slurm_requeue_checkpoint_continues_the_same_run(synthau, fit_cache, tmp_path):
    """SLURM's requeue without SLURM: its environment variables, and an ``scontrol`` on PATH that
    does what ``scontrol requeue`` does to the running job (SIGTERM). SIGUSR1 mid-epoch: Lightning
    saves ``hpc_ckpt_1.ckpt`` (with the run id) and requeues; the SIGTERM ends the job with 143 and
    the run KILLED. The requeued job, the same command without ``--ckpt_path``, resumes Lightning's
    checkpoint and finishes the same run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\nkill -TERM $PPID\n")
    scontrol.chmod(0o755)
    slurm = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "au-fit",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NTASKS_PER_NODE": "1"}
    # SLURM's warning before the time limit (#SBATCH --signal=SIGUSR1@90)
    fit, command, err = _signalled_in_epoch_1(synthau, fit_cache, tmp_path, slurm, signal.SIGUSR1)
    assert fit.returncode == 143, f"rc {fit.returncode}\n{err[-3000:]}"
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    client, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    hpc = tmp_path / "runs" / "hpc_ckpt_1.ckpt"
    assert load_checkpoint(hpc)["mlflow_run_id"] == run.info.run_id

    requeued = subprocess.run(command, capture_output=True, text=True, timeout=300, env=slurm, cwd=ROOT)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "(resumed)" in requeued.stdout
    client, again = _only_run(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
