"""Shared fixtures: a small SynthAU, its aligned cache and one small fit, made once per test
session (once per worker when pytest-xdist runs the suite on several)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules.alignment.align import AlignmentSettings
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
from datamodules.io.manifest import read_manifest
from datamodules.synthau.generate import SynthAUSettings, generate_synthau

from .training_helpers import (SMALL_FIT_EXPERIMENT, SMALL_FIT_MODEL, free_port, small_fit_args, torch_threads,
                               write_mlflow_yaml)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core, at most 4 (each holds its own SynthAU, fits and servers:
    about 3 GB)."""
    return max(1, min(_cores(), 4))


# The workers share the cores: each takes its share of torch's threads (more threads than cores
# makes every worker slower than it would run alone).
torch.set_num_threads(max(1, _cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


# The test modules that share the session's `small_fit` (one fit, made once per worker that asks).
SMALL_FIT_MODULES = ("test_logged_figures.py", "test_predict.py", "test_registry.py")


def _module(item_or_nodeid) -> str:
    return getattr(item_or_nodeid, "nodeid", item_or_nodeid).split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """The modules with the most slow tests first (each module's tests in their order): the workers
    take modules in this order, and a long module taken last keeps one worker busy while the
    others have finished."""
    slow = Counter(_module(item) for item in items if item.get_closest_marker("slow"))
    first_seen = {module: k for k, module in enumerate(dict.fromkeys(_module(item) for item in items))}
    items.sort(key=lambda item: (-slow[_module(item)], first_seen[_module(item)]))


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope``, by module: a test module runs whole on one worker (its module fixtures
    are made once), the modules of ``SMALL_FIT_MODULES`` on the same one, in the order above."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "small_fit" if Path(_module(nodeid)).name in SMALL_FIT_MODULES else _module(nodeid)

    config.option.loadscopereorder = False  # xdist's own order: by the number of tests
    return ByModule(config, log)


SMALL = SynthAUSettings(num_images=120, seed=3)
SMALL_ALIGNMENT = AlignmentSettings(crop_size=64)


@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(tmp_path_factory):
    """Temporary files of the tests and of every process they start (MLflow's downloads, fits
    killed on purpose mid-upload) go to one folder of this session, removed at its end: a run of
    the suite leaves nothing behind in the system's temporary folder."""
    folder = tmp_path_factory.mktemp("tmp")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield folder
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def synthau(tmp_path_factory) -> Path:
    """120 SynthAU scenes (96 train, 12 val, 12 test)."""
    root = tmp_path_factory.mktemp("synthau") / "synthau"
    generate_synthau(root, SMALL, workers=2)
    return root


@pytest.fixture(scope="session")
def synthau_13_val(tmp_path_factory) -> Path:
    """130 SynthAU scenes: a validation split of 13, which DistributedSampler pads for 2 ranks."""
    root = tmp_path_factory.mktemp("synthau130") / "synthau"
    generate_synthau(root, SynthAUSettings(num_images=130, seed=3), workers=2)
    return root


@pytest.fixture(scope="session")
def truth(synthau) -> dict[str, dict]:
    """Ground truth of every scene by image reference: faces, boxes, landmarks, intensities."""
    rows = [json.loads(line) for line in (synthau / "faces.jsonl").read_text().splitlines()]
    return {r["image"]: r for r in rows}


@pytest.fixture(scope="session")
def aligned_train(synthau, tmp_path_factory) -> AlignedSplit:
    cache = tmp_path_factory.mktemp("cache")
    manifest = read_manifest(synthau / "train.tsv")
    return AlignedSplit.open(align_manifest(manifest, cache, SMALL_ALIGNMENT, name="train"))


@pytest.fixture(scope="session")
def small_fit(synthau, tmp_path_factory) -> dict:
    """One small fit (SynthAU's 120 scenes, one epoch of two batches, CPU), its model registered as
    ``SMALL_FIT_MODEL``, then ``au-detect test`` on its best checkpoint into the same run: for the
    tests of what a trained detector logs, predicts, describes and registers. What the fit had left
    before the test (its model card, the registered version, ``predict --describe``) is kept as read then.

    It runs on 2 threads whatever the workers' share, so that its figures are those of one known run."""
    from mlflow import MlflowClient

    from experiments.lightning_cli import AUDetectCLI
    from experiments.predict import predict

    tmp = tmp_path_factory.mktemp("small_fit")
    uri = f"sqlite:///{tmp}/mlflow.db"
    settings = write_mlflow_yaml(tmp / "mlflow.yaml", uri, SMALL_FIT_EXPERIMENT, registered_model_name=SMALL_FIT_MODEL)
    args = [*small_fit_args(synthau, tmp / "cache", settings, tmp / "runs", epochs=1, train_batches=2),
            # the CPU, where the tests recompute its figures: a threshold fitted on validation is one of
            # its probabilities, and the decision there must come out the same
            "--trainer.accelerator", "cpu"]
    client = MlflowClient(uri)
    with torch_threads(2):
        fit = AUDetectCLI(args=["fit", *args])
        run_id = fit.trainer.logger.run_id
        best = fit.trainer.checkpoint_callback.best_model_path
        described = io.StringIO()
        with contextlib.redirect_stdout(described):
            predict(model=f"runs:/{run_id}/model", describe=True, mlflow=str(settings))
        before_test = {"card": client.get_run(run_id).data.tags["mlflow.note.content"],
                       "candidate": client.get_model_version_by_alias(SMALL_FIT_MODEL, "candidate"),
                       "described": described.getvalue()}
        test = AUDetectCLI(args=["test", *args, "--ckpt_path", best])
    return {"uri": uri, "mlflow_yaml": str(settings), "tmp": tmp, "cache": tmp / "cache", "run_id": run_id,
            "best": best, "fit": fit, "test": test, "client": client, "before_test": before_test}


@pytest.fixture
def image_server(synthau):
    """SynthAU's folder over HTTP on 127.0.0.1, as EmotioNet's URLs would be."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(synthau)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` process on loopback, with its own SQLite store and artifact root."""
    port = free_port()
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


def interrupted_after(predict_batches, n: int):
    """``predict_batches`` that raises KeyboardInterrupt (Ctrl-C) once ``n`` batches have gone through."""
    def interrupted(frames, *args, **kwargs):
        for k, item in enumerate(predict_batches(frames, *args, **kwargs)):
            if k == n:
                raise KeyboardInterrupt
            yield item

    return interrupted
