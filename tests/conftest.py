"""Shared fixtures: a small SynthAU, its aligned cache and one small fit, made once per test
session (once per worker when pytest-xdist runs the suite on several).

Nothing heavy is imported at the top: xdist's controller, which only hands out the tests, loads
this file too (torch, Lightning and MLflow would add about 12 s before any worker starts). The
fixtures import what they use; what the test modules share lives in ``training_helpers``."""

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
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from datamodules.alignment.crop_cache import AlignedSplit


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core, at most 4 (each holds its own SynthAU, fits and servers:
    about 3 GB)."""
    return max(1, min(_cores(), 4))


# The test modules that share the session's `small_fit` (one fit, made once per worker that asks).
SMALL_FIT_MODULES = ("test_logged_figures.py", "test_predict.py", "test_registry.py")


# Seconds each test module took in a whole run of the suite on 2 workers (its tests' setup, call and
# teardown), written by `pytest --module-seconds tests/module_seconds.json`: the workers take the
# longest modules first, and the short ones fill the end.
MODULE_SECONDS = Path(__file__).with_name("module_seconds.json")


def pytest_addoption(parser):
    parser.addoption("--module-seconds", metavar="PATH", default=None,
                     help="write the seconds each test module took to PATH (JSON), for the workers' order")


def _module(item_or_nodeid) -> str:
    return getattr(item_or_nodeid, "nodeid", item_or_nodeid).split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """The longest modules first (``MODULE_SECONDS``; before them, those it does not know yet, the
    ones with the most slow tests first), each module's tests in their order: the workers take
    modules in this order, and a long module taken last keeps one worker busy while the others
    have finished. The modules of ``SMALL_FIT_MODULES`` count as one."""
    known = json.loads(MODULE_SECONDS.read_text()) if MODULE_SECONDS.is_file() else {}
    slow = Counter(_module(item) for item in items if item.get_closest_marker("slow"))
    first_seen = {module: k for k, module in enumerate(dict.fromkeys(_module(item) for item in items))}

    def group(module: str) -> str:
        return "small_fit" if Path(module).name in SMALL_FIT_MODULES else module

    seconds = Counter()
    for module in first_seen:
        seconds[group(module)] += known.get(module, 0.0)

    def order(item):
        module = _module(item)
        return (module in known, -seconds[group(module)], -slow[module], first_seen[module])

    items.sort(key=order)


class _ModuleSeconds:
    """Sums the reported durations by module; written at the end of the session (on the controller
    when xdist runs the suite: the workers' reports come to it)."""

    def __init__(self, path: str):
        self.path, self.seconds = Path(path), Counter()

    def pytest_runtest_logreport(self, report):
        self.seconds[_module(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session):
        self.path.write_text(json.dumps({m: round(s, 1) for m, s in sorted(self.seconds.items())}, indent=1) + "\n")


def pytest_configure(config):
    path = config.getoption("--module-seconds")
    if path and not hasattr(config, "workerinput"):  # on the controller (or the only process)
        config.pluginmanager.register(_ModuleSeconds(path), "module-seconds")
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):  # a process that runs tests
        import torch

        # The workers share the cores: each takes its share of torch's threads (more threads than
        # cores makes every worker slower than it would run alone).
        torch.set_num_threads(max(1, _cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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
    from datamodules.synthau.generate import generate_synthau

    from .training_helpers import SMALL

    root = tmp_path_factory.mktemp("synthau") / "synthau"
    generate_synthau(root, SMALL, workers=2)
    return root


@pytest.fixture(scope="session")
def synthau_13_val(tmp_path_factory) -> Path:
    """130 SynthAU scenes: a validation split of 13, which DistributedSampler pads for 2 ranks."""
    from datamodules.synthau.generate import SynthAUSettings, generate_synthau

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
    from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
    from datamodules.io.manifest import read_manifest

    from .training_helpers import SMALL_ALIGNMENT

    cache = tmp_path_factory.mktemp("cache")
    manifest = read_manifest(synthau / "train.tsv")
    return AlignedSplit.open(align_manifest(manifest, cache, SMALL_ALIGNMENT, name="train"))


@pytest.fixture(scope="session")
def fit_cache(synthau, tmp_path_factory) -> Path:
    """The session's SynthAU aligned as ``small_fit_args`` asks (every split, 64 px), once: the fits
    of the tests read it instead of each aligning the same 120 scenes (a cache is found by its
    images' bytes and settings; a fit only reads it)."""
    from experiments.data import prepare

    from .training_helpers import small_fit_args

    folder = tmp_path_factory.mktemp("fit_cache")
    with contextlib.redirect_stdout(io.StringIO()):  # the alignment reports
        prepare(small_fit_args(synthau, folder / "cache", folder / "unused.yaml", folder / "unused"))
    return folder / "cache"


@pytest.fixture(scope="session")
def small_fit(synthau, fit_cache, tmp_path_factory) -> dict:
    """One small fit (SynthAU's 120 scenes, one epoch of two batches, CPU), its model registered as
    ``SMALL_FIT_MODEL``, then ``au-detect test`` on its best checkpoint into the same run: for the
    tests of what a trained detector logs, predicts, describes and registers. What the fit had left
    before the test (its model card, the registered version, ``predict --describe``) is kept as read then.

    It runs on 2 threads whatever the workers' share, so that its figures are those of one known run."""
    from mlflow import MlflowClient

    from experiments.lightning_cli import AUDetectCLI
    from experiments.predict import predict

    from .training_helpers import SMALL_FIT_EXPERIMENT, SMALL_FIT_MODEL, small_fit_args, torch_threads, write_mlflow_yaml

    tmp = tmp_path_factory.mktemp("small_fit")
    uri = f"sqlite:///{tmp}/mlflow.db"
    settings = write_mlflow_yaml(tmp / "mlflow.yaml", uri, SMALL_FIT_EXPERIMENT, registered_model_name=SMALL_FIT_MODEL)
    args = [*small_fit_args(synthau, fit_cache, settings, tmp / "runs", epochs=1, train_batches=2),
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
    return {"uri": uri, "mlflow_yaml": str(settings), "tmp": tmp, "cache": fit_cache, "run_id": run_id,
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
    from .training_helpers import free_port

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
