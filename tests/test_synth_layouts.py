"""SynthAU as BP4D, DISFA and Aff-Wild2 ship: the files where each layout has them, label files read
by their published format (not by the project's importers) agreeing with truth.jsonl, determinism,
the protocols' subject ids, DISFA's videos as long as their label files, one face per subject."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.io.folds import PROTOCOLS
from datamodules.io.manifest import BP4D_AUS, DISFA_AUS
from datamodules.synthau import layouts
from datamodules.synthau.layouts import (AUEvent, LayoutSettings, facs_level, label_intensity, layout_subjects,
                                         render_layout, sample_events)
from experiments.cli import main

AFFWILD2_AUS = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)
BP4D_HEADER_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 22, 23, 24, 27, 28)
TINY = {
    "bp4d": LayoutSettings("bp4d", seed=1, subjects=3, sequences=2, frames=5, width=128, height=96),
    "disfa": LayoutSettings("disfa", seed=1, subjects=4, frames=6, width=128, height=96, fps=10),
    "affwild2": LayoutSettings("affwild2", seed=1, subjects=4, frames=6, width=128, height=96, crop=48),
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    for layout, settings in TINY.items():
        render_layout(base / layout, settings, workers=1)
    return {layout: base / layout for layout in TINY}


def _truth(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "truth.jsonl").read_text().splitlines()]


def _label_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".csv", ".txt", ".jsonl")}


# ----------------------------------------------------------------------------------------------
# Files where BENCHMARK_LAYOUTS.md says, read as it says


def test_bp4d_files_and_labels(trees):
    root = trees["bp4d"]
    truth = defaultdict(dict)
    for r in _truth(root):
        truth[(r["subject"], r["sequence"])][r["frame"]] = r
    subjects = layout_subjects("bp4d", 3)
    assert set(subjects) == {"F001", "M011", "F007"}  # one from each part of the protocol
    unknown = 0
    for subject in subjects:
        for task in ("T1", "T2"):
            with open(root / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv", newline="") as f:
                rows = list(csv.reader(f))
            header = rows[0]
            assert header[0] == "0" and [int(a) for a in header[1:]] == list(BP4D_HEADER_AUS)
            assert set(BP4D_AUS) <= {int(a) for a in header[1:]}
            column = {int(a): i for i, a in enumerate(header) if i}  # AUs by header name
            images = sorted((root / "Sequences" / subject / task).glob("*.jpg"))
            assert all(len(p.stem) == 4 and p.stem.isdigit() for p in images)  # zero-padded to 4 digits
            on_disk = {int(p.stem) for p in images}
            coded = [int(row[0]) for row in rows[1:]]
            assert len(coded) == 5 and coded == list(range(coded[0], coded[0] + 5))
            assert set(coded) < on_disk and len(on_disk - set(coded)) == 3  # frames outside the coded segment
            assert set(truth[(subject, task)]) == set(coded)
            for row in rows[1:]:
                t = truth[(subject, task)][int(row[0])]
                assert (root / t["image"]).is_file() and int(Path(t["image"]).stem) == int(row[0])
                for au, i in column.items():
                    value = int(row[i])
                    assert value in (0, 1, 9) and value == t["labels"][str(au)]
                    unknown += value == 9
                    if value != 9:
                        assert value == int(t["intensity"][str(au)] > 0)
            for au in (11, 13, 16, 22, 27):  # coded in BP4D, never drawn
                assert {row[column[au]] for row in rows[1:]} <= {"0", "9"}
    assert unknown > 0


def test_disfa_files_labels_and_videos(trees):
    root = trees["disfa"]
    truth = defaultdict(dict)
    for r in _truth(root):
        truth[r["subject"]][r["frame"]] = r
    summary = json.loads((root / "synthau_layout.json").read_text())
    subjects = layout_subjects("disfa", 4)
    assert summary["subjects"] == subjects and "SN010" in subjects
    assert summary["quirks"]["short_subject"] == "SN010"  # as in the field's lists
    for subject in subjects:
        lengths = set()
        for au in DISFA_AUS:
            lines = (root / "ActionUnit_Labels" / subject / f"{subject}_au{au}.txt").read_text().splitlines()
            lengths.add(len(lines))
            for k, line in enumerate(lines, start=1):
                frame, intensity = line.split(",")
                assert int(frame) == k and 0 <= int(intensity) <= 5
                assert int(intensity) == truth[subject][k]["labels"][str(au)] == truth[subject][k]["intensity"][str(au)]
        (n,) = lengths
        assert n == len(truth[subject]) == (5 if subject == "SN010" else 6)
        for path in (root / "Videos_LeftCamera" / f"LeftVideo{subject}_comp.avi",
                     root / "Video_RightCamera" / f"RightVideo{subject}_Comp.avi"):
            video = cv2.VideoCapture(str(path))
            frames = []
            while True:
                ok, frame = video.read()
                if not ok:
                    break
                frames.append(frame.shape)
            video.release()
            assert frames and set(frames) == {(96, 128, 3)}
            assert len(frames) == n + (subject == "SN010")  # the short subject's last frame has no label
    # the two cameras see the same frames from two places
    left = cv2.VideoCapture(str(root / "Videos_LeftCamera" / "LeftVideoSN002_comp.avi")).read()[1]
    right = cv2.VideoCapture(str(root / "Video_RightCamera" / "RightVideoSN002_Comp.avi")).read()[1]
    assert np.abs(left.astype(int) - right).mean() > 2


def test_affwild2_files_and_labels(trees):
    root = trees["affwild2"]
    truth = defaultdict(dict)
    for r in _truth(root):
        truth[r["subject"]][r["frame"]] = r
    challenge = root / "3rd_ABAW_Annotations" / "AU_Detection_Challenge"
    files = {p.stem: p for split in ("Train_Set", "Validation_Set") for p in (challenge / split).glob("*.txt")}
    assert {p.parent.name for p in files.values()} == {"Train_Set", "Validation_Set"}
    assert set(files) == set(truth)
    pairs = [s[:-5] for s in files if s.endswith("_left")]
    assert len(pairs) == 1 and f"{pairs[0]}_right" in files  # one two-person video
    unannotated = missing = 0
    for stem, path in files.items():
        lines = path.read_text().splitlines()
        assert lines[0] == ",".join(f"AU{a}" for a in AFFWILD2_AUS)
        for k, line in enumerate(lines[1:], start=1):
            values = [int(v) for v in line.split(",")]
            t = truth[stem][k]
            assert values == [t["labels"][str(a)] for a in AFFWILD2_AUS]
            if values == [-1] * 12:
                unannotated += 1
            else:
                assert set(values) <= {0, 1}
                assert values == [int(t["intensity"][str(a)] > 0) for a in AFFWILD2_AUS]
            crop = root / "cropped_aligned" / stem / f"{k:05d}.jpg"
            assert crop.is_file() == (t["image"] is not None)
            if crop.is_file():
                assert cv2.imread(str(crop)).shape == (48, 48, 3)
            else:
                missing += 1
        assert len(lines) - 1 == 6
    assert unannotated > 0 and missing > 0


# ----------------------------------------------------------------------------------------------
# Labels follow what was drawn; subjects, identities, determinism


@pytest.mark.parametrize("layout", sorted(TINY))
def test_labels_follow_the_rendered_intensities(trees, layout):
    rows = _truth(trees[layout])
    for r in rows:
        drawn = {int(k): v for k, v in r["rendered"].items()}
        assert all(facs_level(v) > 0 for v in drawn.values())  # nothing below level A is drawn
        for au, level in r["intensity"].items():
            assert level == facs_level(label_intensity(drawn, r["unilateral"], int(au)))
        if "7" in r["intensity"]:
            assert r["intensity"]["7"] == max(r["intensity"].get("6", 0), facs_level(drawn.get(4, 0.0)))
    positives = sum(any(v > 0 for v in r["intensity"].values()) for r in rows)
    assert positives > 0.3 * len(rows)  # AUs are frequent enough to learn from


@pytest.mark.parametrize("layout", sorted(TINY))
def test_subjects_and_identities(trees, layout):
    rows = _truth(trees[layout])
    identity = defaultdict(set)
    for r in rows:
        identity[r["subject"]].add(r["identity"])
    assert all(len(ids) == 1 for ids in identity.values())  # one face per subject
    assert len({min(ids) for ids in identity.values()}) == len(identity)  # a face per subject
    if layout != "affwild2":
        published = set(PROTOCOLS[f"{layout}-3fold"].subjects)
        assert set(identity) <= published
        parts = PROTOCOLS[f"{layout}-3fold"].parts
        assert all(set(identity) & set(part) for part in parts)  # every fold has test subjects


def test_same_seed_same_bytes_rerun_does_nothing(trees, tmp_path):
    for layout, settings in TINY.items():
        again = render_layout(tmp_path / layout, settings, workers=2)
        assert _label_files(tmp_path / layout) == _label_files(trees[layout]), layout
        assert again == json.loads((trees[layout] / "synthau_layout.json").read_text())
    marker = tmp_path / "bp4d" / "synthau_layout.json"
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "bp4d").rglob("*")}
    assert render_layout(tmp_path / "bp4d", TINY["bp4d"]) == json.loads(marker.read_text())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "bp4d").rglob("*")} == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TINY)  # no temporary folder left
    other = LayoutSettings("affwild2", seed=2, subjects=2, frames=4, width=96, height=72, crop=32)
    render_layout(tmp_path / "other", other, workers=1)
    assert _truth(tmp_path / "other") != _truth(trees["affwild2"])[:len(_truth(tmp_path / "other"))]


def test_interrupted_render_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = layouts.render_posed_scene

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second task (7 frames each)
            raise KeyboardInterrupt  # as if killed mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(layouts, "render_posed_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        render_layout(tmp_path / "d", LayoutSettings("bp4d", subjects=2, sequences=1, frames=4, width=64, height=64),
                      workers=1)
    assert calls["n"] == 9 and list(tmp_path.iterdir()) == []


def test_settings_are_checked(tmp_path):
    for bad in (LayoutSettings("ck+"), LayoutSettings("bp4d", subjects=42), LayoutSettings("disfa", sequences=2),
                LayoutSettings("bp4d", sequences=9), LayoutSettings("affwild2", frames=2)):
        with pytest.raises(ValueError):
            bad.resolved()
    assert LayoutSettings("disfa").resolved().subjects == 27 and LayoutSettings("bp4d").resolved().subjects == 41
    assert sorted(layout_subjects("bp4d")) == sorted(PROTOCOLS["bp4d-3fold"].subjects)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a rendered tree")
    with pytest.raises(FileExistsError):
        render_layout(tmp_path / "mine", LayoutSettings("bp4d", subjects=1, sequences=1, frames=4))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a rendered tree"


def test_events_rise_hold_and_fall():
    event = AUEvent(start=2, onset=3, apex=2, offset=3, peak={12: 0.9})
    w = [event.weight(t) for t in range(12)]
    assert w[:2] == [0, 0] and w[2] < w[3] < w[4] < w[5] == w[6] == 1 and w[6] > w[7] > w[8] > w[9] and w[10] == 0
    rng = np.random.default_rng(0)
    active = []
    for _ in range(50):
        events = sample_events(rng, 20)
        assert len(events) >= 2 and all(e.peak and not set(e.peak) & set(range(51, 57)) for e in events)
        active += [any(e.weight(t) > 0 for e in events) for t in range(20)]
    assert 0.4 < np.mean(active) < 1.0


@pytest.mark.slow  # the command imports Lightning
def test_synth_command_with_a_layout(tmp_path, capsys):
    main(["synth", "--layout", "disfa", "--root", str(tmp_path / "d"), "--subjects", "2", "--frames", "4",
          "--width", "64", "--height", "64", "--workers", "1"])
    out = capsys.readouterr().out
    assert f"au-detect import disfa --root {tmp_path / 'd'}" in out
    assert (tmp_path / "d" / "ActionUnit_Labels" / "SN002" / "SN002_au1.txt").is_file()
