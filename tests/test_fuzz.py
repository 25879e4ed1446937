"""Fuzzing: thousands of mutated image files (scan bombs among them) and a hundred mutated videos
through the decoders, ``au-detect predict`` and the MLflow model. Every input gets its row(s),
nothing raises, nothing hangs."""

from __future__ import annotations

import csv
import faulthandler
import json
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest

from datamodules.alignment.align import AlignmentSettings
from lightning_modules.au_detector import AUNet
from lightning_modules.serving.predictor import AUPredictor

from .fuzz_inputs import corpus, seed_images
from .training_helpers import local_tracking

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"aus": [1, 2, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
SUFFIX = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "webp": ".webp", "tiff": ".tif", "gif": ".gif"}
STATUSES = {"ok", "no_face", "missing", "empty", "unreadable", "too_large", "too_costly"}


def _scene(synthau: Path, width: int) -> np.ndarray:
    image = cv2.imread(str(next((synthau / "images").rglob("*.jpg"))))
    return cv2.cvtColor(cv2.resize(image, (width, width * 3 // 4), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def test_decoder_survives_mutated_files(synthau, tmp_path):
    """3,000 inputs through ``read_image``, then 120 videos through ``video_frames``, in a child
    process (a hang or a crash in a C decoder fails the test and leaves the input behind): each
    decodes to RGB uint8 (frames within the pixel limit) or raises the project's InputError
    naming it; nothing else."""
    for name, data in seed_images(_scene(synthau, 64)).items():
        (tmp_path / f"seed_{name}.bin").write_bytes(data)
    try:
        done = subprocess.run([sys.executable, "-m", "tests.fuzz_inputs", str(tmp_path), "3000", "0"], cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the decoder hung; the input is {tmp_path / 'current.bin'}")
    assert done.returncode == 0, f"the decoder crashed ({done.returncode}) on {tmp_path / 'current.bin'}: " \
                                 f"{done.stderr[-2000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{summary['inputs']} inputs in {summary['seconds']} s: {summary['decoded']} decoded, "
          f"refused by status {summary['statuses']}; {summary['videos']} videos: {summary['video_frames']} frames, "
          f"by status {summary['video_statuses']}")
    assert summary["failures"] == []
    assert summary["decoded"] > 300  # flipped bits in pixel data still decode: the test reached the decoders
    assert {"unreadable", "too_large", "empty", "too_costly"} <= set(summary["statuses"])
    assert {"ok", "too_large", "too_costly", "broken_video"} <= set(summary["video_statuses"])


@pytest.fixture(scope="module")
def fuzz_folder(synthau, tmp_path_factory) -> tuple[Path, list[tuple[str, bytes]]]:
    """400 inputs (seeds are a SynthAU scene at 160 px, so faces are there to find) as files named
    like the images they started from."""
    folder = tmp_path_factory.mktemp("fuzz")
    items = corpus(seed_images(_scene(synthau, 160)), 400, seed=1)
    for name, data in items:
        base = next((k for k in SUFFIX if k in name), "jpeg")
        (folder / f"{name}{SUFFIX[base]}").write_bytes(data)
    return folder, items


def _predictor() -> AUPredictor:
    return AUPredictor(AUNet(**{k: SPEC[k] for k in ("aus", "backbone", "branches")}),
                       AlignmentSettings(crop_size=32), SPEC, device="cpu")


def test_predict_gives_every_mutated_file_its_rows(fuzz_folder, tmp_path):
    from experiments.predict import run

    folder, items = fuzz_folder
    faulthandler.dump_traceback_later(300, exit=True)  # a hang ends the run with the stack, not silence
    try:
        summary = run(_predictor(), [str(folder)], str(tmp_path / "rows.csv"), batch_frames=16, progress=False)
    finally:
        faulthandler.cancel_dump_traceback_later()
    with open(tmp_path / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(Path(r["source"]).name, []).append(r)
    assert len(by_file) == len(items) == len(list(folder.iterdir()))  # every file has its rows
    assert {r["status"] for r in rows} <= STATUSES
    assert all(r["message"] for r in rows if r["status"] not in ("ok", "no_face"))
    faces = [r for r in rows if r["status"] == "ok"]
    assert len(faces) >= 20 and all(r["AU12_prob"] for r in faces)  # decoded mutants still show faces
    print(f"\n{len(items)} files: {summary}")


@pytest.mark.slow
def test_mlflow_model_gives_every_mutated_row_its_rows(fuzz_folder, tmp_path):
    from lightning_modules.serving.pyfunc import log_model

    _, items = fuzz_folder
    local_tracking(tmp_path)
    with mlflow.start_run():
        info = log_model(_predictor())
    model = mlflow.pyfunc.load_model(info.model_uri)
    seen: set[int] = set()
    for start in range(0, len(items), 64):  # requests of the model's max_rows
        answer = model.predict(pd.DataFrame({"image": [data for _, data in items[start:start + 64]]}))
        assert set(answer["status"]) <= STATUSES
        seen |= {start + int(s) for s in answer["source"]}
    assert seen == set(range(len(items)))
