"""``au-detect export`` and ``predict --backend onnxruntime``: the ONNX file answers as PyTorch does."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
from datamodules.io.manifest import read_manifest
from experiments.cli import main
from lightning_modules.au_detector import AUNet
from lightning_modules.serving.onnx_model import ONNX_FILE, OnnxAUPredictor, load_predictor
from lightning_modules.serving.predictor import AUPredictor

from .training_helpers import SMALL_ALIGNMENT

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"aus": [1, 2, 4, 6, 12, 25], "backbone": "resnet18", "branches": ["face", "emotion"], "aux_heads": False}


@pytest.fixture(scope="module")
def test_crops(synthau, tmp_path_factory) -> np.ndarray:
    """The aligned faces of SynthAU's test split."""
    cache = tmp_path_factory.mktemp("test_cache")
    split = AlignedSplit.open(align_manifest(read_manifest(synthau / "test.tsv"), cache, SMALL_ALIGNMENT, name="test"))
    return np.asarray(split.crops)


@pytest.fixture(scope="module")
def predictor_folder(test_crops, tmp_path_factory) -> Path:
    """A two-branch predictor whose thresholds sit at each AU's median probability on the test
    crops, so that half of the decisions are positive and a small difference could flip some."""
    torch.manual_seed(0)
    predictor = AUPredictor(AUNet(SPEC["aus"], SPEC["backbone"], SPEC["branches"]), SMALL_ALIGNMENT, SPEC,
                            device="cpu")
    probs, _ = predictor.classify(test_crops)
    predictor.net.thresholds.copy_(torch.from_numpy(np.median(probs, axis=0)))
    return predictor.save(tmp_path_factory.mktemp("predictor"))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def export_and_log(predictor_folder, tmp_path_factory) -> tuple[Path, list[logging.LogRecord]]:
    """``au-detect export`` of the predictor (once: torch's exporter takes seconds), and every
    record logged meanwhile at INFO and above."""
    out = tmp_path_factory.mktemp("exported") / "export"
    root, handler = logging.getLogger(), _Records()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        main(["export", "--model", str(predictor_folder), "--out", str(out)])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return out, handler.records


@pytest.fixture(scope="module")
def exported(export_and_log) -> Path:
    return export_and_log[0]


def test_export_matches_pytorch_on_the_test_split(predictor_folder, exported, test_crops):
    out = exported
    torch_predictor = AUPredictor.load(str(predictor_folder), "cpu")
    onnx_predictor = load_predictor(str(out), "cpu", backend="onnxruntime")
    assert isinstance(onnx_predictor, OnnxAUPredictor) and onnx_predictor.aus == torch_predictor.aus
    np.testing.assert_array_equal(onnx_predictor.thresholds, torch_predictor.thresholds)
    assert len(test_crops) >= 10
    p_torch, d_torch = torch_predictor.classify(test_crops)
    onnx_predictor.batch_size = 5  # several runs of the dynamic batch axis, one of them short
    p_onnx, d_onnx = onnx_predictor.classify(test_crops)
    assert np.abs(p_torch - p_onnx).max() <= 1e-4
    np.testing.assert_array_equal(d_torch, d_onnx)
    assert 0.3 < d_torch.mean() < 0.7  # decisions at the medians: both kinds present
    # what a caller without this project reads from the file itself
    meta = ort.InferenceSession(str(out / ONNX_FILE)).get_modelmeta().custom_metadata_map
    assert json.loads(meta["aus"]) == [f"AU{a}" for a in SPEC["aus"]] and int(meta["crop_size"]) == 64
    np.testing.assert_allclose(json.loads(meta["thresholds"]), torch_predictor.thresholds, atol=1e-6)
    config = json.loads((out / "predictor.json").read_text())
    assert config["onnx"]["input"] == {**config["onnx"]["input"], "name": "crops", "dtype": "uint8",
                                       "shape": ["batch", 64, 64, 3]}


@pytest.fixture(scope="module")
def intensity_export(test_crops, tmp_path_factory) -> tuple[Path, Path]:
    """A predictor with an intensity head (thresholds at the medians, as above) and its export."""
    torch.manual_seed(1)
    spec = {**SPEC, "intensity": True}
    predictor = AUPredictor(AUNet(SPEC["aus"], SPEC["backbone"], SPEC["branches"], intensity=True), SMALL_ALIGNMENT,
                            spec, device="cpu")
    probs, _ = predictor.classify(test_crops)
    predictor.net.thresholds.copy_(torch.from_numpy(np.median(probs, axis=0)))
    folder = predictor.save(tmp_path_factory.mktemp("intensity_predictor"))
    out = tmp_path_factory.mktemp("intensity_exported") / "export"
    main(["export", "--model", str(folder), "--out", str(out)])
    return folder, out


def test_export_with_an_intensity_head_answers_intensities_as_pytorch(intensity_export, test_crops, tmp_path):
    folder, out = intensity_export
    torch_predictor = AUPredictor.load(str(folder), "cpu")
    onnx_predictor = load_predictor(str(out), "cpu", backend="onnxruntime")
    assert torch_predictor.has_intensity and onnx_predictor.has_intensity
    session = ort.InferenceSession(str(out / ONNX_FILE))
    assert [o.name for o in session.get_outputs()] == ["probabilities", "decisions", "intensities"]
    onnx_predictor.batch_size = 7
    p_t, d_t, i_t = torch_predictor.classify_intensity(test_crops)
    p_o, d_o, i_o = onnx_predictor.classify_intensity(test_crops)
    assert np.abs(p_t - p_o).max() <= 1e-4 and np.abs(i_t - i_o).max() <= 1e-4
    np.testing.assert_array_equal(d_t, d_o)
    assert 0.3 < d_o.mean() < 0.7
    # never a contradiction: 0 exactly where absent, a level in [1, 5] where present
    assert (i_o[~d_o] == 0).all() and ((i_o[d_o] >= 1) & (i_o[d_o] <= 5)).all()
    assert i_o[d_o].std() > 0.01  # the head's answer, not a constant
    config = json.loads((out / "predictor.json").read_text())
    assert config["onnx"]["outputs"]["intensities"]["shape"] == ["batch", len(SPEC["aus"])]
    # predictor.json saying "no intensity head" beside a graph that has one: refused, as other mismatches
    shutil.copytree(out, tmp_path / "export")
    config["net"]["intensity"] = False
    (tmp_path / "export" / "predictor.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"outputs .*intensities.*not of one export"):
        load_predictor(str(tmp_path / "export"), "cpu", backend="onnxruntime")


def test_predict_with_onnxruntime_writes_the_rows_of_torch(synthau, truth, predictor_folder, exported,
                                                           intensity_export, tmp_path):
    ref = next(ref for ref, r in truth.items() if len(r["faces"]) == 2)
    image = tmp_path / "scene.jpg"
    shutil.copy(synthau / ref, image)
    for intensity, (torch_model, onnx_model) in ((False, (predictor_folder, exported)), (True, intensity_export)):
        rows = {}
        for backend, model in (("torch", torch_model), ("onnxruntime", onnx_model)):
            out = tmp_path / f"{backend}_{intensity}.csv"
            main(["predict", "--model", str(model), "--backend", backend, "--input", str(image), "--out", str(out)])
            with open(out, newline="") as f:
                rows[backend] = list(csv.DictReader(f))
        assert len(rows["torch"]) == len(rows["onnxruntime"]) == 2
        assert rows["torch"][0].keys() == rows["onnxruntime"][0].keys()
        assert ("AU12_intensity" in rows["onnxruntime"][0]) == intensity
        for a, b in zip(rows["torch"], rows["onnxruntime"]):
            assert a["status"] == b["status"] == "ok" and a["x0"] == b["x0"]
            for au in SPEC["aus"]:
                assert abs(float(a[f"AU{au}_prob"]) - float(b[f"AU{au}_prob"])) <= 1e-4
                assert a[f"AU{au}"] == b[f"AU{au}"]
                if intensity:  # CSV values are rounded to 3 places
                    assert abs(float(a[f"AU{au}_intensity"]) - float(b[f"AU{au}_intensity"])) <= 1.5e-3


@pytest.mark.slow
def test_an_identity_backbone_tells_people_apart_beside_onnxruntime(predictor_folder, exported, test_crops, tmp_path):
    """``--identity_weights`` with the onnxruntime backend: the backbone runs in PyTorch beside the
    graph (the same embeddings as with torch, the masked crops only), so a video's rows are
    torch's: the same faces, person ids and decisions, probabilities within 1e-4."""
    from datamodules.synthau.video import VideoSettings, clip_names, render_videos
    from lightning_modules.backbones import create_backbone

    render_videos(tmp_path / "clips", VideoSettings(clips=1, people=(3, 3), seconds=3.0, fps=8.0, width=320,
                                                    height=240, seed=2), workers=1)
    video = tmp_path / "clips" / clip_names(0)[0]
    torch.manual_seed(0)
    weights = tmp_path / "face_resnet18.pt"
    torch.save(create_backbone("resnet18")[0].state_dict(), weights)
    embedded = {}
    for backend, model in (("torch", predictor_folder), ("onnxruntime", exported)):
        predictor = load_predictor(str(model), "cpu", backend=backend)
        predictor.use_identity_weights(str(weights))
        embedded[backend] = predictor.classify_faces(test_crops[:6], np.array([True, False] * 3))[3]
    assert embedded["torch"].shape == (6, 512) and np.isnan(embedded["torch"][1::2]).all()
    np.testing.assert_allclose(embedded["onnxruntime"], embedded["torch"], atol=1e-6)
    rows = {}
    for backend, model in (("torch", predictor_folder), ("onnxruntime", exported)):
        out = tmp_path / f"{backend}.csv"
        main(["predict", "--model", str(model), "--backend", backend, "--input", str(video), "--out", str(out),
              "--identity_weights", str(weights), "--smooth_s", "0"])
        with open(out, newline="") as f:
            rows[backend] = list(csv.DictReader(f))
    faces = [r for r in rows["torch"] if r["status"] == "ok"]
    assert len(rows["torch"]) == len(rows["onnxruntime"]) and len(faces) > 24
    assert len({r["person"] for r in faces}) >= 2
    for a, b in zip(rows["torch"], rows["onnxruntime"]):
        assert (a["frame"], a["status"], a["person"], a["x0"]) == (b["frame"], b["status"], b["person"], b["x0"])
        for au in SPEC["aus"] if a["status"] == "ok" else ():
            assert abs(float(a[f"AU{au}_prob"]) - float(b[f"AU{au}_prob"])) <= 1e-4 and a[f"AU{au}"] == b[f"AU{au}"]


def test_readme_example_runs_without_this_project(exported, tmp_path, monkeypatch):
    """The README's few lines of onnxruntime + numpy, run as they are written."""
    shutil.copytree(exported, tmp_path / "export")
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"<!-- onnx-example -->\n```python\n(.*?)```", readme, re.S)
    assert "au_detect" not in code and "lightning_modules" not in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["probabilities"].shape == (1, len(SPEC["aus"])) and scope["decisions"].dtype == bool


def test_wrong_folders_and_options_are_named(predictor_folder, exported, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"au-detect export.*au_net\.onnx"):
        load_predictor(str(predictor_folder), "cpu", backend="onnxruntime")
    with pytest.raises(ValueError, match="onnxruntime backend runs the exported float32"):
        main(["predict", "--model", str(predictor_folder), "--backend", "onnxruntime", "--precision", "bf16-mixed",
              "--input", str(tmp_path)])
    # an export's config from another crop size than its file: refused, not run on wrong crops
    shutil.copytree(exported, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "predictor.json").read_text())
    config["alignment"]["crop_size"] = 96
    (tmp_path / "export" / "predictor.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not of one export"):
        load_predictor(str(tmp_path / "export"), "cpu", backend="onnxruntime")
    with pytest.raises(SystemExit):
        main(["export", "--model", str(predictor_folder), "--out", str(tmp_path / "x"), "--format", "tflite"])
    assert "tflite" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_mlflow_run_holds_the_onnx_model_and_the_pyfunc_runs_it(synthau, truth, predictor_folder, tmp_path):
    """``log_onnx``: the pyfunc model answers alike with ``backend: onnxruntime``, and the ONNX
    model is an MLflow ONNX model of its own on the run."""
    import mlflow
    import onnx
    import pandas as pd
    from mlflow import MlflowClient

    from lightning_modules.serving.pyfunc import log_model_to_run

    from .training_helpers import local_tracking

    uri = local_tracking(tmp_path)
    predictor = AUPredictor.load(str(predictor_folder), "cpu")
    with mlflow.start_run() as run:
        pass
    client = MlflowClient(uri)
    for _ in range(2):  # a second attempt (a resumed fit) leaves one model of each name
        log_model_to_run(predictor, client, run.info.run_id, onnx=True)
    exp = run.info.experiment_id
    names = sorted(m.name for m in client.search_logged_models([exp]))
    assert names == ["model", "model_onnx"], names
    graph = mlflow.onnx.load_model(f"runs:/{run.info.run_id}/model_onnx", dst_path=str(tmp_path / "onnx"))
    assert isinstance(graph, onnx.ModelProto) and graph.graph.input[0].name == "crops"
    ref = next(ref for ref, r in truth.items() if len(r["faces"]) == 2)
    request = pd.DataFrame({"image": [(synthau / ref).read_bytes()]})
    answers = {}
    for backend in ("torch", "onnxruntime"):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model", model_config={"backend": backend},
                                         dst_path=str(tmp_path / backend))
        assert type(model.unwrap_python_model().predictor).__name__ == (
            "OnnxAUPredictor" if backend == "onnxruntime" else "AUPredictor")
        answers[backend] = model.predict(request)
    a, b = answers["torch"], answers["onnxruntime"]
    assert list(a["status"]) == list(b["status"]) == ["ok", "ok"]
    probs = [c for c in a.columns if c.endswith("_prob")]
    assert np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max() <= 1e-4
    decisions = [c[:-len("_prob")] for c in probs]
    np.testing.assert_array_equal(a[decisions].to_numpy(), b[decisions].to_numpy())


@pytest.mark.slow
def test_logged_model_carries_only_the_served_code_and_loads_without_the_project(predictor_folder, synthau, truth,
                                                                                tmp_path):
    """The model's code folder holds what serving imports and nothing of training, download or
    SynthAU; a Python that cannot import the project otherwise (no editable install, another cwd)
    loads it from that folder alone and answers with both backends as the installed code does.
    After loading, a process spawned from the loading one imports the project from where it
    imported before: the code folder (kept on ``sys.path``, last) without the project; the project
    with it (MLflow's code folder, first on ``sys.path``, would otherwise hand the child its partial
    ``datamodules``)."""
    import importlib
    import multiprocessing
    import subprocess
    import sys
    import sysconfig

    import mlflow
    import pandas as pd

    from lightning_modules.serving.model_code import ROOT as PROJECT, served_files
    from lightning_modules.serving.pyfunc import MODEL_CODE, log_model

    from .training_helpers import local_tracking

    local_tracking(tmp_path)
    with mlflow.start_run() as run:
        log_model(AUPredictor.load(str(predictor_folder), "cpu"), onnx=True)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "m")))
    shipped = sorted(str(p.relative_to(model_dir / "code")) for p in (model_dir / "code").rglob("*.py"))
    assert shipped == [str(p.relative_to(PROJECT)) for p in served_files(MODEL_CODE)]
    for needed in ("lightning_modules/serving/pyfunc_model.py", "lightning_modules/serving/onnx_model.py",
                   "lightning_modules/au_detector.py", "datamodules/alignment/mtcnn_cascade.py",
                   "datamodules/io/images.py", "datamodules/augmentation.py"):
        assert needed in shipped
    for left_out in ("datamodules/au_datamodule.py", "datamodules/alignment/crop_cache.py",
                     "datamodules/download", "datamodules/synthau", "lightning_modules/pretrain.py", "sampling.py"):
        assert not any(left_out in name for name in shipped), left_out
    assert not any("__pycache__" in str(p) for p in (model_dir / "code").rglob("*"))

    ref = next(ref for ref, r in truth.items() if len(r["faces"]) == 2)
    request = tmp_path / "request.parquet"
    pd.DataFrame({"image": [(synthau / ref).read_bytes()]}).to_parquet(request)
    script = (
        "import sys, mlflow.pyfunc, pandas as pd\n"
        "for backend in ('torch', 'onnxruntime'):\n"
        f"    m = mlflow.pyfunc.load_model({str(model_dir)!r}, model_config={{'backend': backend}})\n"
        f"    out = m.predict(pd.read_parquet({str(request)!r}))\n"
        f"    out.to_csv({str(tmp_path)!r} + f'/{{backend}}.csv', index=False)\n"
        "import datamodules, lightning_modules\n"
        "print(datamodules.__file__, lightning_modules.__file__)\n"
        "import importlib, multiprocessing\n"
        "child = multiprocessing.get_context('spawn').Process(target=importlib.import_module,\n"
        "                                                     args=('datamodules.alignment.align',))\n"
        "child.start(); child.join()\n"
        "print('spawned child', child.exitcode, 'code folder last', sys.path[-1].endswith('code'))\n")
    # -S: no site-packages .pth files, so no editable install; the libraries come from PYTHONPATH
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"], "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(model_dir / "code") in done.stdout  # the project came from the model's own code folder
    assert "spawned child 0 code folder last True" in done.stdout
    installed = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.read_parquet(request))
    assert not any(p and Path(p).resolve() == (model_dir / "code").resolve() for p in sys.path)
    child = multiprocessing.get_context("spawn").Process(target=importlib.import_module,
                                                         args=("datamodules.au_datamodule",))  # not in the copy
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    for backend in ("torch", "onnxruntime"):
        isolated = pd.read_csv(tmp_path / f"{backend}.csv")
        assert list(isolated["status"]) == list(installed["status"]) == ["ok", "ok"]
        probs = [c for c in installed.columns if c.endswith("_prob")]
        assert np.abs(isolated[probs].to_numpy() - installed[probs].to_numpy()).max() <= 1e-4


def test_export_keeps_the_exporters_chatter_back(export_and_log):
    """torch's exporter logs each optimiser rewrite at INFO (about 25 lines): held back."""
    out, records = export_and_log
    chatter = [r.getMessage() for r in records
               if r.name.startswith(("onnxscript", "onnx_ir", "torch.onnx")) and r.levelno < logging.WARNING]
    assert chatter == []
    assert (out / "au_net.onnx").is_file()


def test_loading_a_trained_model_says_nothing_of_random_weights(predictor_folder, caplog):
    """Its network is built with random weights and then given the saved ones: no "random initialisation" line."""
    caplog.set_level(logging.INFO)
    AUPredictor.from_dir(predictor_folder, device="cpu")
    assert not [r for r in caplog.records if "random initialisation" in r.getMessage()]
    caplog.clear()
    AUNet(SPEC["aus"], SPEC["backbone"], SPEC["branches"])  # a new network does say it
    assert any("random initialisation" in r.getMessage() for r in caplog.records)


def test_the_session_runs_as_many_threads_as_pytorch_at_full_optimisation(exported):
    """onnxruntime's default counts the host's cores, not this process's share; the session
    follows PyTorch's thread count (OMP_NUM_THREADS, torch.set_num_threads)."""
    from lightning_modules.serving.onnx_model import ONNX_FILE, onnx_session

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        options = onnx_session(Path(exported) / ONNX_FILE).get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert onnx_session(Path(exported) / ONNX_FILE, threads=3).get_session_options().intra_op_num_threads == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # calibration and quantisation: seconds
def test_int8_export_is_quantized_calibrated_and_decides_as_float32(predictor_folder, synthau, test_crops, tmp_path,
                                                                     capsys):
    """``--int8 --calibration <val manifest>``: weights int8 per channel in QDQ form, the config
    says so, the answers on the test faces stay close to PyTorch float32's (decisions at the same
    thresholds), and predict runs the folder."""
    import onnx

    from lightning_modules.serving.quantize import agreement

    out = tmp_path / "int8"
    main(["export", "--model", str(predictor_folder), "--out", str(out), "--int8", "--calibration",
          str(synthau / "val.tsv")])
    said = capsys.readouterr().out
    assert "Quantized" in said and "calibration faces" in said
    config = json.loads((out / "predictor.json").read_text())
    assert config["quantized"]["weights"].startswith("int8") and config["quantized"]["calibration_crops"] >= 10
    graph = onnx.load(out / ONNX_FILE).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # every convolution of two ResNet-18 branches and the head
    predictor = AUPredictor.load(str(predictor_folder), "cpu")
    quantized = OnnxAUPredictor.from_dir(out, "cpu")
    check = agreement(predictor, quantized, test_crops)
    assert check["decisions_equal"] >= 0.9 and check["mean_abs_prob"] < 0.05
    photos = sorted((synthau / "images" / "test").glob("*.jpg"))[:3]
    rows_out = tmp_path / "rows.csv"
    main(["predict", "--model", str(out), "--backend", "onnxruntime", "--input", *map(str, photos),
          "--out", str(rows_out)])
    with open(rows_out, newline="") as f:
        assert sum(r["status"] == "ok" for r in csv.DictReader(f)) >= 3


def test_int8_without_calibration_faces_is_refused(predictor_folder, tmp_path):
    """Refused before anything is written: a float32 export left in ``--out`` would pass for the
    int8 one asked for."""
    with pytest.raises(ValueError, match="--int8 needs --calibration"):
        main(["export", "--model", str(predictor_folder), "--out", str(tmp_path / "a"), "--int8"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--calibration .*no face found to calibrate int8 on"):
        main(["export", "--model", str(predictor_folder), "--out", str(tmp_path / "b"), "--int8", "--calibration",
              str(empty)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
