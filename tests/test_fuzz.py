"""Fuzzing: thousands of mutated image files (scan bombs among them) and a hundred mutated videos
through the decoders, ``au-detect predict`` and the MLflow model, some named like spreadsheet
formulas; and hundreds of hostile model configurations. Every input gets its row(s), no CSV cell
is a formula, no configuration builds more than the method's ResNets, nothing raises, nothing
hangs."""

from __future__ import annotations

import csv
import faulthandler
import json
import math
import shutil
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
from lightning_modules.backbones import RESNETS
from lightning_modules.serving.predictor import AUPredictor, ModelConfigError

from .fuzz_inputs import corpus, seed_images
from .training_helpers import local_tracking

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"aus": [1, 2, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
SUFFIX = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "webp": ".webp", "tiff": ".tif", "gif": ".gif"}
STATUSES = {"ok", "no_face", "missing", "empty", "unreadable", "too_large", "too_costly"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet runs (OWASP)


def _scene(synthau: Path, width: int) -> np.ndarray:
    image = cv2.imread(str(next((synthau / "images").rglob("*.jpg"))))
    return cv2.cvtColor(cv2.resize(image, (width, width * 3 // 4), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


@pytest.mark.slow
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
    for i, (name, data) in enumerate(items):
        base = next((k for k in SUFFIX if k in name), "jpeg")
        start = FORMULA_STARTS[i % len(FORMULA_STARTS)] + "1+" if i % 8 == 0 else ""  # =1+..., \t1+...
        (folder / f"{start}{name}{SUFFIX[base]}").write_bytes(data)
    return folder, items


def _predictor() -> AUPredictor:
    """With an intensity head, so that every row also shows whether intensity and occurrence agree;
    thresholds apart, so that both decisions occur."""
    import torch

    torch.manual_seed(0)
    net = AUNet(**{k: SPEC[k] for k in ("aus", "backbone", "branches")}, intensity=True).eval()
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
        net.thresholds.copy_(torch.tensor([0.3, 0.5, 0.7]))
    return AUPredictor(net, AlignmentSettings(crop_size=32), {**SPEC, "intensity": True}, device="cpu")


def test_predict_gives_every_mutated_file_its_rows(fuzz_folder, tmp_path, monkeypatch):
    """Given by a relative glob, so that the names made like formulas start the CSV's cells."""
    from experiments.predict import run

    folder, items = fuzz_folder
    monkeypatch.chdir(folder)
    faulthandler.dump_traceback_later(300, exit=True)  # a hang ends the run with the stack, not silence
    try:
        summary = run(_predictor(), ["*"], str(tmp_path / "rows.csv"), batch_frames=16, progress=False)
    finally:
        faulthandler.cancel_dump_traceback_later()
    with open(tmp_path / "rows.csv", newline="") as f:
        cells = list(csv.reader(f))
    for row in cells[1:]:
        for cell in row:
            assert not cell.startswith(FORMULA_STARTS) or (cell.startswith("-") and _is_number(cell)), cell
    rows = [dict(zip(cells[0], row)) for row in cells[1:]]
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(Path(r["source"].removeprefix("'")).name, []).append(r)
    assert sum(r["source"].startswith("'") for r in rows) >= len(items) // 8 - 1
    assert len(by_file) == len(items) == len(list(folder.iterdir()))  # every file has its rows
    assert {r["status"] for r in rows} <= STATUSES
    assert all(r["message"] for r in rows if r["status"] not in ("ok", "no_face"))
    faces = [r for r in rows if r["status"] == "ok"]
    assert len(faces) >= 20 and all(r["AU12_prob"] for r in faces)  # decoded mutants still show faces
    # intensity never contradicts occurrence: 0 exactly where absent, a level in [1, 5] where present
    decided = set()
    for r in faces:
        for au in ("AU1", "AU2", "AU12"):
            level = float(r[f"{au}_intensity"])
            assert (1 <= level <= 5) if r[au] == "1" else (r[au] == "0" and level == 0), (r["source"], au, level)
            decided.add(r[au])
    assert decided == {"0", "1"}
    assert all(r["AU12_intensity"] == "" for r in rows if r["status"] != "ok")  # no face: no intensity
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


def _is_number(cell: str) -> bool:
    try:
        return not math.isnan(float(cell))
    except ValueError:
        return False


# Values a tampered predictor.json may hold in any field.
HOSTILE_VALUES = [20000, 10**12, -1, 0, 1.5, float("nan"), float("inf"), True, None, "", "96", "resnet18",
                  "resnetv2_152x4_bit", "vit_giant_patch14_224", [], [1] * 10_000, list(range(1, 65)), [0.5, 1.5],
                  {"a": 1}, ["face"] * 50, ["face", "emotion"], [1e308, 0.2, 0.2]]


def _leaves(config, path=()):
    if isinstance(config, dict):
        for k, v in config.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path


def test_hostile_model_configs_are_refused_or_build_a_resnet_of_the_method(synthau, tmp_path, monkeypatch):
    """300 predictor folders, each with one to three fields of ``predictor.json`` set to hostile
    values: each is refused with a ModelConfigError naming the file, or asks timm only for one of
    the method's ResNets at a crop of at most 512 px; nothing else is raised, nothing is built
    before the check."""
    import lightning_modules.backbones as backbones

    folder = _predictor().save(tmp_path / "model")
    original = json.loads((folder / "predictor.json").read_text())
    leaves = list(_leaves(original))
    asked: list[str] = []

    class Built(Exception):
        pass

    def create_model(name, *args, **kwargs):
        asked.append(name)
        raise Built(name)

    monkeypatch.setattr(backbones.timm, "create_model", create_model)
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "built": 0}
    for i in range(300):
        config = json.loads(json.dumps(original))
        for _ in range(int(rng.integers(1, 4))):
            *parents, key = leaves[int(rng.integers(len(leaves)))]
            node = config
            for p in parents:
                node = node[p]
            node[key] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
        model = tmp_path / f"hostile{i}"
        model.mkdir()
        for f in folder.iterdir():  # the weights linked, not copied: only the config differs
            if f.name != "predictor.json":
                (model / f.name).symlink_to(f)
        (model / "predictor.json").write_text(json.dumps(config))
        try:
            AUPredictor.load(str(model), "cpu")
        except ModelConfigError as e:
            assert str(model / "predictor.json") in str(e)
            outcomes["refused"] += 1
        except Built:
            assert asked[-1] in RESNETS and config["alignment"].get("crop_size", 0) <= 512, config
            outcomes["built"] += 1
        else:
            outcomes["built"] += 1  # a harmless change (a field the loader does not read)
        shutil.rmtree(model)
    print(f"\n300 hostile configurations: {outcomes}")
    assert outcomes["refused"] >= 200
