"""Processes started together on a new SQLite MLflow store all open it: its tables are created and
migrated by one of them, under ``creation_lock``, and every one finds its experiment and makes its run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]

# What a fit does at start-up with the store: the CLI's logger (store, experiment, run name), then
# the run itself. Each child waits at a barrier (the file ``go``) so that all open the store at once.
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    folder, index = Path(sys.argv[1]), sys.argv[2]
    from experiments.tracking import TrackingSettings

    settings = TrackingSettings(tracking_uri=f"sqlite:///{folder}/mlflow.db", experiment_name="race",
                                artifact_location=str(folder / "artifacts"))
    (folder / f"ready-{index}").touch()
    while not (folder / "go").exists():
        time.sleep(0.001)
    logger = settings.logger(default_run_name="race", spool_root=folder / "spool", log_hyperparams=False)
    logger.experiment.log_metric(logger.run_id, "started", 1.0)
    logger.finalize("success")
    print("RUN", logger.run_id)
""")


def start_together(folder: Path, count: int, pythonpath: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """``count`` children of :data:`CHILD` released at once on a new store in ``folder``."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(i)], env=env, cwd=folder,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    deadline = time.time() + 120
    while len(list(folder.glob("ready-*"))) < count:
        assert time.time() < deadline and all(c.poll() is None for c in children), "a child died before the barrier"
        time.sleep(0.05)
    (folder / "go").touch()
    done = []
    for child in children:
        out, err = child.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(child.args, child.returncode, out, err))
    return done


# Without the lock, 3 or 4 of 4 such processes fail (and 2 of 3): 4 show the race every time.
@pytest.mark.slow
def test_four_processes_open_a_new_sqlite_store_at_once(tmp_path):
    done = start_together(tmp_path, 4)
    failed = [d.stderr[-1500:] for d in done if d.returncode != 0]
    assert not failed, f"{len(failed)} of 4 failed:\n" + "\n---\n".join(failed)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics["started"] == 1.0 for r in runs)
