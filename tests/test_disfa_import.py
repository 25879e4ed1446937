"""DISFA import on a hand-made tree: each label and intensity in its row and column, the image of
label frame k is video frame k-1, the occurrence threshold, every fault a report row naming its
file and line, resume without decoding again, and the right camera."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.benchmarks import disfa
from datamodules.benchmarks.disfa import import_disfa
from datamodules.io.manifest import DISFA_AUS, UNLABELLED, read_manifest

W, H = 64, 48
# Label lines per subject, and the left and right video's frame counts (None: no video).
SUBJECTS = {
    "SN001": (10, 10, 10),
    "SN002": (12, 10, 10),  # labels longer than the video
    "SN003": (8, 11, None),  # video longer than the labels; no right video
    "SN004": (5, None, None),  # labels, no video
}
MALFORMED_LINE = 4  # SN001_au2.txt line 4: "4,x"


def intensity(subject: str, au: int, frame: int) -> int:
    return (frame + au + int(subject[2:])) % 6


def shade(camera: str, index: int) -> int:
    """The grey level of video frame ``index`` (from 0), different per camera."""
    return 10 + 20 * index if camera == "left" else 245 - 20 * index


def write_video(path: Path, frames: int, camera: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    assert writer.isOpened()
    for k in range(frames):
        writer.write(np.full((H, W, 3), shade(camera, k), np.uint8))
    writer.release()


def write_labels(folder: Path, subject: str, au: int, lines: list[str], newline: str = "\n", bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subject}_au{au}.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode() + newline.encode())
    return path


def make_tree(root: Path) -> dict[tuple[str, int], list[int]]:
    """A DISFA tree with the faults of real copies; returns the expected intensities per
    (subject, frame), in DISFA_AUS order (999 unknown)."""
    expected: dict[tuple[str, int], list[int]] = {}
    for subject, (lines, left, right) in SUBJECTS.items():
        folder = root / "ActionUnit_Labels" / subject
        for au in DISFA_AUS:
            rows = [f"{f},{intensity(subject, au, f)}" for f in range(1, lines + 1)]
            if subject == "SN001" and au == 5:
                continue  # a missing AU file
            if subject == "SN001" and au == 1:  # BOM, CRLF, blank lines in between and at the end
                write_labels(folder, subject, au, rows[:3] + [""] + rows[3:] + ["", ""], "\r\n", bom=True)
            elif subject == "SN001" and au == 2:  # spaces, and a malformed intensity
                rows = [f"  {r.replace(',', ' , ')} " for r in rows]
                rows[MALFORMED_LINE - 1] = f"{MALFORMED_LINE},x"
                write_labels(folder, subject, au, rows)
            elif subject == "SN001" and au == 4:  # frame 6 twice, disagreeing; frame 7 twice, agreeing
                write_labels(folder, subject, au, rows + ["6,5" if intensity(subject, 4, 6) != 5 else "6,0", rows[6]])
            elif subject == "SN002" and au == 6:  # a line without a frame number in place of frame 3
                rows[2] = "oops"
                write_labels(folder, subject, au, rows)
            else:
                write_labels(folder, subject, au, rows, "\r\n" if subject == "SN002" else "\n")
        for f in range(1, lines + 1):
            expected[subject, f] = [intensity(subject, au, f) for au in DISFA_AUS]
        if left is not None:
            name = "leftvideosn003_COMP.AVI" if subject == "SN003" else f"LeftVideo{subject}_comp.avi"
            folder = "elsewhere" if subject == "SN003" else "Videos_LeftCamera"
            write_video(root / folder / name, left, "left")
        if right is not None:
            write_video(root / "Video_RightCamera" / f"RightVideo{subject}_Comp.avi", right, "right")
    column = {au: i for i, au in enumerate(DISFA_AUS)}
    for f in range(1, SUBJECTS["SN001"][0] + 1):
        expected["SN001", f][column[5]] = UNLABELLED
    expected["SN001", MALFORMED_LINE][column[2]] = UNLABELLED
    expected["SN001", 6][column[4]] = UNLABELLED
    expected["SN002", 3][column[6]] = UNLABELLED
    write_video(root / "Videos_LeftCamera" / "LeftVideoSN005_comp.avi", 4, "left")  # a video without labels
    write_labels(root / "ActionUnit_Labels" / "SN006", "SN006", 1, ["1,0", "2,3"])
    (root / "Videos_LeftCamera" / "LeftVideoSN006_comp.avi").write_bytes(b"RIFF\0\0\0\0AVI junk, not a video")
    return expected


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "DISFA"
    return root, make_tree(root)


def grey(path: Path) -> float:
    image = cv2.imread(str(path))
    assert image is not None, path
    return float(image.mean())


def rows_of(report_path: Path) -> list[dict]:
    return json.loads(report_path.read_text())["skipped"]


def find(rows: list[dict], file_end: str, line: int | None, reason: str) -> dict:
    found = [r for r in rows if r["file"].endswith(file_end) and r["line"] == line and r["reason"].startswith(reason)]
    assert len(found) == 1, (file_end, line, reason, rows)
    return found[0]


def test_every_label_and_intensity_lands_in_its_row_and_column(tree, tmp_path):
    root, expected = tree
    out = tmp_path / "out"
    report = import_disfa(str(root), str(out))
    m = read_manifest(out / "disfa.tsv", aus=DISFA_AUS)
    imported = {(s, f) for s, f in expected if s in ("SN001", "SN002", "SN003") and f <= SUBJECTS[s][1]}
    assert {(s, int(f)) for s, f in zip(m.extra["subject"], m.extra["frame"])} == imported
    assert len(m) == len(imported) == report.frames == 28
    assert set(m.extra["sequence"]) == {"left"}
    for i in range(len(m)):
        subject, frame = m.extra["subject"][i], int(m.extra["frame"][i])
        want = expected[subject, frame]
        assert m.images[i] == f"frames/left/{subject}/{frame:05d}.jpg"
        for j, au in enumerate(DISFA_AUS):
            assert int(m.extra[f"AU{au}_intensity"][i]) == want[j], (subject, frame, au)
            assert m.mask[i, j] == (want[j] != UNLABELLED), (subject, frame, au)
            assert m.labels[i, j] == (want[j] != UNLABELLED and want[j] >= 2), (subject, frame, au)
        # label frame k is video frame k-1; the path resolves against the manifest's folder
        assert abs(grey(Path(m.resolve(i))) - shade("left", frame - 1)) < 4, (subject, frame)
    assert report.subjects == {"SN001": 10, "SN002": 10, "SN003": 8}
    assert report.notes["occurrence_threshold"] == 2 and ">= 2" in report.notes["occurrence"]


def test_the_occurrence_threshold(tree, tmp_path):
    root, expected = tree
    for threshold in (2, 1):
        out = tmp_path / f"t{threshold}"
        import_disfa(str(root), str(out), occurrence_threshold=threshold, aus=(1, 2))
        m = read_manifest(out / "disfa.tsv", aus=(1, 2))
        values = np.array([[int(v) for v in m.extra[f"AU{au}_intensity"]] for au in (1, 2)]).T
        labelled = values != UNLABELLED
        assert (m.mask == labelled).all()
        assert (m.labels[labelled] == (values[labelled] >= threshold)).all()
        ones = labelled & (values == 1)
        twos = labelled & (values == 2)
        assert ones.any() and twos.any()
        assert (m.labels[ones] == (threshold == 1)).all()  # 1 -> 0 by default, 1 with threshold 1
        assert (m.labels[twos] == 1).all()
        assert json.loads((out / "import_report.json").read_text())["notes"]["occurrence_threshold"] == threshold


def test_each_fault_is_a_report_row_naming_file_and_line(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    import_disfa(str(root), str(out))
    rows = rows_of(out / "import_report.json")
    malformed = find(rows, "SN001_au2.txt", MALFORMED_LINE, "malformed line: column 2")
    assert "frame 4 unknown (999) for AU2" in malformed["reason"]
    assert "unknown (999) for AU4" in find(rows, "SN001_au4.txt", 11, "duplicate frame: frame 6")["reason"]
    assert "kept" in find(rows, "SN001_au4.txt", 12, "duplicate frame: frame 7")["reason"]
    find(rows, "SN001/SN001_au5.txt", None, "missing AU file: AU5")
    assert "its frame unknown" in find(rows, "SN002_au6.txt", 3, "malformed line: column 1 (frame)")["reason"]
    assert "(first: 3); unknown (999) for AU6" in find(rows, "SN002_au6.txt", None, "frames missing from the file")[
        "reason"]
    for frame in (11, 12):  # SN002's labels go on past its 10-frame video
        assert "has 10 frames" in find(rows, "SN002_au1.txt", frame, f"no frame in the video: frame {frame} ")["reason"]
    assert "3 frame(s) after frame 8" in find(rows, "leftvideosn003_COMP.AVI", None,
                                              "video frames beyond the labels")["reason"]
    find(rows, "ActionUnit_Labels/SN004", None, "no video: SN004")
    find(rows, "LeftVideoSN005_comp.avi", None, "no labels")
    assert "LeftVideoSN006_comp.avi" in find(rows, "LeftVideoSN006_comp.avi", None, "unreadable video")["reason"]
    # SN006 has one label file: the other eleven are missing
    assert sum(r["reason"].startswith("missing AU file") and "SN006" in r["file"] for r in rows) == 11
    assert not any(r["file"].endswith("SN001_au1.txt") for r in rows)  # BOM, CRLF, blank lines: all fine
    assert len(rows) == 1 + 2 + 1 + 2 + 2 + 1 + 1 + 1 + 1 + 11


def test_a_second_run_decodes_nothing_and_a_cut_short_subject_resumes(tree, tmp_path, monkeypatch):
    root, _ = tree
    out = tmp_path / "out"
    import_disfa(str(root), str(out))
    manifest = (out / "disfa.tsv").read_bytes()
    frames = sorted((out / "frames" / "left").rglob("*.jpg"))
    assert len(frames) == 28
    mtimes = {p: p.stat().st_mtime_ns for p in frames}

    decoded: list[str] = []
    real = disfa.video_frames

    def counting(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(disfa, "video_frames", counting)
    report = import_disfa(str(root), str(out))
    assert decoded == ["LeftVideoSN006_comp.avi"]  # only the unreadable video is tried again
    assert report.notes["subjects_from_marker"] == ["SN001", "SN002", "SN003"]
    assert {p: p.stat().st_mtime_ns for p in frames} == mtimes
    assert (out / "disfa.tsv").read_bytes() == manifest

    # SN001 stopped halfway: half its frames and its marker gone
    sn001 = out / "frames" / "left" / "SN001"
    gone = sorted(sn001.glob("*.jpg"))[::2]
    for p in gone:
        p.unlink()
    (sn001 / disfa.MARKER_NAME).unlink()
    decoded.clear()
    import_disfa(str(root), str(out))
    assert decoded == ["LeftVideoSN001_comp.avi", "LeftVideoSN006_comp.avi"]
    assert all(p.is_file() for p in gone)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p not in gone)  # kept, not rewritten
    assert (out / "disfa.tsv").read_bytes() == manifest
    assert json.loads((sn001 / disfa.MARKER_NAME).read_text())["complete"] is True
    assert not [p for p in out.rglob("*.tmp")]


def test_a_replaced_video_is_written_again(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    import_disfa(str(root), str(out), aus=(1,))
    video = root / "Videos_LeftCamera" / "LeftVideoSN001_comp.avi"
    write_video(video, 10, "right")  # other pixels, so another size or mtime
    os.utime(video, ns=(1, 1))
    import_disfa(str(root), str(out), aus=(1,))
    assert abs(grey(out / "frames" / "left" / "SN001" / "00003.jpg") - shade("right", 2)) < 4


def test_right_camera(tree, tmp_path):
    root, expected = tree
    out = tmp_path / "right"
    report = import_disfa(str(root), str(out), camera="right", aus=(1, 12))
    m = read_manifest(out / "disfa.tsv", aus=(1, 12))
    assert report.subjects == {"SN001": 10, "SN002": 10}
    assert set(m.extra["sequence"]) == {"right"}
    for i in range(len(m)):
        subject, frame = m.extra["subject"][i], int(m.extra["frame"][i])
        assert m.images[i] == f"frames/right/{subject}/{frame:05d}.jpg"
        assert [int(m.extra[f"AU{au}_intensity"][i]) for au in (1, 12)] == [
            expected[subject, frame][DISFA_AUS.index(au)] for au in (1, 12)]
        assert abs(grey(out / m.images[i]) - shade("right", frame - 1)) < 4
    rows = rows_of(out / "import_report.json")
    find(rows, "ActionUnit_Labels/SN003", None, "no video: SN003 has labels but no RightVideoSN003")


def test_every_nth_frame(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "every"
    report = import_disfa(str(root), str(out), every=3, aus=(1,))
    m = read_manifest(out / "disfa.tsv", aus=(1,))
    frames = {(s, int(f)) for s, f in zip(m.extra["subject"], m.extra["frame"])}
    assert frames == {("SN001", f) for f in (1, 4, 7, 10)} | {("SN002", f) for f in (1, 4, 7, 10)} | {
        ("SN003", f) for f in (1, 4, 7)}
    assert report.frames == 11
    for i in range(len(m)):
        assert abs(grey(Path(m.resolve(i))) - shade("left", int(m.extra["frame"][i]) - 1)) < 4


def test_no_frame_imported_leaves_a_report_and_no_manifest(tmp_path):
    root, out = tmp_path / "DISFA", tmp_path / "out"
    write_labels(root / "ActionUnit_Labels" / "SN001", "SN001", 1, ["1,2", "2,0"])
    report = import_disfa(str(root), str(out), aus=(1,))
    assert report.frames == 0 and not (out / "disfa.tsv").exists()
    find(rows_of(out / "import_report.json"), "ActionUnit_Labels/SN001", None, "no video: SN001")


@pytest.mark.parametrize("kwargs, word", [({"camera": "middle"}, "camera"), ({"aus": (1, 7)}, "aus"),
                                          ({"occurrence_threshold": 0}, "occurrence_threshold"),
                                          ({"every": 0}, "every"), ({"jpeg_quality": 101}, "jpeg_quality")])
def test_arguments_out_of_range_are_refused(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        import_disfa(str(tmp_path), str(tmp_path / "out"), **kwargs)
