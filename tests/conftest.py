"""Shared fixtures: a small SynthAU and its aligned cache, made once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.alignment import AlignmentSettings
from datamodules.crop_cache import AlignedSplit, align_manifest
from datamodules.manifest import read_manifest
from datamodules.synthetic import SynthAUSettings, generate_synthau

torch.set_num_threads(2)

SMALL = SynthAUSettings(num_images=120, seed=3)
SMALL_ALIGNMENT = AlignmentSettings(crop_size=64)


@pytest.fixture(scope="session")
def synthau(tmp_path_factory) -> Path:
    """120 SynthAU scenes (96 train, 12 val, 12 test)."""
    root = tmp_path_factory.mktemp("synthau") / "synthau"
    generate_synthau(root, SMALL, workers=2)
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
