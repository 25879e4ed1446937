"""Files, requests and inputs from people the project does not know: checkpoints that try to run
code, requests that name server files or carry huge photos, inputs that cannot be read."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.alignment.align import AlignmentSettings
from experiments.cli import main
from lightning_modules.au_detector import AUNet
from lightning_modules.backbones import WeightsError
from lightning_modules.checkpoints import CheckpointError
from lightning_modules.serving.predictor import AUPredictor

from .training_helpers import DEMO, local_tracking, log_untrained_model, served_model, write_mlflow_yaml

AU_DETECT = str(Path(sys.executable).with_name("au-detect"))
SPEC = {"aus": [1, 2, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}


class _Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, content: dict | None = None) -> Path:
    """A checkpoint of the usual shape (state dict, hyperparameters) that also carries a payload."""
    content = dict(content or {"state_dict": {"net.thresholds": torch.zeros(3)}, "hyper_parameters": {}})
    content["payload"] = _Payload(marker)
    torch.save(content, path)
    return path


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_by_every_entry_point(synthau, tmp_path, capsys):
    """predict --model, --ckpt_path of fit/validate/test and of pretraining, branch weights, a
    predictor folder and an MLflow model whose weights file was swapped: the payload never runs,
    the error names the file."""
    marker = tmp_path / "MARKER"
    evil = _crafted(tmp_path / "evil.ckpt", marker)
    mlflow_yaml = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db")
    # the session's SynthAU: the model is built once the training manifest's label rates are read
    common = ["--config", str(DEMO), "--mlflow", str(mlflow_yaml), "--data.data_root", str(synthau),
              "--data.synth.num_images", "120", "--data.synth.seed", "3", "--data.cache_dir", str(tmp_path / "cache")]

    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused.*GLOBAL posix\.system"):
        main(["predict", "--model", str(evil), "--input", str(tmp_path)])
    for command in ("fit", "validate", "test"):
        with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused"):
            main([command, *common, "--ckpt_path", str(evil)])
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused"):
        main(["pretrain-face", "fit", "--config", str(DEMO.with_name("pretrain_face_demo.yaml")),
              "--mlflow", str(mlflow_yaml), "--ckpt_path", str(evil)])
    with pytest.raises(WeightsError, match=r"backbone weights .*evil\.ckpt: refused"):
        main(["fit", *common, "--model.face_weights", str(evil)])

    # The MLflow model's own weights: a predictor folder, and a logged model, with weights.pt swapped.
    predictor = AUPredictor(AUNet(**{k: SPEC[k] for k in ("aus", "backbone", "branches")}),
                            AlignmentSettings(crop_size=32), SPEC, device="cpu")
    folder = predictor.save(tmp_path / "predictor")
    _crafted(folder / "weights.pt", marker, dict(predictor.net.state_dict()))
    with pytest.raises(CheckpointError, match=r"predictor weights .*weights\.pt: refused"):
        AUPredictor.from_dir(folder)
    from lightning_modules.serving.pyfunc import log_model

    local_tracking(tmp_path / "models")
    with mlflow.start_run():
        info = log_model(predictor)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded")))
    _crafted(local / "artifacts" / "predictor" / "weights.pt", marker, dict(predictor.net.state_dict()))
    with pytest.raises(Exception, match=r"weights\.pt: refused"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()

    # From the shell: the message, not a traceback, and a failing exit status.
    done = subprocess.run([AU_DETECT, "predict", "--model", str(evil), "--input", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"au-detect: error: checkpoint {evil}: refused" in done.stderr
    assert not marker.exists()


def test_damaged_checkpoints_name_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"net.thresholds": torch.zeros(3)}}, good)
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    for name in ("cut.ckpt", "text.ckpt"):
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable torch checkpoint"):
            AUPredictor.load(str(tmp_path / name), "cpu")


# -- the served model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``mlflow models serve`` of a small logged detector (random weights: these tests are about
    what the server reads and holds, not about its answers), with its process tree's pids."""
    tmp = tmp_path_factory.mktemp("served")
    uri, model = log_untrained_model(tmp, "served", SPEC)
    with served_model(model, uri, tmp) as (url, server):
        yield {"url": url, "pid": server.pid, "tmp": tmp}


def _post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _json_body(values: list) -> bytes:
    return json.dumps({"dataframe_records": [{"image": v} for v in values]}).encode()


@pytest.mark.slow
def test_served_model_never_reads_a_server_file(served, synthau, tmp_path):
    """A path sent instead of image bytes: the server answers the same whether the file exists
    (a face photo, which would give face rows if it were read) or not."""
    photo = tmp_path / "face.jpg"
    shutil.copy(next((synthau / "images").rglob("*.jpg")), photo)
    missing = tmp_path / "fack.jpg"  # same length, no such file
    assert len(str(photo)) == len(str(missing)) and not missing.exists()
    answers = {}
    for name, path in (("existing", photo), ("missing", missing)):
        json_answer = _post(served["url"], _json_body([str(path)]), "application/json")
        csv_answer = _post(served["url"], f"image\n{path}\n".encode(), "text/csv")
        answers[name] = (json_answer, csv_answer)
    strip = lambda answer: (answer[0], answer[1].replace(str(photo), "P").replace(str(missing), "P"))  # noqa: E731
    assert [strip(a) for a in answers["existing"]] == [strip(a) for a in answers["missing"]]
    (json_status, json_text), (csv_status, csv_text) = answers["existing"]
    # MLflow decodes a binary column's JSON text as base64 leniently (characters outside the
    # alphabet dropped): depending on the path's length it refuses it (HTTP 400) or hands over
    # bytes that are no image. Either way nothing is read from the server's disk.
    assert json_status in (200, 400), json_text
    if json_status == 200:
        (row,) = json.loads(json_text)["predictions"]
        assert row["status"] == "unreadable" and row["face"] is None
    assert csv_status == 200
    (row,) = json.loads(csv_text)["predictions"]
    assert row["status"] == "unreadable" and "never a path" in row["message"] and row["face"] is None
    # The same photo sent as bytes is read: the refusal above was not for want of a face.
    status, text = _post(served["url"], _json_body([base64.b64encode(photo.read_bytes()).decode()]),
                         "application/json")
    assert status == 200 and json.loads(text)["predictions"][0]["status"] == "ok"


def _tree(pid: int) -> list[int]:
    """A process and its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            found.append(p)
        except OSError:
            continue
    return found


def _peak_rss(pids: list[int], reset: bool = False) -> int:
    """Highest peak resident memory (VmHWM, bytes) among processes; ``reset`` starts a new peak
    at the current use (Linux: ``echo 5 > /proc/<pid>/clear_refs``)."""
    peak = 0
    for p in pids:
        try:
            if reset:
                Path(f"/proc/{p}/clear_refs").write_text("5")
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        peak = max(peak, next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")))
    return peak


@pytest.mark.slow
def test_served_model_memory_does_not_grow_with_the_rows(served, synthau):
    """Requests of 2 and of 8 photos of 36 MP: the server's peak memory grows by less than one
    photo's decoded size (108 MB), because rows are decoded a chunk at a time; a request past the
    limits is refused whole with a message naming the limit."""
    scene = cv2.imread(str(next((synthau / "images").rglob("*.jpg"))))
    big = cv2.resize(scene, (6912, 5184), interpolation=cv2.INTER_LINEAR)  # 35.8 MP
    ok, jpeg = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 80])
    encoded = base64.b64encode(jpeg.tobytes()).decode()
    decoded_size = big.size  # bytes of one decoded RGB photo
    _post(served["url"], _json_body([encoded]), "application/json")  # warm up: models, threads, arenas
    pids = _tree(served["pid"])
    peaks = {}
    for n in (2, 8):
        _peak_rss(pids, reset=True)
        status, text = _post(served["url"], _json_body([encoded] * n), "application/json")
        assert status == 200, text[:500]
        assert len(json.loads(text)["predictions"]) >= n
        peaks[n] = _peak_rss(pids)
    print(f"\npeak RSS after 2 photos {peaks[2] / 1e6:.0f} MB, after 8 {peaks[8] / 1e6:.0f} MB; "
          f"one photo decoded {decoded_size / 1e6:.0f} MB; JPEG {len(jpeg) / 1e6:.1f} MB")
    assert peaks[8] - peaks[2] < decoded_size
    status, text = _post(served["url"], _json_body([encoded] * 12), "application/json")  # 430 MP
    assert status == 400 and "max_request_pixels" in text


def test_request_limits_and_rows(tmp_path):
    """The pyfunc model in-process: each kind of bad row gets its status, the request limits refuse
    a request whole, and limits come from the model's config."""
    from mlflow.exceptions import MlflowException

    from lightning_modules.serving.pyfunc import log_model

    local_tracking(tmp_path)
    predictor = AUPredictor(AUNet(**{k: SPEC[k] for k in ("aus", "backbone", "branches")}),
                            AlignmentSettings(crop_size=32), SPEC, device="cpu")
    with mlflow.start_run():
        info = log_model(predictor)
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 30), "gray").save(png, format="PNG")
    good = png.getvalue()
    model = mlflow.pyfunc.load_model(info.model_uri)
    rows = model.predict(pd.DataFrame({"image": [good, base64.b64encode(good).decode(), "/etc/hostname", b"",
                                                 b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"]}))
    assert rows["source"].tolist() == [0, 1, 2, 3, 4]
    assert rows["status"].tolist() == ["no_face", "no_face", "unreadable", "empty", "unreadable"]
    assert "never a path" in rows["message"][2] and "allowed format" in rows["message"][4]
    small = mlflow.pyfunc.load_model(info.model_uri, model_config={"max_rows": 2, "max_request_pixels": 2000})
    with pytest.raises(MlflowException, match=r"3 images in one request; at most 2 \(max_rows\)"):
        small.predict(pd.DataFrame({"image": [good] * 3}))
    with pytest.raises(MlflowException, match=r"max_request_pixels"):
        small.predict(pd.DataFrame({"image": [good] * 2}))  # 2 x 1,200 pixels


# -- inputs of au-detect predict -------------------------------------------------------------------


def test_inputs_that_cannot_be_read_are_rows(tmp_path):
    """A FIFO named like a photo (would block a reader forever), a folder named like one, a
    dangling link, an empty list, a list that is not UTF-8 text: each gets a row, nothing hangs."""
    from datamodules.io.sources import expand, frames

    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.jpg")
    (folder / "dir.jpg").mkdir()
    (folder / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    cv2.imwrite(str(folder / "fine.png"), np.full((20, 30, 3), 90, np.uint8))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    (tmp_path / "binary.tsv").write_bytes(b"\x00\x01\x02image\n")
    inputs = [str(folder), str(tmp_path / "empty.txt"), str(tmp_path / "latin1.txt"), str(tmp_path / "binary.tsv")]
    start = time.time()
    got = {Path(f.source.path).name: (f.error.status if f.error else "decoded", str(f.error or ""))
           for f in frames(expand(inputs))}
    assert time.time() - start < 30
    assert got["pipe.jpg"][0] == "unreadable" and "not a regular file" in got["pipe.jpg"][1]
    assert got["link.jpg"][0] == "missing"
    assert got["fine.png"][0] == "decoded"
    assert got["empty.txt"][0] == "empty" and "names no image" in got["empty.txt"][1]
    assert got["latin1.txt"][0] == "unreadable" and "not UTF-8" in got["latin1.txt"][1]
    assert got["binary.tsv"][0] == "unreadable" and "binary.tsv" in got["binary.tsv"][1]
    assert "dir.jpg" not in got  # a folder is walked, not taken for an image


def test_unreadable_folder_gets_a_row(tmp_path):
    """A folder its user may not list. Root lists anything, so as root the listing runs without
    the capabilities that bypass file permissions (util-linux's setpriv), as any user would."""
    place = tmp_path
    try:
        (place / "open").mkdir()
        (place / "closed").mkdir()
        cv2.imwrite(str(place / "open" / "a.png"), np.zeros((8, 8, 3), np.uint8))
        cv2.imwrite(str(place / "closed" / "b.png"), np.zeros((8, 8, 3), np.uint8))
        os.chmod(place / "closed", 0)
        code = ("import json, sys; from datamodules.io.sources import expand; "
                "print(json.dumps([(s.path, s.kind, s.error and s.error.status, str(s.error or '')) "
                "for s in expand([sys.argv[1]])]))")
        command = [sys.executable, "-c", code, str(place)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no way to be refused a listing")
            caps = "-dac_override,-dac_read_search"
            command = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        sources = json.loads(done.stdout)
        assert [(Path(p).name, k, s) for p, k, s, _ in sources] == [("closed", "folder", "unreadable"),
                                                                      ("a.png", "image", None)]
        assert "cannot list the folder" in sources[0][3] and "Permission denied" in sources[0][3]
    finally:
        os.chmod(place / "closed", 0o755)


def test_annotated_copies_keep_their_folders(tmp_path):
    """a/x.jpg and b/x.jpg (and x.png beside x.jpg) get annotated copies of their own."""
    from experiments.predict import run

    for sub, name, value in (("a", "x.jpg", 40), ("b", "x.jpg", 120), ("b", "x.png", 200)):
        (tmp_path / "in" / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "in" / sub / name), np.full((48, 64, 3), value, np.uint8))
    predictor = AUPredictor(AUNet(**{k: SPEC[k] for k in ("aus", "backbone", "branches")}),
                            AlignmentSettings(crop_size=32), SPEC, device="cpu")
    summary = run(predictor, [str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b")], str(tmp_path / "out.csv"),
                  annotate_dir=str(tmp_path / "annotated"), progress=False)
    assert summary.frames == 3
    written = sorted(str(p.relative_to(tmp_path / "annotated")) for p in (tmp_path / "annotated").rglob("*.jpg"))
    assert written == ["a/x.jpg", "b/x.jpg", "b/x.png.jpg"]
    means = {w: int(cv2.imread(str(tmp_path / "annotated" / w)).mean().round()) for w in written}
    assert means == {"a/x.jpg": 40, "b/x.jpg": 120, "b/x.png.jpg": 200}  # each copy of its own source
    with open(tmp_path / "out.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
