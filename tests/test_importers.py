"""BP4D and Aff-Wild2 imported from hand-made trees laid out as distributed: every label in its row
and column of the manifest, every fault a report row naming its file and line, and
``au-detect import`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.benchmarks.affwild2 import import_affwild2
from datamodules.benchmarks.bp4d import import_bp4d
from datamodules.benchmarks.report import REPORT_NAME, FrameRow, ImportReport, write_frames
from datamodules.io.manifest import UNLABELLED, read_manifest
from experiments.cli import main

AUS = (1, 2, 4)
U = UNLABELLED


def frames(folder: Path, *names: str, empty: tuple[str, ...] = ()) -> Path:
    """Frame files: their bytes are never decoded by an import, only their presence and size."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"" if name in empty else b"\xff\xd8\xff\xe0 a frame")
    return folder


def text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # newline="": the CRLF written here stays CRLF
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(content)
    return path


def table(manifest_path: Path, aus: tuple[int, ...], *extra: str) -> dict[tuple, tuple]:
    """``{(subject, sequence, frame): (image, *extra columns, *0/1/999 per AU)}`` read back."""
    m = read_manifest(manifest_path, aus=aus)
    raw = np.where(m.mask, m.labels, U).astype(int)
    got = {}
    for i, image in enumerate(m.images):
        key = (m.extra["subject"][i], m.extra["sequence"][i], int(m.extra["frame"][i]))
        assert key not in got, f"{key} twice"
        got[key] = (image, *(m.extra[c][i] for c in extra), *map(int, raw[i]))
    return got


def rows(report: ImportReport) -> set[tuple[str, int | None, str]]:
    """Each report row as (file or folder name, line, kind of reason)."""
    return {(Path(s.file).name, s.line, s.reason.split(":")[0]) for s in report.skipped}


def reason(report: ImportReport, name: str, line: int | None, kind: str) -> str:
    found = [s.reason for s in report.skipped if Path(s.file).name == name and s.line == line
             and s.reason.startswith(kind)]
    assert len(found) == 1, (name, line, kind, [str(s) for s in report.skipped])
    return found[0]


@pytest.fixture
def bp4d(tmp_path) -> Path:
    """BP4D in two places under the root, the way copies differ: padded and unpadded frame names,
    a header in another order, CRLF and a BOM, and one of each fault."""
    root = tmp_path / "BP4D"
    occ = root / "AUCoding" / "AU_OCC"
    text(occ / "F001_T1.csv",
         "0,1,2,3,4\r\n"         # 1 header: AU3 is not asked for
         "10,1,0,0,9\r\n"        # 2 frame 10 (0010.jpg)
         "\r\n"                  # 3
         "11,0,1,9,1\r\n"        # 4 frame 11 (11.jpg): a 9 in AU3, which is not imported
         "12,9,9,0,0,,\r\n"      # 5 frame 12 (012.jpg), trailing blank cells
         "13,1,x,0,0\r\n"        # 6 malformed AU2
         "14,1,1,1,1\r\n"        # 7 no image
         "15,1,1\r\n"            # 8 too few cells
         "10,0,0,0,0\r\n"        # 9 frame 10 again
         "1.5,0,0,0,0\r\n"       # 10 not a frame number
         "\r\n")
    text(occ / "M002_T8.csv",
         "\ufeff0,24,4,2,1\n"    # 1 header, another order
         "1,0,1,0,1\n"           # 2 frame 1: AU4 1, AU2 0, AU1 1
         "2,1,0,1,9\n"           # 3 frame 2: AU4 0, AU2 1, AU1 9
         "3,0,0,0,0\n")          # 4 frame 3: an empty file
    text(occ / "F003_T2.csv", "0,1,2\n1,0,0\n")             # no AU4 column
    text(occ / "F004_T3.csv", b"0,1,2,4\n1,\xff,0,0\n")     # not UTF-8
    text(occ / "F005_T4.csv", "0,1,2,4\n1,0,0,0\n")         # no image folder
    frames(root / "BP4D-training" / "F001" / "T1", "0010.jpg", "11.jpg", "012.jpg", "0013.jpg", "0500.jpg",
           "0501.jpg")
    frames(root / "Sequences" / "M002" / "T8", "001.jpg", "002.jpg", "003.jpg", empty=("003.jpg",))
    frames(root / "Sequences" / "F003" / "T2", "1.jpg")
    frames(root / "Sequences" / "F004" / "T3", "1.jpg")
    frames(root / "Sequences" / "M009" / "T1", "1.jpg", "2.jpg")  # no label file
    return root


def test_bp4d_every_label_in_its_row_and_column(bp4d, tmp_path):
    out = tmp_path / "out"
    report = import_bp4d(str(bp4d), str(out), aus=AUS)
    f001 = bp4d / "BP4D-training" / "F001" / "T1"
    m002 = bp4d / "Sequences" / "M002" / "T8"
    assert table(out / "bp4d.tsv", AUS) == {
        ("F001", "T1", 10): (str(f001 / "0010.jpg"), 1, 0, U),
        ("F001", "T1", 11): (str(f001 / "11.jpg"), 0, 1, 1),
        ("F001", "T1", 12): (str(f001 / "012.jpg"), U, U, 0),
        ("M002", "T8", 1): (str(m002 / "001.jpg"), 1, 0, 1),
        ("M002", "T8", 2): (str(m002 / "002.jpg"), U, 1, 0),
    }
    assert report.frames == 5 and report.subjects == {"F001": 3, "M002": 2} and report.sequences == 2
    assert report.positive_rate == {"AU1": 0.6667, "AU2": 0.5, "AU4": 0.5}
    assert report.notes["unknown_label"] == "9 -> 999"
    assert json.loads((out / REPORT_NAME).read_text())["frames"] == 5


def test_bp4d_every_fault_is_a_report_row(bp4d, tmp_path):
    report = import_bp4d(str(bp4d), str(tmp_path / "out"), aus=AUS)
    assert rows(report) == {
        ("F001_T1.csv", 6, "malformed"),
        ("F001_T1.csv", 7, "no image"),
        ("F001_T1.csv", 8, "malformed"),
        ("F001_T1.csv", 9, "duplicate frame"),
        ("F001_T1.csv", 10, "malformed"),
        ("M002_T8.csv", 4, "empty image"),
        ("F003_T2.csv", 1, "missing AU column"),
        ("F004_T3.csv", None, "unreadable"),
        ("F005_T4.csv", None, "no image folder"),
        ("T1", None, "unlabelled images"),  # F001/T1: frames 500, 501
        ("T2", None, "unlabelled images"),  # F003/T2: its label file was left out
        ("T3", None, "unlabelled images"),
        ("T1", None, "no label file"),  # M009/T1
    }
    assert len(report.skipped) == 13
    assert "column 3 (AU2): 'x' is not 0, 1 or 9" in reason(report, "F001_T1.csv", 6, "malformed")
    assert "expected 5 cells as in the header, found 3" in reason(report, "F001_T1.csv", 8, "malformed")
    assert "column 1 (frame): '1.5'" in reason(report, "F001_T1.csv", 10, "malformed")
    assert "frame 14" in reason(report, "F001_T1.csv", 7, "no image")
    assert "different labels; line 2 kept" in reason(report, "F001_T1.csv", 9, "duplicate frame")
    assert "AU4" in reason(report, "F003_T2.csv", 1, "missing AU column")
    assert "not UTF-8" in reason(report, "F004_T3.csv", None, "unreadable")
    assert "F005/T4" in reason(report, "F005_T4.csv", None, "no image folder")
    unlabelled = [s for s in report.skipped if s.reason.startswith("unlabelled") and "F001" in s.file]
    assert [s.reason for s in unlabelled] == ["unlabelled images: 2 of 6 frames have no label line (frames 500-501)"]
    assert "label file F003_T2.csv was left out" in reason(report, "T2", None, "unlabelled images")
    assert "M009_T1.csv" in reason(report, "T1", None, "no label file")


def test_bp4d_default_aus_need_every_column(bp4d, tmp_path):
    """The field's 12 AUs by default: a file without them is left out, naming the AUs missing."""
    report = import_bp4d(str(bp4d), str(tmp_path / "out"))
    assert report.frames == 0 and not (tmp_path / "out" / "bp4d.tsv").exists()
    assert "AU6, AU7" in reason(report, "F001_T1.csv", 1, "missing AU column")
    assert (tmp_path / "out" / REPORT_NAME).is_file()


@pytest.fixture
def affwild2(tmp_path) -> Path:
    """The challenge's annotation folders and crops, with -1 lines, a missing crop, a crop without
    a line, a two-person video, blank lines and CRLF."""
    root = tmp_path / "Aff-Wild2"
    challenge = root / "Third ABAW Annotations" / "AU_Detection_Challenge"
    crops = root / "cropped_aligned"
    text(challenge / "Train_Set" / "video1.txt",
         "AU1,AU2,AU4,AU6\r\n"   # 1
         "1,0,0,1\r\n"           # 2 frame 1
         "-1,-1,-1,-1\r\n"       # 3 frame 2: not annotated
         "0,1,-1,0\r\n"          # 4 frame 3
         "\r\n"                  # 5 not a frame
         "0,0,1,0\r\n"           # 6 frame 4: no crop
         "1,1,1,1\r\n"           # 7 frame 5
         "0,2,0,0\r\n"           # 8 frame 6: malformed AU2
         "\r\n")                 # 9
    frames(crops / "video1", *(f"{k:05d}.jpg" for k in (1, 2, 3, 5, 6, 7, 9)))
    text(challenge / "Train_Set" / "10-60-1280x720_left.txt", "AU4,AU1,AU2\n1,0,0\n0,1,1\n")
    text(challenge / "Train_Set" / "10-60-1280x720_right.txt", "AU1,AU2,AU4\n0,0,0\n1,1,-1\n")
    frames(crops / "10-60-1280x720_left", "00001.jpg", "00002.jpg")
    frames(crops / "10-60-1280x720_right", "00001.jpg", "00002.jpg")
    text(challenge / "Validation_Set" / "video2.txt", "\ufeffAU1,AU2,AU4,AU6\n0,0,1,1\n")
    frames(crops / "video2", "00001.jpg")
    text(challenge / "Validation_Set" / "video3.txt", "AU1,AU2,AU4\n0,0,0\n")  # no crops
    text(challenge / "Validation_Set" / "video5.txt", "AU1,AU2\n0,0\n")  # no AU4
    frames(crops / "video5", "00001.jpg")
    frames(crops / "video4", "00001.jpg")  # a video of another challenge track
    return root


def test_affwild2_every_label_in_its_row_and_column(affwild2, tmp_path):
    out = tmp_path / "out"
    report = import_affwild2(str(affwild2), str(out), aus=AUS)
    crops = affwild2 / "cropped_aligned"
    left, right = "10-60-1280x720_left", "10-60-1280x720_right"
    assert table(out / "affwild2.tsv", AUS, "split") == {
        ("video1", "video1", 1): (str(crops / "video1" / "00001.jpg"), "train", 1, 0, 0),
        ("video1", "video1", 3): (str(crops / "video1" / "00003.jpg"), "train", 0, 1, U),
        ("video1", "video1", 5): (str(crops / "video1" / "00005.jpg"), "train", 1, 1, 1),
        (left, "10-60-1280x720", 1): (str(crops / left / "00001.jpg"), "train", 0, 0, 1),
        (left, "10-60-1280x720", 2): (str(crops / left / "00002.jpg"), "train", 1, 1, 0),
        (right, "10-60-1280x720", 1): (str(crops / right / "00001.jpg"), "train", 0, 0, 0),
        (right, "10-60-1280x720", 2): (str(crops / right / "00002.jpg"), "train", 1, 1, U),
        ("video2", "video2", 1): (str(crops / "video2" / "00001.jpg"), "validation", 0, 0, 1),
    }
    assert report.frames == 8 and report.sequences == 4  # (subject, sequence): each person counts
    assert report.subjects == {left: 2, right: 2, "video1": 3, "video2": 1}


def test_affwild2_every_fault_is_a_report_row(affwild2, tmp_path):
    report = import_affwild2(str(affwild2), str(tmp_path / "out"), aus=AUS)
    assert rows(report) == {
        ("video1.txt", 8, "malformed"),
        ("video1.txt", None, "unannotated"),
        ("video1.txt", None, "no image"),
        ("video1.txt", None, "unlabelled images"),
        ("video1.txt", None, "blank lines"),
        ("video3.txt", None, "no image folder"),
        ("video5.txt", 1, "missing AU column"),
        ("cropped_aligned", None, "no label file"),
    }
    assert len(report.skipped) == 8
    assert reason(report, "video1.txt", 8, "malformed") == "malformed: frame 6: column 2 (AU2): '2' is not 0, 1 or -1"
    assert reason(report, "video1.txt", None, "unannotated") == "unannotated: 1 lines where every AU is -1 (lines 3)"
    assert "1 annotated frames have no image" in reason(report, "video1.txt", None, "no image")
    assert "(lines 6)" in reason(report, "video1.txt", None, "no image")
    assert "2 images" in reason(report, "video1.txt", None, "unlabelled images")
    assert "(frames 7, 9)" in reason(report, "video1.txt", None, "unlabelled images")
    assert "(lines 5)" in reason(report, "video1.txt", None, "blank lines")
    assert "AU4" in reason(report, "video5.txt", 1, "missing AU column")
    assert "1 video folders" in reason(report, "cropped_aligned", None, "no label file")
    assert "video4" in reason(report, "cropped_aligned", None, "no label file")


def test_write_frames_extra_columns_keep_the_old_form(tmp_path):
    """Without ``extra`` the manifest is as before; with it the columns come after ``frame``."""
    report = ImportReport("x", str(tmp_path), AUS)
    row = FrameRow("a.jpg", "s", "q", 1, (1, 0, U), extra={"split": "train"})
    write_frames(tmp_path / "a.tsv", [row], AUS, report)
    assert (tmp_path / "a.tsv").read_text().splitlines()[0] == "image\tsubject\tsequence\tframe\tAU1\tAU2\tAU4"
    write_frames(tmp_path / "b.tsv", [row, FrameRow("b.jpg", "s", "q", 0, (0, 0, 0))], AUS, report, extra=("split",))
    assert (tmp_path / "b.tsv").read_text().splitlines() == [
        "image\tsubject\tsequence\tframe\tsplit\tAU1\tAU2\tAU4", "b.jpg\ts\tq\t0\t\t0\t0\t0",
        "a.jpg\ts\tq\t1\ttrain\t1\t0\t999"]


def test_import_command_end_to_end(bp4d, affwild2, tmp_path, capsys):
    main(["import", "bp4d", "--root", str(bp4d), "--out", str(tmp_path / "b"), "--aus", "[1, 2, 4]"])
    said = capsys.readouterr().out
    assert "BP4D: 5 labelled frames of 2 subjects" in said and "F001_T1.csv:7: no image" in said
    assert len(read_manifest(tmp_path / "b" / "bp4d.tsv", aus=AUS)) == 5
    main(["import", "affwild2", "--root", str(affwild2), "--out", str(tmp_path / "a"), "--aus", "[1,2,4]"])
    assert "Aff-Wild2: 8 labelled frames" in capsys.readouterr().out
    assert read_manifest(tmp_path / "a" / "affwild2.tsv", aus=AUS).extra["split"].count("validation") == 1


def test_import_command_exits_1_when_nothing_is_imported(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["import", "affwild2", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    said = capsys.readouterr()
    assert "no label files" in said.out and "no frame imported" in said.err
    assert json.loads((tmp_path / "o" / REPORT_NAME).read_text())["frames"] == 0


def test_import_command_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["import", "--help"])
    assert e.value.code == 0
    said = capsys.readouterr().out
    assert "bp4d" in said and "affwild2" in said
    with pytest.raises(SystemExit) as e:
        main(["import", "bp4d", "--help"])
    assert e.value.code == 0
    said = capsys.readouterr().out
    for option in ("--root", "--out", "--aus"):
        assert option in said
    assert "image folders are found anywhere below it" in " ".join(said.split()) and "Args:" not in said
