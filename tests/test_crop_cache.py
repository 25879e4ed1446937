"""The crop cache: contents, keys, bad images, resuming after a kill, a second aligner, damage found."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.alignment import crop_cache
from datamodules.alignment.align import AlignmentSettings, FaceDetector, box_iou, center_crop
from datamodules.alignment.crop_cache import NO_FACE, AlignedSplit, align_manifest, cache_key
from datamodules.io.images import read_image
from datamodules.io.manifest import read_manifest

from .training_helpers import SMALL_ALIGNMENT, assert_crop_of_box


def test_cache_contents(aligned_train, truth):
    split = aligned_train
    report = split.report
    assert split.crops.shape == (96, 64, 64, 3) and split.crops.dtype == np.uint8
    assert isinstance(split.crops, np.memmap)  # workers share the pages, nothing is copied
    pickled = pickle.dumps(split)
    assert len(pickled) < split.crops.nbytes / 10  # spawned workers get the path, not the pixels
    again = pickle.loads(pickled)
    assert isinstance(again.crops, np.memmap)
    np.testing.assert_array_equal(again.crops[5], split.crops[5])
    assert report["images"] == 96 and report["unreadable"] == 0
    assert report["faces_found"] + report["no_face"] == 96
    assert report["face_rate"] >= 0.9
    assert (split.path / "aligned_sheet.png").stat().st_size > 1000
    # labels follow the manifest row by row
    m = read_manifest(Path(report["manifest"]))
    np.testing.assert_array_equal(split.labels, m.labels)
    np.testing.assert_array_equal(split.mask, m.mask)
    for rec in report["samples"]:
        if rec["status"] == "face":  # the largest face is the labelled one, not the distractor
            gt = truth[rec["image"]]["faces"][0]["box"]
            assert box_iou(rec["box"], gt) > 0.3, rec


def test_cache_is_reused_and_keyed(synthau, tmp_path, aligned_train):
    m = read_manifest(synthau / "val.tsv")
    first = align_manifest(m, tmp_path, SMALL_ALIGNMENT)
    mtime = (first / "report.json").stat().st_mtime_ns
    assert align_manifest(m, tmp_path, SMALL_ALIGNMENT) == first
    assert (first / "report.json").stat().st_mtime_ns == mtime  # not redone
    k = cache_key(m, SMALL_ALIGNMENT)
    assert cache_key(m, AlignmentSettings(crop_size=80)) != k
    assert cache_key(m, AlignmentSettings(crop_size=64, batch_size=4)) == k  # speed knobs do not matter
    image = Path(m.resolve(0))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cache_key(m, SMALL_ALIGNMENT) == k  # a touched image holds the same bytes
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bad_images_are_reported_and_skipped(synthau, tmp_path):
    """A missing file and a truncated JPEG are listed with their lines; a faceless image is centre-cropped."""
    lines = (synthau / "val.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:7]
    cells = [r.split("\t") for r in rows]
    good = synthau / cells[2][0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    blank = tmp_path / "blank.jpg"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 127, np.uint8))
    cells[1][0] = str(tmp_path / "missing.jpg")
    cells[2][0] = str(truncated)
    cells[4][0] = str(blank)
    for c in cells:
        if not os.path.isabs(c[0]):
            c[0] = str(synthau / c[0])
    manifest_path = tmp_path / "bad.tsv"
    manifest_path.write_text("\n".join([header] + ["\t".join(c) for c in cells]) + "\n")
    m = read_manifest(manifest_path)
    split = AlignedSplit.open(align_manifest(m, tmp_path / "cache", SMALL_ALIGNMENT))
    report = split.report
    skipped = {r["line"]: r for r in report["skipped_rows"]}
    assert set(skipped) == {3, 4}
    assert "missing.jpg" in skipped[3]["image"] and "missing.jpg: no such file" in skipped[3]["error"]
    assert "truncated" in skipped[4]["error"].lower() or "broken" in skipped[4]["error"].lower()
    assert len(split) == 4 and split.lines.tolist() == [2, 5, 6, 7]
    blank_pos = split.lines.tolist().index(6)
    assert not split.face_found[blank_pos] and report["no_face_rows"] == [{"line": 6, "image": str(blank)}]
    assert report["samples"][blank_pos]["status"] == NO_FACE
    np.testing.assert_array_equal(split.crops[blank_pos], center_crop(read_image(blank), 64))
    np.testing.assert_array_equal(split.labels, m.labels[[0, 3, 4, 5]])


def _assert_same_cache(got: Path, want: Path) -> None:
    """Two caches of the same manifest: same samples, same statuses, (near) the same pixels."""
    a, b = AlignedSplit.open(got), AlignedSplit.open(want)
    np.testing.assert_array_equal(a.lines, b.lines)
    np.testing.assert_array_equal(a.face_found, b.face_found)
    assert [r["status"] for r in a.report["samples"]] == [r["status"] for r in b.report["samples"]]
    for ra, rb in zip(a.report["samples"], b.report["samples"]):
        if ra["status"] == "face":
            np.testing.assert_allclose(ra["box"], rb["box"], atol=0.2)
    # batches of other sizes may round a landmark differently: a pixel here and there, never a face
    diff = np.abs(a.crops.astype(int) - b.crops.astype(int))
    assert (diff > 2).mean() < 1e-3, (diff > 2).mean()


@pytest.mark.slow
def test_interrupted_alignment_resumes_where_it_stopped(synthau, tmp_path, monkeypatch):
    """Killed in the middle: no cache looks finished, the journal holds what was done, and the
    next call aligns only the rest; the result equals an uninterrupted run's."""
    m = read_manifest(synthau / "train.tsv")
    settings = AlignmentSettings(crop_size=64, batch_size=8)
    calls = []
    detect = FaceDetector.detect_copies

    def dies_on_the_fourth_batch(self, copies, factors):
        calls.append(len(copies))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return detect(self, copies, factors)

    monkeypatch.setattr(FaceDetector, "detect_copies", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        align_manifest(m, tmp_path / "cache", settings, checkpoint_every=16)
    (partial,) = (tmp_path / "cache").iterdir()
    assert partial.name.endswith(".partial") and not (partial / "report.json").exists()
    journal = (partial / "progress.jsonl").read_text().splitlines()
    assert sum(len(json.loads(line)["indices"]) for line in journal) == 16  # 3 batches of 8 ran, 2 journalled
    with open(partial / "progress.jsonl", "a") as f:
        f.write('{"indices": [40, 41')  # a line torn by the kill is dropped, its images redone

    calls.clear()
    monkeypatch.setattr(FaceDetector, "detect_copies", lambda self, c, f: (calls.append(len(c)), detect(self, c, f))[1])
    done = align_manifest(m, tmp_path / "cache", settings, checkpoint_every=16)
    assert sum(calls) == len(m) - 16  # only the rest was detected
    report = json.loads((done / "report.json").read_text())
    assert report["resumed"] == 16 and report["images"] == len(m)
    assert not (done / "progress.jsonl").exists() and [p.name for p in (tmp_path / "cache").iterdir()] == [done.name]
    monkeypatch.undo()
    _assert_same_cache(done, align_manifest(m, tmp_path / "clean", settings))


def test_a_second_aligner_of_the_same_cache_works_apart(synthau, tmp_path):
    """While another process holds the partial folder, a second call aligns in a private one
    (and removes it), leaving the other's journal alone."""
    import fcntl

    m = read_manifest(synthau / "test.tsv")
    final = tmp_path / f"test-{cache_key(m, SMALL_ALIGNMENT)[:16]}"
    partial = tmp_path / f".{final.name}.partial"
    partial.mkdir(parents=True)
    (partial / "progress.jsonl").write_text("")
    held = os.open(partial, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert align_manifest(m, tmp_path, SMALL_ALIGNMENT) == final
    finally:
        os.close(held)
    assert (final / "report.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [partial.name,
                                                                                               final.name]
    assert (partial / "progress.jsonl").is_file()


@pytest.mark.slow
def test_sigkilled_alignment_resumes(synthau, tmp_path):
    """A real SIGKILL of an aligning process: the rerun takes over what the journal holds."""
    script = (f"from datamodules.alignment.align import AlignmentSettings\nfrom datamodules.alignment.crop_cache import align_manifest\n"
              f"from datamodules.io.manifest import read_manifest\n"
              f"align_manifest(read_manifest({str(synthau / 'train.tsv')!r}), {str(tmp_path / 'cache')!r}, "
              f"AlignmentSettings(crop_size=64, batch_size=4), checkpoint_every=4)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    deadline = time.time() + 120
    journal = None
    while time.time() < deadline and proc.poll() is None:
        journal = next((tmp_path / "cache").glob("*.partial/progress.jsonl"), None) if (tmp_path / "cache").is_dir() \
            else None
        if journal is not None and journal.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the alignment finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    journalled = sum(len(json.loads(line)["indices"]) for line in journal.read_text().splitlines()
                     if line.endswith("}"))
    assert 8 <= journalled < 96
    m = read_manifest(synthau / "train.tsv")
    done = align_manifest(m, tmp_path / "cache", AlignmentSettings(crop_size=64, batch_size=4), checkpoint_every=4)
    report = json.loads((done / "report.json").read_text())
    assert report["resumed"] >= journalled and report["aligned"] == len(m)
    _assert_same_cache(done, align_manifest(m, tmp_path / "clean", AlignmentSettings(crop_size=64)))


def test_center_method_crops_the_middle_without_detection(synthau, tmp_path, monkeypatch):
    """The ablation's "no alignment" arm: the centred square of each scene, no MTCNN at all."""
    def no_detector(*args, **kwargs):
        raise AssertionError("the center method must not build a detector")

    monkeypatch.setattr(crop_cache, "FaceDetector", no_detector)
    m = read_manifest(synthau / "val.tsv")
    settings = AlignmentSettings(crop_size=64, method="center")
    assert cache_key(m, settings) != cache_key(m, SMALL_ALIGNMENT)
    split = AlignedSplit.open(align_manifest(m, tmp_path, settings))
    assert len(split) == len(m) and not split.face_found.any()
    for i in (0, len(m) - 1):
        np.testing.assert_array_equal(split.crops[i], center_crop(read_image(m.resolve(i)), 64))
    np.testing.assert_array_equal(split.labels, m.labels)
    assert {s["status"] for s in split.report["samples"]} == {"center"}
    assert "center-cropped (no detection)" in crop_cache.summarize(split.report)
    with pytest.raises(ValueError, match="method"):
        AlignmentSettings(method="dlib")


def test_box_method_crops_the_detected_box_without_landmark_warp(synthau, truth, tmp_path):
    """The ablation's unaligned arm: MTCNN's box, squared and resized. The crop is the box's,
    upright (a tilted face stays tilted), and holds the face the renderer drew."""
    m = read_manifest(synthau / "val.tsv")
    settings = AlignmentSettings(crop_size=64, method="box")
    assert cache_key(m, settings) != cache_key(m, SMALL_ALIGNMENT)
    split = AlignedSplit.open(align_manifest(m, tmp_path, settings))
    found = [i for i, rec in enumerate(split.report["samples"]) if rec["status"] == "face"]
    assert len(found) >= 0.8 * len(m)
    for i in found:
        rec = split.report["samples"][i]
        image = read_image(m.resolve(i))
        assert_crop_of_box(split.crops[i], image, rec["box"], 64, settings.face_scale, tolerance=3.0)
        # The drawn landmarks, through the box's scaling: inside the crop, eyes above the mouth.
        x0, y0, x1, y1 = rec["box"]
        side = max(x1 - x0, y1 - y0) / settings.face_scale
        lm = (np.array(truth[m.images[i]]["faces"][0]["landmarks"]) - [(x0 + x1) / 2, (y0 + y1) / 2]) * 64 / side + 32
        assert ((lm > 0) & (lm < 64)).all(), (i, lm)
        assert lm[:2, 1].mean() < lm[3:, 1].mean()
    assert {s["status"] for s in split.report["samples"]} <= {"face", "no_face"}
    assert "faces found" in crop_cache.summarize(split.report)


CROP_BYTES = 64 * 64 * 3


@pytest.fixture
def val_cache(synthau, tmp_path, monkeypatch) -> tuple[Path, np.ndarray]:
    """The val split (12 crops) aligned with checksums over chunks of 4 crops; and a copy of its crops."""
    monkeypatch.setattr(crop_cache, "CHECKSUM_CHUNK_BYTES", 4 * CROP_BYTES)
    folder = align_manifest(read_manifest(synthau / "val.tsv"), tmp_path / "cache", SMALL_ALIGNMENT)
    return folder, np.array(AlignedSplit.open(folder).crops)


def _realign(synthau, folder: Path) -> Path:
    return align_manifest(read_manifest(synthau / "val.tsv"), folder.parent, SMALL_ALIGNMENT)


def _flip_byte(folder: Path, sample: int) -> None:
    crops = np.load(folder / "crops.npy", mmap_mode="r")
    offset = crops.offset + sample * CROP_BYTES + 1000
    del crops
    with open(folder / "crops.npy", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_report_records_sizes_and_checksums(val_cache):
    folder, crops = val_cache
    report = json.loads((folder / "report.json").read_text())
    assert report["files"] == {"crops.npy": (folder / "crops.npy").stat().st_size,
                               "samples.npz": (folder / "samples.npz").stat().st_size}
    sums = report["crop_checksums"]
    assert sums["algorithm"] == "crc32" and sums["samples_per_chunk"] == 4
    assert sums["crc32"] == [zlib.crc32(crops[i:i + 4].tobytes()) for i in (0, 4, 8)]
    split = AlignedSplit.open(folder)
    assert split.verify() is True and split.checks.done.tolist() == [1, 1, 1]


def test_truncated_crops_are_aligned_again(synthau, val_cache, caplog):
    """A finished cache whose crops.npy lost its end (a full disk, a copy cut short): opening it
    names the folder, and align_manifest removes it and aligns the same crops again."""
    folder, crops = val_cache
    os.truncate(folder / "crops.npy", (folder / "crops.npy").stat().st_size // 2)
    with pytest.raises(crop_cache.CacheError, match=f"{folder}.*crops.npy has .* bytes.*au-detect prepare"):
        AlignedSplit.open(folder)
    with caplog.at_level("WARNING"):
        assert _realign(synthau, folder) == folder
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(folder) in warning and "crops.npy" in warning
    np.testing.assert_array_equal(AlignedSplit.open(folder).crops, crops)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nothing left aside


@pytest.mark.parametrize("damage, problem", [
    (lambda f: os.truncate(f / "report.json", 300), "report.json is unreadable"),
    (lambda f: (f / "report.json").write_text((f / "report.json").read_text().replace('"aligned": 12', '"aligned": 11')),
     "report.json is unreadable"),
    (lambda f: (f / "report.json").unlink(), "report.json is missing"),
    (lambda f: (f / "samples.npz").unlink(), "samples.npz is missing"),
    (lambda f: (f / "samples.npz").write_bytes(b"PK" + bytes((f / "samples.npz").stat().st_size - 2)),
     "samples.npz is unreadable"),
], ids=["report-truncated", "report-garbled", "report-deleted", "samples-deleted", "samples-zeroed"])
def test_damaged_report_or_samples_are_aligned_again(synthau, val_cache, caplog, damage, problem):
    folder, crops = val_cache
    labels = AlignedSplit.open(folder).labels
    damage(folder)
    with pytest.raises(crop_cache.CacheError, match=problem):
        AlignedSplit.open(folder)
    with caplog.at_level("WARNING"):
        assert _realign(synthau, folder) == folder
    assert any(str(folder) in r.getMessage() and problem in r.getMessage() for r in caplog.records)
    split = AlignedSplit.open(folder)
    np.testing.assert_array_equal(split.crops, crops)
    np.testing.assert_array_equal(split.labels, labels)


def test_flipped_byte_is_found_when_its_chunk_is_read(synthau, val_cache):
    """Sizes still agree, so opening succeeds; reading a sample of the damaged chunk (and only
    that chunk) raises, as does verify(); the folder is then marked and realigned by the next run."""
    folder, crops = val_cache
    _flip_byte(folder, 5)
    lazy, eager = AlignedSplit.open(folder), AlignedSplit.open(folder)
    np.testing.assert_array_equal(lazy.crops[1], crops[1])  # chunks 0 and 2 are intact
    np.testing.assert_array_equal(lazy.crops[10:12], crops[10:12])
    with pytest.raises(crop_cache.CacheError, match=rf"{folder} is damaged: the crops of chunk 1 \(samples 4-7\)"):
        lazy.crops[5]
    with pytest.raises(crop_cache.CacheError, match=r"chunk 1 \(samples 4-7\)"):
        lazy.crops[[2, 6]]  # a fancy index reads chunk 1 too
    assert lazy.checks.done.tolist() == [1, 0, 1]
    with pytest.raises(crop_cache.CacheError, match=rf"{folder} .*chunk 1 \(samples 4-7\) of crops.npy"):
        eager.verify()
    for check_crops in (True, False):  # the note the failed read left makes the folder unusable
        with pytest.raises(crop_cache.CacheError, match=r"chunk 1 .*found while reading it earlier"):
            AlignedSplit.open(folder, check_crops=check_crops)
    assert _realign(synthau, folder) == folder
    np.testing.assert_array_equal(AlignedSplit.open(folder).crops, crops)


@pytest.mark.slow
def test_spawned_loader_worker_checks_its_own_mapping(val_cache):
    """A pickled split (spawned worker) maps crops.npy again and still verifies what it reads; the
    error comes back to the main process as a CacheError naming the folder and the chunk."""
    from datamodules.au_datamodule import AlignedFaceDataset

    folder, crops = val_cache
    split = AlignedSplit.open(folder)
    split.verify()
    again = pickle.loads(pickle.dumps(split))
    assert again.checks is not None and again.checks.done.tolist() == [0, 0, 0]  # its own record
    np.testing.assert_array_equal(again.crops[7], crops[7])
    _flip_byte(folder, 9)
    loader = torch.utils.data.DataLoader(AlignedFaceDataset(split), batch_size=4, num_workers=1,
                                         multiprocessing_context="spawn")
    with pytest.raises(crop_cache.CacheError, match=rf"{folder} .*chunk 2 \(samples 8-11\)"):
        list(loader)
    # This process verified chunk 2 before the damage and does not hash it again (once per process).
    assert split.crops[9].tobytes() != crops[9].tobytes()


def test_forked_loader_workers_share_verified_chunks(val_cache):
    """Workers forked from the process that opened the split record their checks where the others
    (and the parent) see them: a chunk is hashed once, not once per worker."""
    from datamodules.au_datamodule import AlignedFaceDataset

    folder, crops = val_cache
    split = AlignedSplit.open(folder)
    loader = torch.utils.data.DataLoader(AlignedFaceDataset(split), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    images = torch.cat([b["image"] for b in loader])
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), crops)
    assert split.checks.done.tolist() == [1, 1, 1]  # the parent never read a sample itself


def test_cache_without_checksums_is_kept(synthau, val_cache, caplog):
    """A cache written before checksums is reused (sizes derived from its header and counts), not
    realigned; verify() has nothing to check; a truncated one is still found and realigned."""
    folder, crops = val_cache
    report = json.loads((folder / "report.json").read_text())
    del report["files"], report["crop_checksums"]
    (folder / "report.json").write_text(json.dumps(report))
    before = (folder / "crops.npy").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="datamodules.alignment.crop_cache"):
        assert _realign(synthau, folder) == folder
    assert (folder / "crops.npy").stat().st_mtime_ns == before
    assert any("predates crop checksums" in r.getMessage() for r in caplog.records)
    split = AlignedSplit.open(folder)
    assert split.checks is None and split.verify() is False
    np.testing.assert_array_equal(split.crops, crops)
    os.truncate(folder / "crops.npy", (folder / "crops.npy").stat().st_size - 1)
    _realign(synthau, folder)
    rebuilt = AlignedSplit.open(folder)
    assert "crop_checksums" in rebuilt.report
    np.testing.assert_array_equal(rebuilt.crops, crops)


# An mtime with a fraction of a second, which tar (and cp without -p) do not keep.
OLD_MTIME_NS = 1_600_000_000_700_000_000


def _project(synthau, folder: Path) -> Path:
    """A project folder: the val split's manifest and images (relative references), aligned into
    its cache folder."""
    (folder / "data" / "images").mkdir(parents=True)
    shutil.copy(synthau / "val.tsv", folder / "data")
    shutil.copytree(synthau / "images" / "val", folder / "data" / "images" / "val")
    for image in (folder / "data" / "images" / "val").iterdir():
        os.utime(image, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return align_manifest(read_manifest(folder / "data" / "val.tsv"), folder / "cache", SMALL_ALIGNMENT)


def _hashed(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "images (their size or mtime" in r.getMessage()]


@pytest.mark.parametrize("how", ["cp", "tar"])
def test_a_copied_project_reuses_its_caches(synthau, tmp_path, caplog, how):
    """A project folder copied (cp -r: new mtimes) or archived and extracted elsewhere (tar: whole
    seconds), the original removed: aligning from the copy reuses the copied cache, aligning nothing."""
    cache = _project(synthau, tmp_path / "project")
    report, crops = (cache / "report.json").read_bytes(), np.array(AlignedSplit.open(cache).crops)
    if how == "cp":
        subprocess.run(["cp", "-r", str(tmp_path / "project"), str(tmp_path / "copy")], check=True)
    else:
        subprocess.run(["tar", "-cf", str(tmp_path / "project.tar"), "-C", str(tmp_path), "project"], check=True)
        (tmp_path / "elsewhere").mkdir()
        subprocess.run(["tar", "-xf", str(tmp_path / "project.tar"), "-C", str(tmp_path / "elsewhere")], check=True)
        os.rename(tmp_path / "elsewhere" / "project", tmp_path / "copy")
    shutil.rmtree(tmp_path / "project")
    copy = tmp_path / "copy"
    image = copy / "data" / "images" / "val" / "000006.jpg"
    if how == "cp":
        assert image.stat().st_mtime_ns // 10**9 != OLD_MTIME_NS // 10**9
        # a copy made an hour ago: images written seconds ago are hashed again at every start (racy)
        for path in (copy / "data" / "images").rglob("*.jpg"):
            os.utime(path, ns=(OLD_MTIME_NS + 3600 * 10**9,) * 2)
    else:
        assert image.stat().st_mtime_ns == OLD_MTIME_NS // 10**9 * 10**9  # tar kept whole seconds

    m = read_manifest(copy / "data" / "val.tsv")
    with caplog.at_level("INFO", logger="datamodules.alignment.crop_cache"):
        again = align_manifest(m, copy / "cache", SMALL_ALIGNMENT)
    assert again == copy / "cache" / cache.name
    assert [p.name for p in (copy / "cache").iterdir()] == [cache.name]  # no partial folder: nothing aligned
    assert (again / "report.json").read_bytes() == report  # not rewritten, so not aligned again
    split = AlignedSplit.open(again)
    assert split.verify() is True
    np.testing.assert_array_equal(split.crops, crops)
    # cp -r: the sizes and seconds differ from what the cache noted, so the images were hashed
    # once and their new stat noted; tar kept the seconds, so nothing was read.
    assert _hashed(caplog) == ([f"{m.path}: hashed 12 of 12 images (their size or mtime is not what a cache "
                                "noted)"] if how == "cp" else [])
    noted = crop_cache.ImageRecord.read(again / crop_cache.IMAGES)
    assert noted.mtime == [int(os.stat(m.resolve(i)).st_mtime) for i in range(len(m))]
    caplog.clear()
    with caplog.at_level("INFO", logger="datamodules.alignment.crop_cache"):
        assert align_manifest(m, copy / "cache", SMALL_ALIGNMENT) == again
    assert _hashed(caplog) == []  # the next start takes the fast path


def test_a_changed_image_is_aligned_again(synthau, tmp_path, caplog):
    """Different bytes of the same size: the cache is not reused; a new one holds the new image.
    A changed size, an added or removed row, other settings: other keys."""
    cache = _project(synthau, tmp_path / "project")
    report = (cache / "report.json").read_bytes()
    m = read_manifest(tmp_path / "project" / "data" / "val.tsv")
    image = Path(m.resolve(3))
    original = image.read_bytes()
    data = bytearray(original)
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # a gray band in the decoded image
    image.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="datamodules.alignment.crop_cache"):
        fresh = align_manifest(m, tmp_path / "project" / "cache", SMALL_ALIGNMENT)
    assert fresh != cache and (cache / "report.json").is_file()  # the old cache stays as it was
    assert _hashed(caplog) == [f"{m.path}: hashed 1 of 12 images (their size or mtime is not what a cache noted)"]
    old, new = AlignedSplit.open(cache), AlignedSplit.open(fresh)
    assert new.report["resumed"] == 0 and new.report["images"] == 12
    np.testing.assert_array_equal(new.crops[:3], old.crops[:3])
    assert not np.array_equal(new.crops[3], old.crops[3])

    key = cache_key(m, SMALL_ALIGNMENT)
    image.write_bytes(bytes(data[:-1]))
    assert cache_key(m, SMALL_ALIGNMENT) != key  # another size
    image.write_bytes(bytes(data))
    lines = m.path.read_text().splitlines(keepends=True)
    m.path.write_text("".join(lines[:-1]))
    assert cache_key(read_manifest(m.path), SMALL_ALIGNMENT) != key  # a row removed
    m.path.write_text("".join(lines + lines[-1:]))
    assert cache_key(read_manifest(m.path), SMALL_ALIGNMENT) != key  # a row added
    m.path.write_text("".join(lines))
    assert cache_key(m, SMALL_ALIGNMENT) == key
    assert cache_key(m, AlignmentSettings(crop_size=64, face_scale=0.8)) != key
    # The first bytes back (with a new mtime): the first cache, found by content, is reused.
    image.write_bytes(original)
    caplog.clear()
    with caplog.at_level("INFO", logger="datamodules.alignment.crop_cache"):
        assert align_manifest(m, tmp_path / "project" / "cache", SMALL_ALIGNMENT) == cache
    assert _hashed(caplog) == [f"{m.path}: hashed 1 of 12 images (their size or mtime is not what a cache noted)"]
    assert (cache / "report.json").read_bytes() == report


def test_key_takes_noted_digests_when_the_stat_matches(synthau, tmp_path):
    """The fast path: an image whose size and mtime match what the cache noted is not read, its
    noted digest stands for it; one whose mtime moved is read again."""
    cache = _project(synthau, tmp_path / "project")
    m = read_manifest(tmp_path / "project" / "data" / "val.tsv")
    noted = crop_cache.ImageRecord.read(cache / crop_cache.IMAGES)
    key = cache_key(m, SMALL_ALIGNMENT)
    assert noted.key == key == json.loads((cache / "report.json").read_text())["key"]
    assert cache.name == f"val-{key[:16]}"
    assert noted.size == [Path(m.resolve(i)).stat().st_size for i in range(len(m))]
    assert set(noted.mtime) == {OLD_MTIME_NS // 10**9}
    assert cache_key(m, SMALL_ALIGNMENT, recorded=noted) == key
    wrong = crop_cache.ImageRecord(noted.layout, noted.key, noted.size, noted.mtime, ["0" * 32] + noted.blake2b[1:])
    assert cache_key(m, SMALL_ALIGNMENT, recorded=wrong) != key  # trusted, so not read
    os.utime(m.resolve(0), ns=(OLD_MTIME_NS + 10**9, OLD_MTIME_NS + 10**9))
    assert cache_key(m, SMALL_ALIGNMENT, recorded=wrong) == key  # read again
    # A record of another layout (other settings) is not used.
    other = crop_cache.ImageRecord("other", noted.key, noted.size, noted.mtime, ["0" * 32] * len(m))
    assert cache_key(m, SMALL_ALIGNMENT, recorded=other) == key
