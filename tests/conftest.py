"""Shared fixtures: a small SynthAU and its aligned cache, made once per test session."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from datamodules.alignment.align import AlignmentSettings
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
from datamodules.io.manifest import read_manifest
from datamodules.synthau.generate import SynthAUSettings, generate_synthau

from .training_helpers import free_port

torch.set_num_threads(2)

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
