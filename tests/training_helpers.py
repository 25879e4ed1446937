"""Shared by the training tests: small overrides of the demo config, and reading a run back."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image
import yaml
from mlflow import MlflowClient

from callbacks.tracking.dataset_lineage import manifest_digest
from datamodules.alignment.align import AlignmentSettings
from datamodules.synthau.generate import SynthAUSettings
from lightning_modules.au_detector import AUNet
from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.serving.predictor import AUPredictor


ROOT = Path(__file__).resolve().parents[1]
# the session's SynthAU (conftest's ``synthau``) and the crops the tests align it to
SMALL = SynthAUSettings(num_images=120, seed=3)
SMALL_ALIGNMENT = AlignmentSettings(crop_size=64)
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"
# the session's one small fit (conftest's ``small_fit``): its model's registered name and its experiment
SMALL_FIT_MODEL = "au-detector-test"
SMALL_FIT_EXPERIMENT = "small-fit"


_EMPTY_STORE: Path | None = None


def new_sqlite_store(tracking_uri: str) -> None:
    """The SQLite store of ``tracking_uri`` (an absolute path), when it is not there yet, made as a
    copy of an empty store this process created once: MLflow migrates every new SQLite file, seconds
    each, and the tests make dozens. What creating a store does is the store-race test's."""
    global _EMPTY_STORE
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not tracking_uri.startswith("sqlite:///") or not db.is_absolute() or db.exists():
        return
    if _EMPTY_STORE is None or not _EMPTY_STORE.is_file():
        empty = Path(tempfile.mkdtemp(prefix="empty-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{empty}").search_experiments()
        _EMPTY_STORE = empty
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE, db)


def write_mlflow_yaml(path: Path, tracking_uri: str, experiment: str = "au-detect-test", **more) -> Path:
    """mlflow.yaml for the tests' runs; ``more`` adds settings (``registered_model_name=...``). A
    SQLite store it names is made now (:func:`new_sqlite_store`)."""
    settings = {"tracking_uri": tracking_uri, "experiment_name": experiment, "tags": {"suite": "tests"}, **more}
    if tracking_uri.startswith("sqlite:"):  # artifacts beside the database, not in ./mlruns of the cwd
        settings["artifact_location"] = str(path.parent / "artifacts")
        new_sqlite_store(tracking_uri)
    path.write_text(yaml.safe_dump(settings))
    return path


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for a block: float sums depend on how many threads
    share them, so a fit whose exact figures a test relies on runs on a known number."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def local_tracking(folder: Path, experiment: str = "tests") -> str:
    """Track into a SQLite store in ``folder``, artifacts beside it (not in ./mlruns of the cwd)."""
    uri = f"sqlite:///{folder}/mlflow.db"
    new_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    if MlflowClient(uri).get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=str(folder / "artifacts"))
    mlflow.set_experiment(experiment)
    return uri


def small_fit_args(synthau: Path, cache: Path, mlflow_yaml: Path, out: Path, epochs: int = 2,
                   train_batches: int = 3, onnx: bool = False) -> list[str]:
    """The demo config, shrunk: the session's 120-scene SynthAU at 64 px, a few batches."""
    return ["--config", str(DEMO), "--data.data_root", str(synthau), "--data.synth.num_images", "120",
            "--data.synth.seed", "3", "--data.cache_dir", str(cache), "--data.alignment.crop_size", "64",
            "--data.num_workers", "0", "--data.batch_size", "16", "--trainer.max_epochs", str(epochs),
            "--trainer.limit_train_batches", str(train_batches), "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.scheduler.init_args.T_max", str(epochs), "--mlflow", str(mlflow_yaml),
            "--mlflow_artifacts.sample_grid", "8", "--model.face_weights", "null", "--model.emotion_weights", "null",
            "--mlflow_artifacts.log_onnx", str(onnx).lower(), "--system_metrics.sampling_interval", "0.5"]


def check_run(tracking_uri: str, experiment: str, crop: int = 64) -> dict:
    """Everything a fit run must hold; returns the run's facts for further checks."""
    with tempfile.TemporaryDirectory() as tmp:  # the downloads (a checkpoint, the model) go with it
        return _check_run(tracking_uri, experiment, crop, tmp)


def _check_run(tracking_uri: str, experiment: str, crop: int, tmp: str) -> dict:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    params, metrics = run.data.params, run.data.metrics
    assert params["model.backbone"] == "resnet18" and params["data.balanced_sampling"] == "True"
    assert params["model.loss"] == "bce" and params["soft_threshold.criterion"] == "f1"
    # params are the config's (curated), not also Lightning's flattened hparams ("backbone", "_instantiator")
    assert "backbone" not in params and not [k for k in params if k.startswith("_") or "._" in k], sorted(params)
    assert run.data.tags["suite"] == "tests" and run.data.tags["au_detect.command"] == "fit"
    assert run.data.tags["weights.face"] == run.data.tags["weights.emotion"] == "random initialisation"
    assert 0 < metrics["val/f1_prior"] < 1
    for name in ("val/f1", "val/accuracy", "val/score", "val/f1_fitted", "val/score_fitted", "val/score_heldout", "train/loss",
                 "val/f1/AU12", "val/accuracy/AU25", "val/threshold/AU12"):
        assert name in metrics, name
    assert 0 <= metrics["val/f1_fitted"] <= 1
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "thresholds.json", "au_report.csv", "au_report.md", "best.json", "plots",
            "checkpoints", "data", "MODEL_CARD.md", "model_card.json"} <= files, files
    # the model card is the run's description too (shown on its page in the MLflow UI)
    assert run.data.tags["mlflow.note.content"].startswith("# AU detector: resnet18")
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/label_frequencies.png", "plots/pr_curves.png", "plots/sample_grid.png"} <= plots
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
    assert config["model"]["backbone"] == "resnet18" and config["data"]["alignment"]["crop_size"] == crop
    # the training priors, linked from the data, are recorded with the options
    assert len(config["model"]["au_priors"]) == 23 and params["model.au_priors"].startswith("[")
    thresholds = json.loads(Path(client.download_artifacts(run_id, "thresholds.json", tmp)).read_text())
    assert len(thresholds["thresholds"]) == 23 and "AU12" in thresholds["thresholds"]
    # which AUs had too few validation positives to fit, and why: what the card lists
    assert thresholds["min_positives"] == 10 and thresholds["fallback"] == "shrink"
    assert set(thresholds["fell_back"]) <= set(thresholds["thresholds"])
    assert all(thresholds["positives"][au] < 10 for au in thresholds["fell_back"])
    (ckpt,) = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    state = load_checkpoint(client.download_artifacts(run_id, ckpt, tmp))
    assert state["mlflow_run_id"] == run_id
    # the logged checkpoint is the weights without the optimizer's state (the local one keeps it, to resume)
    assert "optimizer_states" not in state and "lr_schedulers" not in state and state["state_dict"]
    # a readable name, the manifests as dataset inputs, the machine's curves
    assert re.fullmatch(r"demo-resnet18-bce-s0(-\d+)?", run.info.run_name), run.info.run_name
    inputs = {d.tags[0].value: d.dataset for d in client.get_run(run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    for stage, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        source = Path(json.loads(inputs[context].source)["uri"])
        assert source.name == f"{stage}.tsv" and inputs[context].digest == manifest_digest(source)
        profile = json.loads(inputs[context].profile)
        assert profile["rows"] == len(source.read_text().splitlines()) - 1
        assert stage == "test" or len(profile["cache_key"]) == 64  # the crops trained and validated on
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    # The logged model: images in, with a working AUNet and the best epoch's thresholds inside.
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", dst_path=tmp)
    assert model.metadata.signature.inputs.input_names() == ["image"]
    blank = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(blank, format="PNG")
    answer = model.predict(pd.DataFrame({"image": [blank.getvalue()]}))
    assert answer["status"].tolist() == ["no_face"] and "AU12_prob" in answer.columns
    predictor = model.unwrap_python_model().predictor
    assert predictor.alignment.crop_size == crop
    assert predictor.card == run.data.tags["mlflow.note.content"]  # the model carries its card
    net = predictor.net
    np.testing.assert_allclose(net.thresholds.numpy(), list(thresholds["thresholds"].values()), atol=1e-6)
    np.testing.assert_allclose(net.thresholds.numpy(), state["state_dict"]["net.thresholds"].numpy(), atol=1e-6)
    x = torch.randn(4, 3, crop, crop)
    with torch.no_grad():
        probs, decisions = net.predict(x)
    assert probs.shape == (4, 23) and decisions.dtype == torch.bool
    assert torch.equal(decisions, probs >= net.thresholds)
    report = Path(client.download_artifacts(run_id, "au_report.csv", tmp)).read_text().splitlines()
    assert report[0].startswith("AU,support,positives,threshold,f1@0.5,f1@fitted") and len(report) == 25
    if "val/intensity_icc" in metrics:  # trained with the intensity head: its figures of the reported epoch
        assert report[0].endswith(",icc,pcc,mae")
        mean = dict(zip(report[0].split(","), report[-1].split(",")))
        validations = len(client.get_metric_history(run_id, "val/f1"))
        for key in ("icc", "pcc", "mae"):
            logged = [round(m.value, 4) for m in client.get_metric_history(run_id, f"val/intensity_{key}")]
            if mean[key] == "":  # undefined at the reported epoch (e.g. ICC of constant intensities): not logged then
                assert len(logged) < validations, (key, logged, validations)
            else:
                assert float(mean[key]) in logged, (key, mean[key], logged)
    return {"run_id": run_id, "metrics": metrics, "client": client}


def reference_box_crop(image: np.ndarray, box, crop_size: int, face_scale: float) -> np.ndarray:
    """A face box's crop as the alignment's ``box`` method defines it, made apart from the code that
    makes crops: the box squared around its center, widened to ``side / face_scale``, that square
    resized to ``crop_size`` by PIL (bilinear, antialiased), the image's edge pixels repeated beyond it."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    side = max(x1 - x0, y1 - y0, 1.0) / face_scale
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pad = int(np.ceil(side)) + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    square = (cx - side / 2 + pad, cy - side / 2 + pad, cx + side / 2 + pad, cy + side / 2 + pad)
    return np.asarray(Image.fromarray(padded).resize((crop_size, crop_size), Image.BILINEAR, box=square))


def assert_crop_of_box(crop: np.ndarray, image: np.ndarray, box, crop_size: int, face_scale: float,
                       tolerance: float) -> None:
    """``crop`` is the box's crop (:func:`reference_box_crop`): within ``tolerance`` grey levels on
    average (two resamplers differ a little), and less than half as far from it as from the crop of
    the same box moved by one crop pixel in any direction or scaled by 5 % (what a slip of center or
    size makes)."""
    def distance(b) -> float:
        return float(np.abs(crop.astype(float) - reference_box_crop(image, b, crop_size, face_scale)).mean())

    x0, y0, x1, y1 = (float(v) for v in box[:4])
    pixel = max(x1 - x0, y1 - y0, 1.0) / face_scale / crop_size  # one crop pixel, in image pixels
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    right = distance(box)
    slips = [[x0 + dx, y0 + dy, x1 + dx, y1 + dy] for dx, dy in ((pixel, 0), (-pixel, 0), (0, pixel), (0, -pixel))]
    slips += [[cx - half * f, cy - half * f, cx + half * f, cy + half * f] for f in (0.95, 1.05)]
    nearest_slip = min(distance(b) for b in slips)
    assert right < min(tolerance, nearest_slip / 2), (right, nearest_slip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_untrained_model(folder: Path, experiment: str, spec: dict) -> tuple[str, str]:
    """A small detector with random weights (seed 0) logged as an MLflow model into a SQLite store in
    ``folder``: ``(tracking URI, runs:/<id>/model)``, for tests of what a server reads and holds."""
    from datamodules.alignment.align import AlignmentSettings
    from lightning_modules.au_detector import AUNet
    from lightning_modules.serving.predictor import AUPredictor
    from lightning_modules.serving.pyfunc import log_model

    uri = local_tracking(folder, experiment)
    torch.manual_seed(0)
    predictor = AUPredictor(AUNet(**{k: spec[k] for k in ("aus", "backbone", "branches")}),
                            AlignmentSettings(crop_size=32), spec, device="cpu")
    with mlflow.start_run() as run:
        log_model(predictor)
    return uri, f"runs:/{run.info.run_id}/model"


@contextmanager
def served_model(model_uri: str, tracking_uri: str, cwd: Path, command=None,
                 preexec_fn=None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server of a logged model on 127.0.0.1, answering ``/ping``: yields its ``/invocations``
    URL and the server process; stopped on exit. ``command(port)`` is its command line (default
    ``mlflow models serve``). Its output goes to a file in ``cwd``, not a pipe: a pipe nobody reads
    fills up and stalls the server."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the server starts uvicorn from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    argv = command(port) if command else [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
                                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = Path(cwd) / f"server-{port}.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/invocations", server
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


VIDEO_AUS = [1, 2, 12, 25]


def video_predictor() -> AUPredictor:
    """Random weights (seed 0) on ``VIDEO_AUS``, thresholds at 0.5 but head biases apart so that some
    AUs are on: for tests of people, signals over time and rows, where the decisions are not the point."""
    torch.manual_seed(0)
    net = AUNet(VIDEO_AUS, "resnet18", ["face"]).eval()
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.8, 0.0, 0.05, -0.8]))
    spec = {"aus": VIDEO_AUS, "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
    return AUPredictor(net, AlignmentSettings(crop_size=64, min_face_size=20), spec, device="cpu")


def interrupted_after(predict_batches, n: int):
    """``predict_batches`` that raises KeyboardInterrupt (Ctrl-C) once ``n`` batches have gone through."""
    def interrupted(frames, *args, **kwargs):
        for k, item in enumerate(predict_batches(frames, *args, **kwargs)):
            if k == n:
                raise KeyboardInterrupt
            yield item

    return interrupted
