"""``au-detect predict`` and the MLflow model: every face of real SynthAU scenes, videos, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lightning_modules.checkpoints import load_checkpoint
from datamodules.alignment.align import box_iou
from experiments.cli import main
from datamodules.io.images import InputError, read_image
from experiments.predict import run
from lightning_modules.serving.predictor import AUPredictor, columns

from .training_helpers import SMALL_FIT_MODEL, assert_crop_of_box


@pytest.fixture(scope="module")
def trained(small_fit, tmp_path_factory):
    """The session's small detector (trained through ``au-detect fit``, registered, tested), its
    thresholds spread out so that decisions at them differ from decisions at 0.5."""
    tmp = tmp_path_factory.mktemp("trained")
    state = load_checkpoint(small_fit["best"])
    thresholds = torch.linspace(0.3, 0.7, len(state["state_dict"]["net.thresholds"]))
    state["state_dict"]["net.thresholds"] = thresholds
    ckpt = tmp / "spread.ckpt"
    torch.save(state, ckpt)
    return {**small_fit, "ckpt": str(ckpt), "thresholds": thresholds.numpy(), "tmp": tmp}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def au_names(rows: list[dict]) -> list[str]:
    return [c[:-5] for c in rows[0] if c.endswith("_prob")]


def test_folder_of_scenes_one_row_per_face_near_the_truth(synthau, truth, trained, tmp_path):
    """Scenes with two people: every face found, boxes where SynthAU drew them, decisions at the
    checkpoint's thresholds, probabilities equal to the network on the training crop."""
    pairs = [ref for ref, r in truth.items()
             if len(r["faces"]) == 2 and min(f["box"][2] - f["box"][0] for f in r["faces"]) >= 60][:6]
    singles = [ref for ref, r in truth.items() if len(r["faces"]) == 1][:3]
    assert len(pairs) >= 3
    folder = tmp_path / "photos"
    for i, ref in enumerate(pairs + singles):
        target = folder / ("pairs" if ref in pairs else "singles") / f"{i:02d}_{Path(ref).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthau / ref, target)
    out = tmp_path / "aus.csv"
    main(["predict", "--model", trained["ckpt"], "--input", str(folder), "--out", str(out), "--mlflow",
          trained["mlflow_yaml"]])
    rows = read_rows(out)
    loaded = AUPredictor.load(trained["ckpt"], "cpu")
    assert loaded.has_intensity  # SynthAU's manifests carry intensities: the fit trained the head
    assert list(rows[0]) == columns(loaded.aus, intensity=True, person=True)
    assert all(r["person"] == "" for r in rows)  # photos: no person across frames
    for r in rows:  # intensity and occurrence never disagree
        for au in loaded.aus:
            if r["status"] == "ok":
                level, decided = float(r[f"AU{au}_intensity"]), int(r[f"AU{au}"])
                assert (level == 0) if not decided else 1 <= level <= 5
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    assert len(by_source) == len(pairs) + len(singles)  # the subfolders were walked
    for source, found in by_source.items():
        ref = next(ref for ref in pairs + singles if source.endswith(Path(ref).name))
        true_boxes = [f["box"] for f in truth[ref]["faces"]]
        assert all(r["status"] == "ok" for r in found), found
        assert len(found) == len(true_boxes), (source, len(found), len(true_boxes))
        assert [r["face"] for r in found] == [str(i) for i in range(len(found))]
        for r in found:
            box = [float(r[k]) for k in ("x0", "y0", "x1", "y1")]
            assert max(box_iou(box, t) for t in true_boxes) > 0.5, (source, box, true_boxes)
            assert 0.5 < float(r["confidence"]) <= 1
        areas = [(float(r["x1"]) - float(r["x0"])) * (float(r["y1"]) - float(r["y0"])) for r in found]
        assert areas == sorted(areas, reverse=True)  # largest first
    names = au_names(rows)
    probs = np.array([[float(r[f"{n}_prob"]) for n in names] for r in rows])
    decisions = np.array([[int(r[n]) for n in names] for r in rows])
    np.testing.assert_array_equal(decisions, (probs >= trained["thresholds"] - 1e-6).astype(int))
    assert (decisions != (probs >= 0.5)).any()  # the spread thresholds, not 0.5, decided

    # The largest face of a training scene is aligned exactly as training aligned it: its
    # probabilities are the network's on the cached training crop.
    from datamodules.alignment.crop_cache import AlignedSplit

    predictor = AUPredictor.load(trained["ckpt"], "cpu")
    train_cache = next(p for p in Path(trained["cache"]).iterdir() if p.name.startswith("train-"))
    split = AlignedSplit.open(train_cache)
    train_refs = {s["image"]: i for i, s in enumerate(split.report["samples"]) if s["status"] == "face"}
    checked = 0
    for source, found in by_source.items():
        ref = next(ref for ref in pairs + singles if source.endswith(Path(ref).name))
        if ref in train_refs:
            expected, _ = predictor.classify(np.asarray(split.crops[train_refs[ref]])[None])
            got = np.array([float(found[0][f"{n}_prob"]) for n in names])
            np.testing.assert_allclose(got, expected[0], atol=2e-4)
            checked += 1
    assert checked >= 2


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_frames_times_and_bounded_memory(synthau, truth, trained, tmp_path):
    scenes = [read_image(str(synthau / ref)) for ref in list(truth)[:4]]
    short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
    _write_video(short, [scenes[(i // 10) % 4] for i in range(40)], fps=10)
    _write_video(long, [scenes[(i // 10) % 4] for i in range(160)], fps=10)
    predictor = AUPredictor.load(trained["ckpt"], "cpu")

    peaks = {}
    for name, video in (("short", short), ("long", long)):
        tracemalloc.start()
        summary = run(predictor, [str(video)], str(tmp_path / f"{name}.csv"), every=4, batch_frames=8,
                      progress=False, annotate_dir=str(tmp_path / "annotated"))
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary.frames == {"short": 10, "long": 40}[name]
    from experiments.annotation import video_codec

    annotated = cv2.VideoCapture(str(tmp_path / "annotated" / f"short{video_codec().suffix}"))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 10 and annotated.get(cv2.CAP_PROP_FPS) == pytest.approx(2.5)
    annotated.release()
    rows = read_rows(tmp_path / "long.csv")
    frames = sorted({int(r["frame"]) for r in rows})
    assert frames == list(range(0, 160, 4))
    for r in rows:
        assert float(r["time_s"]) == pytest.approx(int(r["frame"]) / 10, abs=1e-3)
    assert {r["status"] for r in rows} <= {"ok", "no_face"}
    assert sum(r["status"] == "ok" for r in rows) >= 36  # every sampled frame shows a face
    # every face of a video has a person id (counted from 0 in order of appearance)
    people = [int(r["person"]) for r in rows if r["status"] == "ok"]
    assert people[0] == 0 and all(r["person"] == "" for r in rows if r["status"] != "ok")
    # Four times the frames, the same peak: frames stream through a batch at a time.
    assert peaks["long"] < 1.5 * peaks["short"], peaks


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (a decompression bomb's shape), 100 bytes in all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_bad_inputs_get_status_rows_and_good_ones_go_on(synthau, truth, trained, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [ref for ref, r in truth.items() if len(r["faces"]) == 1][:2]
    for i, ref in enumerate(good):
        shutil.copy(synthau / ref, folder / f"good{i}.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    data = (synthau / good[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    cv2.imwrite(str(folder / "blank.png"), np.full((240, 320, 3), 127, np.uint8))
    _png_header_only(folder / "bomb.png", 30000, 30000)
    (folder / "broken.mp4").write_bytes(os.urandom(4096))
    out = tmp_path / "mixed.csv"
    main(["predict", "--model", trained["ckpt"], "--input", str(folder), str(tmp_path / "gone.jpg"),
          "--out", str(out), "--annotate", str(tmp_path / "annotated")])
    rows = read_rows(out)
    status = {Path(r["source"]).name: (r["status"], r["message"]) for r in rows}
    assert status["empty.jpg"][0] == "empty" and "0 bytes" in status["empty.jpg"][1]
    assert status["notes.jpg"][0] == "unreadable" and "notes.jpg" in status["notes.jpg"][1]
    assert status["truncated.jpg"][0] == "unreadable"
    assert status["blank.png"][0] == "no_face"
    assert status["bomb.png"][0] == "too_large" and "900000000 pixels" in status["bomb.png"][1]
    assert status["broken.mp4"][0] == "broken_video"
    assert status["gone.jpg"][0] == "missing"
    assert status["good0.jpg"][0] == status["good1.jpg"][0] == "ok"
    assert all(r["AU12_prob"] for r in rows if r["status"] == "ok")
    # annotated copies of what was decoded, boxes drawn (the pixels differ from the original's)
    annotated = sorted(p.name for p in (tmp_path / "annotated").iterdir())
    assert annotated == ["blank.jpg", "good0.jpg", "good1.jpg"]
    drawn = cv2.imread(str(tmp_path / "annotated" / "good0.jpg"))
    assert drawn.shape == cv2.imread(str(folder / "good0.jpg")).shape
    assert np.abs(drawn.astype(int) - cv2.imread(str(folder / "good0.jpg")).astype(int)).max() > 100
    _png_header_only(folder / "big.png", 8000, 8000)  # under PIL's own limit, over ours
    with pytest.raises(InputError, match="64 MP is over the limit of 50 MP"):
        read_image(str(folder / "big.png"))


def test_inference_copy_folds_batch_norm_and_answers_as_the_net(tmp_path):
    """The predictor's inference copy (batch norms folded into the convolutions, channels-last):
    no batch norm left, the same probabilities as the trained network (1e-5), decisions at the
    net's own thresholds even when they change after the predictor was built."""
    from datamodules.alignment.align import AlignmentSettings
    from lightning_modules.au_detector import AUNet
    from lightning_modules.serving.predictor import inference_copy

    torch.manual_seed(0)
    net = AUNet(aus=[1, 2, 4, 12], backbone="resnet18", branches=["face", "emotion"]).eval()
    for m in net.modules():  # statistics far from the identity that a fresh batch norm holds
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    spec = {"aus": [1, 2, 4, 12], "backbone": "resnet18", "branches": ["face", "emotion"], "aux_heads": False}
    predictor = AUPredictor(net, AlignmentSettings(crop_size=64), spec, device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor._inference_net.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 40  # the net itself untouched
    crops = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        want = net.predict(predictor.normalize(torch.from_numpy(crops).permute(0, 3, 1, 2)))[0].numpy()
    probs, decisions = predictor.classify(crops)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    net.thresholds.copy_(torch.tensor([0.1, 0.9, 0.5, 0.3]))
    _, decisions = predictor.classify(crops)
    np.testing.assert_array_equal(decisions, probs >= np.array([0.1, 0.9, 0.5, 0.3], np.float32))
    # what is saved is the trained net's state (loadable into a fresh AUNet), not the folded copy's
    saved = torch.load(predictor.save(tmp_path / "predictor") / "weights.pt", weights_only=True)
    assert saved.keys() == net.state_dict().keys() != inference_copy(net).state_dict().keys()


def test_large_photos_are_held_by_pixels_not_only_by_count(tmp_path, monkeypatch):
    """With a 4 MP budget, 30 photos of 1 MP go through in batches of 4 frames and the frames
    decoded at once stay near two budgets (tracemalloc peak), where batches of 16 with 20 decoded
    ahead would hold 36 frames (108 MB)."""
    from datamodules.alignment.align import AlignmentSettings
    from lightning_modules.au_detector import AUNet

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(30):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((1000, 1000, 3), 8 * i, np.uint8))
    spec = {"aus": [1, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
    predictor = AUPredictor(AUNet(aus=[1, 12], backbone="resnet18", branches=["face"]),
                            AlignmentSettings(crop_size=32), spec, device="cpu")
    sizes = []
    detect = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda frames, copies, *rest: (sizes.append(len(frames)), detect(frames, copies, *rest))[1])
    tracemalloc.start()
    try:
        summary = run(predictor, [str(folder)], str(tmp_path / "out.csv"), batch_frames=16, progress=False,
                      batch_pixels=4_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.frames == 30 and summary.statuses["no_face"] == 30
    assert sizes == [4] * 7 + [2]
    print(f"\npeak {peak / 1e6:.0f} MB for frames of 3 MB")
    assert peak < 20 * 3_000_000


def test_read_image_turns_by_exif_and_gives_rgb(tmp_path):
    """The one decoder of training and prediction: EXIF orientation applied, any mode to RGB."""
    from PIL import Image

    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # 2 rows, 3 columns, all distinct
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation 6: shown turned 90 degrees clockwise
    im.save(tmp_path / "turned.png", exif=exif)
    turned = read_image(str(tmp_path / "turned.png"))
    np.testing.assert_array_equal(turned, np.rot90(pixels, k=-1))  # hand reference: clockwise turn
    assert turned.shape == (3, 2, 3)
    im.save(tmp_path / "upright.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "upright.png")), pixels)
    grey = np.array([[0, 128, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, 2))
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.gif")
    assert read_image((tmp_path / "palette.gif").read_bytes()).shape == (2, 3, 3)


def test_inputs_expand_from_folders_globs_and_manifests(tmp_path):
    from datamodules.io.sources import expand

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.jpg", "a/b/2.png", "a/b/clip.mp4", "a/notes.txt.bak", "a/.hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.tsv").write_text("AU12\timage\n1\ta/1.jpg\n0\t/abs/3.jpg\n")
    sources = expand([str(tmp_path / "a"), str(tmp_path / "a" / "**" / "*.png"), str(tmp_path / "list.tsv"),
                      str(tmp_path / "none*.jpg")])
    got = [(Path(s.path).name, s.kind, s.error.status if s.error else None) for s in sources]
    assert got == [("1.jpg", "image", None), ("2.png", "image", None), ("clip.mp4", "video", None),
                   ("2.png", "image", None), ("1.jpg", "image", None), ("3.jpg", "image", None),
                   ("none*.jpg", "image", "missing")]
    assert sources[4].path == str(tmp_path / "a" / "1.jpg")  # manifest rows resolve from its folder


def test_mixed_precision_stays_near_float32(synthau, truth, trained, tmp_path, capsys):
    """``--precision bf16-mixed`` runs the network under autocast: same faces, probabilities within
    bfloat16's rounding of float32's; an unknown precision is refused by the option's name."""
    ref = next(ref for ref, r in truth.items() if len(r["faces"]) == 2)
    image = tmp_path / "scene.jpg"
    shutil.copy(synthau / ref, image)
    rows = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / f"{precision}.csv"
        main(["predict", "--model", trained["ckpt"], "--input", str(image), "--out", str(out),
              "--precision", precision])
        assert f"({precision}, torch)" in capsys.readouterr().out
        rows[precision] = read_rows(out)
    full, mixed = rows["32-true"], rows["bf16-mixed"]
    assert len(full) == len(mixed) == 2
    names = au_names(full)
    p32 = np.array([[float(r[f"{n}_prob"]) for n in names] for r in full])
    p16 = np.array([[float(r[f"{n}_prob"]) for n in names] for r in mixed])
    assert 0 < np.abs(p32 - p16).max() < 0.02  # computed in bfloat16 indeed, and close
    assert [r["x0"] for r in full] == [r["x0"] for r in mixed]  # detection stays float32
    with pytest.raises(SystemExit):
        main(["predict", "--model", trained["ckpt"], "--input", str(image), "--precision", "fp8"])
    assert "precision" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["box", "center"])
def test_a_box_model_classifies_box_crops_and_a_center_model_is_refused(synthau, method):
    """A model trained on box crops predicts on the same crops; one trained on whole-scene
    center crops cannot be run on detected faces."""
    from datamodules.alignment.align import AlignmentSettings
    from lightning_modules.au_detector import AUNet

    spec = {"aus": [1, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
    settings = AlignmentSettings(crop_size=48, method=method)
    if method == "center":
        with pytest.raises(ValueError, match="center crops"):
            AUPredictor(AUNet(aus=[1, 12], backbone="resnet18", branches=["face"]), settings, spec, device="cpu")
        return
    predictor = AUPredictor(AUNet(aus=[1, 12], backbone="resnet18", branches=["face"]), settings, spec, device="cpu")
    seen = []
    classify = predictor.classify_faces
    predictor.classify_faces = lambda crops, embed=False: (seen.append(crops), classify(crops, embed))[1]
    frame = read_image(synthau / "images" / "val" / sorted(os.listdir(synthau / "images" / "val"))[0])
    (faces,) = predictor.predict([frame])
    assert faces and len(seen[0]) == len(faces)
    for crop, face in zip(seen[0], faces):
        assert_crop_of_box(crop, frame, face.box, 48, settings.face_scale, tolerance=3.0)


def test_model_card_travels_with_the_model_and_gains_the_test(trained, capsys):
    """Every logged model carries MODEL_CARD.md: in the model, the checkpoint, the run's description
    and the registered version; `predict --describe` prints it; `au-detect test` adds its figures."""
    from experiments.predict import predict

    client, run_id = trained["client"], trained["run_id"]
    before = trained["before_test"]  # as the fit left it
    card = before["card"]  # the run's description in the UI
    assert card.startswith("# AU detector: resnet18") and "SynthAU only: not for real faces" in card
    assert "Not tested yet" in card
    # 120 scenes: the rarest AUs have only a few validation positives: shrunk toward 0.5 (none: 0.5)
    (trained["tmp"] / "card").mkdir(exist_ok=True)
    facts = json.loads(Path(client.download_artifacts(run_id, "model_card.json", str(trained["tmp"] / "card"))).read_text())
    fell = [a for a in facts["aus"] if a["fell_back"]]
    assert fell and all(a["val_positives"] < 10 for a in fell)
    assert all(a["threshold"] == 0.5 for a in fell if a["val_positives"] == 0)
    assert all(f"fallback: {a['fell_back']}" in card for a in fell)
    assert len([line for line in card.splitlines() if line.startswith("| AU")]) == 23 + 1  # header + 23 AUs
    assert before["candidate"].run_id == run_id and before["candidate"].description == card
    assert before["described"].strip() == card.strip()
    predict(model=trained["best"], describe=True)  # the checkpoint keeps the fit's card
    assert capsys.readouterr().out.strip() == card.strip()

    # the test continued the run: the card now has the test's figures, wherever it is kept
    f1 = round(float(trained["test"].trainer.callback_metrics["test/f1"]), 4)  # the card's facts keep 4 digits
    tested = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert f"test: test/f1 {f1:.3f}" in tested and "Not tested yet" not in tested and "test F1 |" in tested
    assert facts["test"]["test/f1"] == f1  # the run's facts file too
    predict(model=f"runs:/{run_id}/model", describe=True, mlflow=trained["mlflow_yaml"])
    assert capsys.readouterr().out.strip() == tested.strip()
    (version,) = [v for v in client.search_model_versions(f"name = '{SMALL_FIT_MODEL}'") if v.run_id == run_id]
    assert version.description == tested
