"""Hostile inputs and faults, round two: model configurations that would allocate without bound,
file names that are spreadsheet formulas, annotated copies that overwrite each other, two runs on
one CSV, labels that only round to 0/1/999, owner-only exports, and what loading a model runs.

The tables ``HOSTILE_CONFIGS``, ``HOSTILE_LABELS`` and ``FORMULA_NAMES`` are plain data, for the
fuzz test to draw from as well.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.alignment.align import AlignmentSettings
from datamodules.io.files import apply_umask
from datamodules.io.manifest import ManifestError, read_manifest
from experiments.predict import run
from experiments.prediction_outputs import OutputBusy, neutralise, open_partial
from lightning_modules.au_detector import AUNet
from lightning_modules.backbones import create_backbone
from lightning_modules.serving.onnx_model import OnnxAUPredictor
from lightning_modules.serving.predictor import AUPredictor, ModelConfigError, build_net

from .training_helpers import interrupted_after

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"aus": [1, 2, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}

# (what is wrong, the change to predictor.json's sections, a word the error must name)
HOSTILE_CONFIGS = [
    ("huge crop", {"alignment": {"crop_size": 20000}}, "crop_size"),
    ("crop not a number", {"alignment": {"crop_size": "96"}}, "crop_size"),
    ("giant ResNet by name", {"net": {"backbone": "resnetv2_152x4_bit"}}, "backbone"),
    ("not a ResNet", {"net": {"backbone": "vit_giant_patch14_224"}}, "backbone"),
    ("backbone not a string", {"net": {"backbone": ["resnet18"]}}, "backbone"),
    ("ten thousand AUs", {"net": {"aus": list(range(1, 10001))}}, "aus"),
    ("no AUs", {"net": {"aus": []}}, "aus"),
    ("AU 0", {"net": {"aus": [0, 1, 2]}}, "aus"),
    ("AU a billion", {"net": {"aus": [1, 2, 10**9]}}, "aus"),
    ("AU as text", {"net": {"aus": [1, 2, "12"]}}, "aus"),
    ("AU as bool", {"net": {"aus": [1, 2, True]}}, "aus"),
    ("duplicate AUs", {"net": {"aus": [1, 1, 2]}}, "aus"),
    ("a hundred branches", {"net": {"branches": ["face"] * 100}}, "branches"),
    ("unknown branch", {"net": {"branches": ["face", "body"]}}, "branches"),
    ("no branches", {"net": {"branches": []}}, "branches"),
    ("threshold above 1", {"thresholds": [0.5, 1.5, 0.5]}, "thresholds"),
    ("threshold NaN", {"thresholds": [0.5, float("nan"), 0.5]}, "thresholds"),
    ("thresholds one short", {"thresholds": [0.5, 0.5]}, "thresholds"),
    ("std zero", {"std": [0.0, 0.2, 0.2]}, "std"),
    ("mean of ten", {"mean": [0.5] * 10}, "mean"),
]

# label cells that float() reads as 0, 1 or 999 but that are not written so
HOSTILE_LABELS = ["0.99999999999999999", "998.99999999999999999", "1e-400", "1e0", "\uff11", "\u0661", "+1", "-0",
                  "01", "1.", ".0", "1_0", "0x1", "999.00000000000000001", "nan", "inf"]
# how the project's own manifests (and pandas) write labels: still read
PLAIN_LABELS = {"0": 0, "1": 1, "999": 999, " 1 ": 1, "1.0": 1, "0.0": 0, "999.0": 999, "0.00": 0}

# file names a spreadsheet would run (OWASP's list of first characters)
FORMULA_NAMES = ["=1+1.png", "+1+1.png", "-2+3.png", "@SUM(1).png", "=HYPERLINK(x).png"]


@pytest.fixture(scope="module")
def predictor() -> AUPredictor:
    """A real predictor (random ResNet-18 branch, 64 px crops): what it answers does not matter here."""
    torch.manual_seed(0)
    return AUPredictor(build_net(SPEC), AlignmentSettings(crop_size=64), SPEC, device="cpu")


@pytest.fixture(scope="module")
def folder(predictor, tmp_path_factory) -> Path:
    return predictor.save(tmp_path_factory.mktemp("predictor") / "model")


@pytest.fixture
def no_timm(monkeypatch):
    """timm refuses to build anything: a config refused before it is built never gets there."""
    import lightning_modules.backbones as backbones

    def refuse(name, *args, **kwargs):
        raise AssertionError(f"timm asked to build {name!r}")

    monkeypatch.setattr(backbones.timm, "create_model", refuse)


def hostile_copy(folder: Path, tmp_path: Path, change: dict) -> Path:
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    config = json.loads((out / "predictor.json").read_text())
    for section, value in change.items():
        if isinstance(value, dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    (out / "predictor.json").write_text(json.dumps(config))
    return out


# -- 3. hostile model configurations ----------------------------------------------------------------------

def test_the_untouched_folder_loads(folder):
    assert AUPredictor.load(str(folder), "cpu").aus == (1, 2, 12)


@pytest.mark.parametrize("what, change, field", HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_hostile_predictor_folder_is_refused_before_anything_is_built(folder, tmp_path, no_timm, what, change,
                                                                        field):
    model = hostile_copy(folder, tmp_path, change)
    with pytest.raises(ModelConfigError) as e:
        AUPredictor.load(str(model), "cpu")
    assert field in str(e.value) and str(model / "predictor.json") in str(e.value)


@pytest.mark.parametrize("what, change, field", HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_hostile_export_folder_is_refused_before_onnxruntime_reads_it(folder, tmp_path, no_timm, what, change,
                                                                        field):
    model = hostile_copy(folder, tmp_path, change)
    (model / "au_net.onnx").write_bytes(b"not read")
    with pytest.raises(ModelConfigError) as e:
        OnnxAUPredictor.from_dir(model, "cpu")
    assert field in str(e.value) and str(model / "predictor.json") in str(e.value)


def checkpoint(tmp_path: Path, hparams: dict, crop_size: int = 64, thresholds=None) -> Path:
    """A checkpoint in the shape ``au-detect fit`` writes (tensors and plain values only)."""
    state = {"net.thresholds": torch.tensor(thresholds if thresholds is not None else [0.5] * len(hparams["aus"]))}
    ckpt = {"hyper_parameters": hparams, "state_dict": state,
            "datamodule_hyper_parameters": {"alignment": {"crop_size": crop_size}, "mean": [0.5] * 3, "std": [0.2] * 3}}
    path = tmp_path / "hostile.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("hparams, crop_size, thresholds, field", [
    (SPEC, 20000, None, "crop_size"),
    ({**SPEC, "backbone": "resnetv2_152x4_bit"}, 64, None, "backbone"),
    ({**SPEC, "aus": list(range(1, 5000))}, 64, None, "aus"),
    ({**SPEC, "branches": ["face"] * 50}, 64, None, "branches"),
    (SPEC, 64, [0.5, 2.0, 0.5], "thresholds"),
    (SPEC, 64, [0.5] * 7, "thresholds"),
], ids=["crop", "backbone", "aus", "branches", "threshold", "threshold count"])
def test_hostile_checkpoint_is_refused_naming_file_and_field(tmp_path, no_timm, hparams, crop_size, thresholds, field):
    path = checkpoint(tmp_path, hparams, crop_size, thresholds)
    with pytest.raises(ModelConfigError) as e:
        AUPredictor.load(str(path), "cpu")
    assert field in str(e.value) and str(path) in str(e.value)


def test_a_fit_with_a_giant_resnet_fails_at_start_up(no_timm):
    with pytest.raises(ValueError, match="resnetv2_152x4_bit.*not a timm ResNet"):
        create_backbone("resnetv2_152x4_bit")
    with pytest.raises(ValueError, match="not a timm ResNet"):
        AUNet([1, 2], "resnetv2_152x4_bit", ["face"])


# -- 4. CSV formula injection -------------------------------------------------------------------------------

def write_images(folder: Path, names: list[str]) -> list[str]:
    """Blank images (no face: a ``no_face`` row each), each of its own size."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(Path(name).suffix or ".png", np.full((40 + 2 * i, 50 + 2 * i, 3), 90, np.uint8))
        assert ok
        target.write_bytes(data.tobytes())
    return names


def csv_cells(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_formula_names_are_neutralised_and_numbers_stay_numbers(predictor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative inputs: the source cell is the name as given
    names = write_images(tmp_path, FORMULA_NAMES)
    missing = "=cmd|' /C calc'!A0.png"
    run(predictor, [*names, missing], "out.csv", progress=False)
    rows = csv_cells(tmp_path / "out.csv")
    header, body = rows[0], rows[1:]
    assert len(body) == len(names) + 1
    by_source = {r[header.index("source")]: r for r in body}
    assert set(by_source) == {"'" + n for n in [*names, missing]}
    message = by_source["'" + missing][header.index("message")]
    assert missing in message
    for row in body:
        for cell in row:
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), row
            if cell.startswith("-"):
                float(cell)  # a negative number, never text
    run(predictor, [*names], "raw.csv", progress=False, csv_formulas="keep")
    raw = csv_cells(tmp_path / "raw.csv")
    assert {r[0] for r in raw[1:]} == set(names)


@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1+2", "@x", "\tx", "\rx"])
def test_neutralise_prefixes_text_cells_only(cell):
    row = {"source": cell, "message": cell, "x0": -3.5, "frame": -1, "face": None, "AU1": 0}
    out = neutralise(row)
    assert out["source"] == out["message"] == "'" + cell
    assert out["x0"] == -3.5 and out["frame"] == -1 and out["face"] is None and out["AU1"] == 0
    assert neutralise({"source": "a=b.jpg", "message": "no face detected"}) == {"source": "a=b.jpg",
                                                                               "message": "no face detected"}


def test_predict_cli_has_the_csv_formulas_option():
    from experiments.predict import predict
    import inspect

    assert inspect.signature(predict).parameters["csv_formulas"].default == "escape"
    assert "csv_formulas" in (predict.__doc__ or "")


# -- 5. annotated copies never collide ----------------------------------------------------------------------

def test_annotated_copies_never_collide_by_suffix_case_or_folder(predictor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["a.png.jpg", "a.jpg", "a.png", "A.JPG", "A.png", "sub1/x.jpg", "sub2/x.jpg", "a.png-2.jpg"]
    write_images(tmp_path / "in", names)
    inputs = [str(Path("in") / n) for n in names]
    run(predictor, inputs, "out.csv", annotate_dir="annotated", progress=False)
    copies = sorted(p for p in (tmp_path / "annotated").rglob("*") if p.is_file())
    assert len(copies) == len(names), copies
    assert len({str(p).casefold() for p in copies}) == len(names)  # apart on a case-insensitive disk too
    sizes = sorted(cv2.imread(str(p)).shape[:2] for p in copies)
    assert sizes == sorted((40 + 2 * i, 50 + 2 * i) for i in range(len(names)))  # each input's own copy
    assert not [p for p in (tmp_path / "annotated").rglob(".*")]  # no temporary left


# -- 11. one CSV per --out, whole or not at all ---------------------------------------------------------

def test_a_second_writer_of_the_same_out_is_refused(predictor, tmp_path):
    names = write_images(tmp_path, ["a.png"])
    out = tmp_path / "out.csv"
    _, held = open_partial(out)  # another run, mid-way
    try:
        with pytest.raises(OutputBusy, match="another au-detect predict is writing it"):
            run(predictor, [str(tmp_path / n) for n in names], str(out), progress=False)
    finally:
        held.close()
    assert not out.exists()
    run(predictor, [str(tmp_path / n) for n in names], str(out), progress=False)  # the lock left with it
    assert len(csv_cells(out)) == 2 and not (tmp_path / "out.csv.partial").exists()


def test_an_interrupted_run_leaves_out_untouched_and_its_rows_in_partial(predictor, tmp_path, monkeypatch):
    names = write_images(tmp_path, [f"{i}.png" for i in range(4)])
    out = tmp_path / "out.csv"
    out.write_text("the previous run's whole file\n")
    real = predictor.predict_batches
    monkeypatch.setattr(predictor, "predict_batches", interrupted_after(real, 2))
    with pytest.raises(KeyboardInterrupt):
        run(predictor, [str(tmp_path / n) for n in names], str(out), batch_frames=1, progress=False)
    assert out.read_text() == "the previous run's whole file\n"
    partial = csv_cells(tmp_path / "out.csv.partial")
    assert partial[0][0] == "source" and len(partial) == 3  # header and the two frames done


@pytest.mark.slow
def test_two_predicts_on_one_out_leave_one_whole_csv(folder, tmp_path):
    """A second predict on the same --out runs while the first is stopped mid-way (SIGSTOP): it is
    refused, and the first, continued, leaves its whole CSV."""
    names = write_images(tmp_path / "in", [f"{i:03d}.png" for i in range(200)])
    out = tmp_path / "out.csv"
    cmd = [sys.executable, "-m", "experiments.cli", "predict", "--model", str(folder), "--out", str(out),
           "--device", "cpu", "--batch_frames", "2", "--input"]
    first = subprocess.Popen([*cmd, str(tmp_path / "in")], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    written = [out, Path(f"{out}.partial")]
    while first.poll() is None and time.time() < deadline and not any(
            p.exists() and p.read_text().count("\n") > 2 for p in written):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:  # the second asks for fewer images: its rows would not simply overwrite the first's
        second = subprocess.run([*cmd, *[str(tmp_path / "in" / n) for n in names[:20]]], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    text = first.communicate(timeout=300)[0]
    assert first.returncode == 0, text[-2000:]
    assert second.returncode != 0 and "another au-detect predict is writing it" in second.stderr + second.stdout
    rows = csv_cells(out)
    assert len(rows) == len(names) + 1 and len({len(r) for r in rows}) == 1


# -- 13. labels written exactly 0, 1 or 999 -----------------------------------------------------------------

@pytest.mark.parametrize("value", HOSTILE_LABELS)
def test_a_label_not_written_0_1_or_999_is_an_error_naming_its_cell(tmp_path, value):
    path = tmp_path / "m.csv"
    path.write_text(f"image,AU1,AU2\na.png,0,1\nb.png,1,{value}\n", encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        read_manifest(path, aus=(1, 2), check_images=False)
    assert f"{path}:3: column 3 (AU2)" in str(e.value)


def test_labels_as_the_project_writes_them_still_read(tmp_path):
    path = tmp_path / "m.csv"
    lines = [f"{i}.png,{v},0" for i, v in enumerate(PLAIN_LABELS)]
    path.write_text("image,AU1,AU2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    m = read_manifest(path, aus=(1, 2), check_images=False)
    expected = [v for v in PLAIN_LABELS.values()]
    assert [int(label) if ok else 999 for label, ok in zip(m.labels[:, 0], m.mask[:, 0])] == expected


# -- 14. exported files readable like their neighbours ------------------------------------------------------

@pytest.fixture
def umask_022():
    saved = os.umask(0o022)
    yield
    os.umask(saved)


def test_apply_umask_gives_a_mkstemp_file_the_users_permissions(tmp_path, umask_022):
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    apply_umask(name)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o644


@pytest.mark.slow
def test_export_and_logged_model_files_are_0644_under_umask_022(predictor, folder, tmp_path, umask_022):
    pytest.importorskip("onnxscript")
    import mlflow

    from experiments.cli import main
    from lightning_modules.serving.pyfunc import log_model

    out = tmp_path / "export"
    main(["export", "--model", str(folder), "--out", str(out)])
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["au_net.onnx"] == 0o644 and set(modes.values()) == {0o644}, modes
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("perm", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_model(predictor, onnx=True)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    stored = [p for p in (tmp_path / "artifacts").rglob("au_net.onnx")]
    assert stored and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in stored)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in local.rglob("*.onnx"))


# -- 15. what loading a model runs ----------------------------------------------------------------------

def test_docs_say_which_loaders_run_the_models_code():
    readme = (ROOT / "README.md").read_text()
    security = (ROOT / "docs/guide/security.md").read_text()
    for text in (readme, security):
        flat = " ".join(text.split())
        assert "mlflow.pyfunc.load_model" in flat and "mlflow models serve" in flat
        assert "stores you trust" in flat
    assert "so loading it unpickles nothing either" not in " ".join(security.split())
    assert "read the model's `predictor.json` and weights only" in " ".join(security.split())
    assert len(readme.splitlines()) <= 200


@pytest.mark.slow
def test_verify_finds_a_changed_or_added_code_file(predictor, tmp_path, monkeypatch):
    """``au-detect verify`` compares a logged model's code files, as stored, with the hashes its
    logging recorded in the tracking store: a tampered file and an added one are named; the
    command says so in one line and exits 1."""
    import mlflow

    from experiments.registry import ModelCodeMismatch, verify
    from lightning_modules.serving.pyfunc import log_model

    from .training_helpers import local_tracking

    uri = local_tracking(tmp_path, "verify")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow.start_run() as run:
        log_model(predictor)
    model = f"runs:/{run.info.run_id}/model"
    hashes = verify(model)
    assert {"MLmodel", "pyfunc_model.py", "requirements.txt", "code/lightning_modules/serving/predictor.py"} <= set(hashes)
    (stored,) = (tmp_path / "artifacts").rglob("code/lightning_modules/serving/predictor.py")
    stored.write_text(stored.read_text() + "\nimport os; os.system('touch pwned')\n")
    (stored.parents[2] / "sitecustomize.py").write_text("print('hello')\n")
    with pytest.raises(ModelCodeMismatch) as e:
        verify(model)
    said = str(e.value)
    assert "changed: code/lightning_modules/serving/predictor.py" in said and "added: code/sitecustomize.py" in said
    done = subprocess.run([str(Path(sys.executable).with_name("au-detect")), "verify", "--model", model],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("au-detect: error:") and "do not load or serve it" in done.stderr
