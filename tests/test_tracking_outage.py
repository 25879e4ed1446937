"""Training never waits on tracking: the run's writes go through a spool on local disk
(callbacks.tracking.spool), are sent in order and once, and what an outage kept reaches the run later."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from callbacks.tracking.spool import (PROBE_TIMEOUT, Spool, SpooledClient, SpoolSender, TrackingServerUnreachable,
                                      reachable)
from experiments.cli import main
from experiments.tracking import TrackingSettings

from .training_helpers import free_port, small_fit_args, write_mlflow_yaml

ROOT = Path(__file__).resolve().parents[1]
AU_DETECT = str(Path(sys.executable).with_name("au-detect"))


def _wait(condition, timeout: float = 30.0, what: str = "", every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(every)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """One SQLite store for the fast tests (its tables take seconds to make); each makes its own run."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, MlflowClient(uri).create_experiment("spool", artifact_location=str(folder / "artifacts"))


def _run(store: tuple[str, str]) -> tuple[str, str]:
    uri, experiment = store
    return uri, MlflowClient(uri).create_run(experiment).info.run_id


class Flaky:
    """An MlflowClient the test takes down and up. ``down``: calls fail before reaching the store;
    ``lost``: the next call reaches the store, then fails as if its answer never came back. Every
    metric point that reached the store is recorded in ``sent``."""

    def __init__(self, uri: str):
        self.client, self.mode, self.sent = MlflowClient(uri), "up", []
        self.tracking_uri = uri

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def _gate(self) -> None:
        if self.mode == "down":
            raise MlflowException("API request failed with exception ConnectionError: connection refused")

    def _answer(self) -> None:
        if self.mode == "lost":
            self.mode = "up"
            raise MlflowException("API request failed with exception ReadTimeout: read timed out")

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self._gate()
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        self.sent += [(m.key, m.value, m.timestamp, m.step) for m in metrics]
        self._answer()

    def log_artifacts(self, *args, **kwargs):
        self._gate()
        self.client.log_artifacts(*args, **kwargs)
        self._answer()

    def set_terminated(self, *args, **kwargs):
        self._gate()
        self.client.set_terminated(*args, **kwargs)
        self._answer()


def _sender(folder: Path, flaky: Flaky, run_id: str) -> tuple[SpoolSender, SpooledClient]:
    spool = Spool.create(folder, flaky.tracking_uri, run_id)
    sender = SpoolSender(spool, flaky, flush_timeout=5, probe=lambda: flaky.mode != "down").start()
    return sender, SpooledClient(lambda: sender, flaky)


def _history(uri: str, run_id: str, key: str) -> list[tuple]:
    points = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in points)


def test_an_outage_is_kept_on_disk_then_sent_in_order_once(store, tmp_path):
    uri, run_id = _run(store)
    flaky = Flaky(uri)
    sender, client = _sender(tmp_path / "spool" / run_id, flaky, run_id)
    for step in range(5):
        client.log_metric(run_id, "loss", float(step), step=step)
    _wait(lambda: len(flaky.sent) == 5, what="the first points sent")

    flaky.mode = "down"
    started = time.perf_counter()
    for step in range(5, 40):
        client.log_metric(run_id, "loss", float(step), step=step)
    client.log_text(run_id, "kept", "notes/a.txt")
    client.set_tag(run_id, "after", "the text")
    assert time.perf_counter() - started < 1.0  # the caller never waits for the server
    _wait(lambda: sender.down_since is not None and len(sender.spool.pending()) >= 3, what="records on disk")
    assert len(_history(uri, run_id, "loss")) == 5

    flaky.mode = "lost"  # back, but the answer to the first request is lost: that one is in doubt
    assert sender.close()
    loss = _history(uri, run_id, "loss")
    assert [s for s, _, _ in loss] == list(range(40))
    assert len(flaky.sent) == len(set(flaky.sent)) == 40  # no point reached the store twice
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["after"] == "the text"
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "notes")] == ["notes/a.txt"]
    assert sender.spool.pending() == [] and sender.outages == 1


def test_what_a_kill_left_half_written_is_ignored(store, tmp_path, capsys):
    uri, run_id = _run(store)
    folder = tmp_path / "spool" / run_id
    spool = Spool.create(folder, uri, run_id)
    spool.append(1, {"op": "log_batch", "run_id": run_id, "metrics": [["loss", 0.5, 1000, 0]], "params": [],
                     "tags": []}, None)
    # What a kill leaves: files staged for a call never committed, a record's files without the
    # JSON that commits it, and an atomic write's temporary file.
    staged = spool.stage()
    (staged / "half.txt").write_text("half")
    (spool.records / "000000000002").mkdir()
    (spool.records / "000000000002" / "thresholds.json").write_text("{}")
    (spool.records / ".000000000002.json.123-abcd.tmp").write_text('{"op": "log_ar')

    spool = Spool.create(folder, uri, run_id)  # the next process
    assert spool.pending() == [1]
    assert sorted(p.name for p in spool.records.iterdir()) == ["000000000001.json"]
    assert not spool.staging.exists()

    main(["sync-tracking", "--spool", str(tmp_path / "spool")])  # the mlflow_spool folder: every run's
    assert "sent 1 records" in capsys.readouterr().out
    assert _history(uri, run_id, "loss") == [(0, 0.5, 1000)]
    assert not folder.exists()  # nothing left: the folder goes


def test_sending_again_after_a_kill_is_idempotent(store, tmp_path):
    """The process died after the server took records 1 and 2 and before it journaled that: both
    are in doubt. Sending again leaves out the points the run holds and sends record 3 whole."""
    uri, run_id = _run(store)
    folder = tmp_path / "spool" / run_id
    spool = Spool.create(folder, uri, run_id)
    records = [[["loss", float(s), 1000 + s, s] for s in range(0, 3)],
               [["loss", float(s), 1000 + s, s] for s in range(3, 5)],
               [["loss", float(s), 1000 + s, s] for s in range(5, 8)]]
    for seq, metrics in enumerate(records, 1):
        spool.append(seq, {"op": "log_batch", "run_id": run_id, "metrics": metrics, "params": [["lr", "0.1"]],
                           "tags": []}, None)
    store = MlflowClient(uri)
    store.log_batch(run_id, metrics=[Metric(*m[:2], m[2], m[3]) for m in records[0] + records[1]],
                    params=[Param("lr", "0.1")])
    spool.begin(2)  # sent, never acknowledged

    flaky = Flaky(uri)
    sender = SpoolSender(Spool.create(folder, uri, run_id), flaky, flush_timeout=5, probe=lambda: True)
    assert sender.start().close()
    assert sorted(p[3] for p in flaky.sent) == [5, 6, 7]  # only what the run did not hold
    assert [s for s, _, _ in _history(uri, run_id, "loss")] == list(range(8))
    assert store.get_run(run_id).data.params == {"lr": "0.1"}


def test_a_record_the_server_refuses_is_set_aside(store, tmp_path):
    uri, run_id = _run(store)
    flaky = Flaky(uri)
    sender, client = _sender(tmp_path / "spool" / run_id, flaky, run_id)
    client.log_param(run_id, "lr", "0.1")
    _wait(lambda: sender.sent_records == 1)
    client.log_param(run_id, "lr", "0.2")  # MLflow params are immutable: HTTP 400 for good
    client.log_metric(run_id, "loss", 1.0, step=0)
    assert sender.close()
    assert MlflowClient(uri).get_run(run_id).data.params == {"lr": "0.1"}
    assert len(_history(uri, run_id, "loss")) == 1  # the record after it went
    (error,) = sender.spool.rejected.glob("*.error.txt")
    assert "lr" in error.read_text()


def test_a_job_needs_the_server_when_it_starts(tmp_path):
    """The run is found or created at the start: without a server, a clear error at once, not
    MLflow's minutes of retries."""
    settings = TrackingSettings(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_name="e")
    started = time.time()
    with pytest.raises(TrackingServerUnreachable, match="does not answer: a job needs it when it starts"):
        settings.logger(spool_root=tmp_path / "spool")
    assert time.time() - started < 15 and not (tmp_path / "spool").exists()


# -- a fit against a real server that hangs, comes back, then dies ------------------------------------
class StepLog(L.Callback):
    """Appends ``epoch batch global_step time`` to ``path`` at the end of every training step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {trainer.global_step} {time.time():.4f}\n")


class Server:
    """``mlflow server`` on 127.0.0.1 with its own SQLite store and artifact root, started again on
    the same port and store after a kill; its whole process group is stopped, continued or killed."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # no job runner: nothing the test uses, and the server starts faster without it
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + 120
        while not reachable(self.uri, timeout=2):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.25)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()


class _Output:
    """A process's stdout and stderr, read as they come (a full pipe would stop it)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self.threads = [threading.Thread(target=self._read, args=(stream, self.lines[name]), daemon=True)
                        for name, stream in (("out", proc.stdout), ("err", proc.stderr))]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def err(self) -> str:
        return "".join(self.lines["err"])

    def close(self) -> tuple[str, str]:
        for thread in self.threads:
            thread.join(timeout=30)
        return "".join(self.lines["out"]), self.err()


def _steps(path: Path) -> list[tuple[int, int, int, float]]:
    """The step log's lines (epoch, batch, global step, time), but a last one still being written."""
    text = path.read_text() if path.is_file() else ""
    lines = [line.split() for line in text[:text.rfind("\n") + 1].splitlines()]
    return [(int(e), int(b), int(g), float(t)) for e, b, g, t in lines]


def _durations(steps: list, start: float, end: float, first: int = 1, most: int | None = None) -> list[float]:
    """Seconds each step took, for steps that began and ended in [start, end] (within an epoch: a
    validation between two steps is not a step), from global step ``first`` on, ``most`` of them."""
    out = [t - t0 for (e0, _, _, t0), (e, b, g, t) in zip(steps, steps[1:])
           if e == e0 and b > 0 and g >= first and start <= t0 and t <= end]
    return out[:most]


# MLflow's retry budget, shrunk so that an outage longer than it takes seconds, not minutes: a
# call to a hung server fails after 2 attempts of 1 s, to a dead one at once.
BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
          "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}
BUDGET_S = 2.0
# The fit computes on one thread: on two cores shared with other work, two threads of a step wait
# for each other whenever anything else runs (steps then take 20 times as long, at random), which
# would swamp the comparison of step rates.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WARMUP, BEFORE, HUNG, DOWN = 3, 15, 12, 12  # steps: the first ones, then at least as many in each phase
MEASURED = 25  # steps of each outage compared with those just before it: the machine's load drifts


def _step_seconds() -> float:
    """About how long a step of the test's fit takes on this machine now (its load moves that tenfold)."""
    import torch

    from lightning_modules.au_detector import AUNet

    net = AUNet(backbone="resnet10t", branches=["face"])
    optimizer, x = torch.optim.AdamW(net.parameters()), torch.randn(4, 3, 64, 64)
    threads, times = torch.get_num_threads(), []
    torch.set_num_threads(1)  # as the fit runs (ONE_THREAD)
    try:
        for _ in range(5):
            started = time.perf_counter()
            net(x).sum().backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[1:]) + 0.03  # the loader, augmentation and logging besides


@pytest.mark.slow
def test_training_never_waits_on_a_tracking_server_that_hangs_comes_back_then_dies(synthau, fit_cache, tmp_path):
    """``au-detect fit`` (3 epochs, one small branch, enough steps for the phases) against a real
    ``mlflow server``:

    1. steps 4-18: the server answers; their durations are the reference;
    2. then it hangs (SIGSTOP of its process group) for at least 12 steps, twice MLflow's retry
       budget (shrunk to 2 s by MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, _BACKOFF_FACTOR=0,
       _TIMEOUT=1, so that "longer than the budget" is seconds) and until the fit says the server
       does not answer; then it comes back (SIGCONT): the requests it had half-received are
       answered, and the fit says so and catches up while it trains;
    3. once the run holds the steps logged while it hung, it dies (SIGKILL) and stays dead past the
       fit's end (12 steps or more), which gives up after ``flush_timeout`` (3 s), says the
       tracking is behind and where it is kept, and exits 0;
    4. the server is started again on the same port and store; ``au-detect sync-tracking`` sends
       what was kept, the model included.

    The steps during both outages (the first 25 of each: the machine's load drifts) are as fast as
    before (medians, within 20 %: a fit that waited would be ten times slower); the run then holds one train/loss point per step and one val/f1
    per epoch, no point twice, and every artifact.
    """
    # Steps enough for every phase, some of which last seconds, even if the machine's load falls
    # and the steps go twice as fast as measured now.
    step_s = _step_seconds() / 2
    hung_steps = max(HUNG, math.ceil((2 * BUDGET_S + PROBE_TIMEOUT) / step_s))  # till the fit sees it
    catch_up = max(4, math.ceil(3 / step_s))
    per_epoch = max(16, math.ceil((WARMUP + BEFORE + hung_steps + catch_up + DOWN) / 3) + 2)
    t0 = time.time()
    server = Server(tmp_path)
    server.start()
    started = time.time()
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", server.uri, "outage")
    cfg.write_text(cfg.read_text() + "flush_timeout: 3\n")
    log = tmp_path / "steps.txt"
    step_log = {"class_path": f"{__name__}.StepLog", "init_args": {"path": str(log)}}
    args = small_fit_args(synthau, fit_cache, cfg, tmp_path / "runs", epochs=3, train_batches=per_epoch)
    args += ["--data.batch_size", "4", "--data.num_samples", str(4 * per_epoch), "--trainer.num_sanity_val_steps",
             "0", "--model.backbone", "resnet10t", "--model.branches", "[face]",  # quick steps
             f"--trainer.callbacks+={json.dumps(step_log)}"]
    env = {**os.environ, **BUDGET, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    fit = subprocess.Popen([AU_DETECT, "fit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**env, **ONE_THREAD}, cwd=ROOT, start_new_session=True)
    said = _Output(fit)  # read as it comes: what the fit says tells the phases apart
    try:
        def at(step: int) -> bool:
            if fit.poll() is not None:
                raise AssertionError(f"the fit ended early: {said.err()[-3000:]}")
            steps = _steps(log)
            return bool(steps) and steps[-1][2] >= step

        def sent(step: int) -> bool:  # the server holds the fit's train/loss up to this step
            (spool,) = (tmp_path / "runs" / "mlflow_spool").iterdir()
            history = MlflowClient(server.uri).get_metric_history(spool.name, "train/loss")
            return any(m.step >= step - 1 for m in history)

        _wait(lambda: at(WARMUP + BEFORE), timeout=300, what="the steps before the outage")
        server.signal(signal.SIGSTOP)
        hung, hung_at = time.time(), _steps(log)[-1][2]
        _wait(lambda: at(hung_at + HUNG) and time.time() - hung > 2 * BUDGET_S and "does not answer" in said.err(),
              timeout=120, what="steps with the server hung, and the fit saying so")
        server.signal(signal.SIGCONT)
        back, back_at = time.time(), _steps(log)[-1][2]
        _wait(lambda: at(back_at + 1) and "answers again" in said.err() and sent(back_at), timeout=240,
              what="the catch-up", every=0.3)
        server.kill()
        died, died_at = time.time(), _steps(log)[-1][2]
        fit.wait(timeout=300)
        out, err = said.close()
    finally:
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
        server.kill()
    assert fit.returncode == 0, err[-3000:]
    ended = time.time()

    # the steps: as fast during the outages as before
    steps = _steps(log)
    assert [s[2] for s in steps] == list(range(1, 3 * per_epoch + 1))
    assert 3 * per_epoch - died_at >= DOWN - 2, (died_at, per_epoch)  # enough of the fit left with it dead
    before = _durations(steps, steps[0][3], hung, first=WARMUP + 1)
    during = _durations(steps, hung, back, most=MEASURED) + _durations(steps, died, ended, most=MEASURED)
    assert len(before) >= BEFORE - 2 and len(during) >= HUNG + DOWN - 6, (len(before), len(during))
    rates = {"before": 1 / statistics.median(before), "during": 1 / statistics.median(during)}
    print(f"\nsteps/s (medians): {rates['before']:.3f} before, {rates['during']:.3f} during the outages "
          f"({len(before)} and {len(during)} steps; hung {back - hung:.1f} s, dead {ended - died:.1f} s)")
    # A fit that waited on the server would spend MLflow's retry budget (2 s) on a blocked call, a
    # step rate under a tenth of before's; the medians of an undisturbed fit land at 0.9-1.2 of
    # before's with the machine's drift, so 0.8 tells the two apart without failing on noise.
    assert rates["during"] >= 0.8 * rates["before"], rates

    # what the fit said: what it kept where
    assert "MLflow tracking is behind" in out, out[-3000:]
    (spool,) = (tmp_path / "runs" / "mlflow_spool").iterdir()
    assert f"au-detect sync-tracking --spool {spool.resolve()}" in out
    assert "the model" in out and "the run's end (FINISHED)" in out
    print(out[out.index("MLflow tracking is behind"):].splitlines()[1].strip())

    restart = time.time()
    server.start()  # same port, same store
    restarted = time.time()
    sync = subprocess.run([AU_DETECT, "sync-tracking", "--spool", str(spool)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert sync.returncode == 0, sync.stderr[-3000:] + sync.stdout[-3000:]
    assert "nothing left to send" in sync.stdout and not spool.parent.exists()  # sent: nothing left behind
    print(sync.stdout.strip())
    print(f"seconds: server start {started - t0:.0f}, fit {ended - started:.0f} (steps from "
          f"{steps[0][3] - started:.0f}), "
          f"server restart {restarted - restart:.0f}, sync {time.time() - restarted:.0f}")
    try:
        _check_complete_run(server.uri, "outage", len(steps), tmp_path / "check")
    finally:
        server.kill()


def _check_complete_run(uri: str, experiment: str, steps: int, folder: Path) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "resnet10t" and run.data.tags["suite"] == "tests"
    loss = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(steps))  # one point per step, none twice
    val = client.get_metric_history(run_id, "val/f1")
    assert len(val) == 3 and len({m.step for m in val}) == 3  # one per epoch
    # the machine's curves went through the spool too: no gap where the server was away
    cpu = sorted(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert len(cpu) >= 3 and cpu == list(range(len(cpu))), cpu
    points = 0
    for key in run.data.metrics:
        history = [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]
        assert len(history) == len(set(history)), key
        points += len(history)
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "thresholds.json", "au_report.csv", "best.json", "plots", "checkpoints", "data"} <= files
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/label_frequencies.png", "plots/pr_curves.png", "plots/sample_grid.png"} <= plots
    (ckpt,) = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    best = json.loads(Path(client.download_artifacts(run_id, "best.json", str(folder))).read_text())
    assert best["model"] == f"runs:/{run_id}/model" and Path(best["best_checkpoint"]).name == Path(ckpt).name
    models = [m for m in client.search_logged_models([exp.experiment_id]) if m.source_run_id == run_id]
    assert [(m.name, str(m.status)) for m in models] == [("model", "READY")]
    print(f"run {run_id}: {len(loss)} train/loss points for {steps} steps, {len(val)} val/f1, "
          f"{points} metric points in all, none twice; {len(files)} artifact entries, the model READY")
