"""SynthAU video clips: a truth line per decoded frame, a crossing and an exit-and-return in every
clip with stable person ids, truth boxes that MTCNN agrees with, labels that follow the levels,
determinism, interrupted renders redone and complete ones kept, truth files read strictly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.alignment.align import FaceDetector, box_iou
from datamodules.io.manifest import EMOTIONET_AUS, au_column_name
from datamodules.synthau import video
from datamodules.synthau.layouts import facs_level, label_intensity
from datamodules.synthau.scene import render_posed_scene
from datamodules.synthau.video import SUMMARY, VIDEO_VERSION, VideoSettings, read_truth, render_videos
from experiments.cli import main

from .training_helpers import SMALL_ALIGNMENT

SMALL = VideoSettings(clips=2, people=(2, 3), seconds=3.0, fps=8.0, width=320, height=240, seed=1)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video") / "clips"
    render_videos(root, SMALL, workers=1)
    return root


def _summary(root: Path) -> dict:
    return json.loads((root / SUMMARY).read_text())


def _frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def _overlap(a: list[float], b: list[float]) -> bool:
    return box_iou(a, b) > 0


def _visible(row: dict) -> dict[int, dict]:
    return {p["person"]: p for p in row["people"] if p["visible"]}


# ----------------------------------------------------------------------------------------------
# What is on disk, and what it shows


def test_a_truth_line_per_decoded_frame(rendered):
    summary = _summary(rendered)
    assert summary["settings"]["version"] == VIDEO_VERSION and summary["totals"]["clips"] == 2
    names = []
    for clip in summary["clips"]:
        frames = _frames(rendered / clip["video"])
        rows = read_truth(rendered / clip["truth"])
        assert len(frames) == len(rows) == clip["frames"] == 24
        assert {f.shape for f in frames} == {(240, 320, 3)}
        assert [r["frame"] for r in rows] == list(range(24))
        assert [r["time_s"] for r in rows] == [t / 8 for t in range(24)]
        assert cv2.VideoCapture(str(rendered / clip["video"])).get(cv2.CAP_PROP_FPS) == 8
        names += [clip["video"], clip["truth"]]
    # nothing but the clips and the summary: no temporary file left
    assert sorted(p.name for p in rendered.iterdir()) == sorted(names + [SUMMARY])


def test_every_clip_has_a_crossing_and_an_exit_and_return(rendered):
    identities_per_clip = []
    for clip in _summary(rendered)["clips"]:
        rows = read_truth(rendered / clip["truth"])
        identity = {}
        for r in rows:
            for p in r["people"]:
                assert identity.setdefault(p["person"], p["identity"]) == p["identity"]  # a person keeps its face
        assert len(identity) >= 2 and len(set(identity.values())) == len(identity)
        identities_per_clip.append(set(identity.values()))
        # a crossing: two visible boxes overlap; the summary counts those frames
        crossing = [t for t, r in enumerate(rows)
                    if any(_overlap(a["box"], b["box"]) for i, a in enumerate(_visible(r).values())
                           for b in list(_visible(r).values())[i + 1:])]
        assert crossing and len(crossing) == clip["crossings"]
        # an exit and return: visible, then not in the frame at all for 1 s or more, then visible again
        returned = []
        for person in identity:
            listed = [person in {p["person"] for p in r["people"]} for r in rows]
            seen = [person in _visible(r) for r in rows]
            for t in range(1, len(rows)):
                gone = 0
                while t + gone < len(rows) and not listed[t + gone]:
                    gone += 1
                if any(seen[:t]) and gone >= SMALL.fps and any(seen[t + gone:]):
                    returned.append(person)
        assert returned, clip
        stats = {p["person"]: p for p in clip["people"]}
        assert all(stats[p]["exits"] and stats[p]["returns"] and stats[p]["longest_absence_s"] >= 1.0
                   for p in returned)
    assert not identities_per_clip[0] & identities_per_clip[1]  # no face in two clips


def test_every_plan_holds_a_crossing_and_an_exit_and_return(tmp_path):
    """Over many clips at the shortest length and lowest frame rate allowed (tiny frames: cheap)."""
    summary = render_videos(tmp_path / "many", VideoSettings(clips=8, people=(2, 4), seconds=3.0, fps=5.0, width=160,
                                                             height=120, seed=7), workers=1)
    assert {len(c["people"]) for c in summary["clips"]} >= {2, 4}
    for clip in summary["clips"]:
        assert clip["crossings"] > 0, clip
        assert any(p["exits"] and p["returns"] and p["longest_absence_s"] >= 1.0 for p in clip["people"]), clip
    assert len({p["identity"] for c in summary["clips"] for p in c["people"]}) == summary["totals"]["people"]


def test_the_nearer_face_is_drawn_over_the_farther(rendered):
    checked = 0
    for clip in _summary(rendered)["clips"]:
        for r in read_truth(rendered / clip["truth"]):
            shown = list(_visible(r).values())
            for a in shown:
                for b in shown:
                    area = [(p["box"][2] - p["box"][0]) * (p["box"][3] - p["box"][1]) for p in (a, b)]
                    if _overlap(a["box"], b["box"]) and area[0] > 1.5 * area[1]:
                        assert b["occluded"] > 0
                        checked += 1
    assert checked > 0


def test_truth_boxes_agree_with_mtcnn(rendered):
    """Faces wholly in the picture and not hidden behind another are found where the truth puts them."""
    detector = FaceDetector(SMALL_ALIGNMENT)
    matched, total = 0, 0
    for clip in _summary(rendered)["clips"]:
        frames = _frames(rendered / clip["video"])
        rows = read_truth(rendered / clip["truth"])
        picked = list(range(0, len(frames), 3))
        found = detector.detect([cv2.cvtColor(frames[t], cv2.COLOR_BGR2RGB) for t in picked])
        for t, detections in zip(picked, found):
            for p in _visible(rows[t]).values():
                if p["occluded"] > 0.2 or p["in_frame"] < 1:
                    continue
                total += 1
                matched += max((box_iou(b, p["box"]) for b in detections.boxes), default=0) >= 0.5
    assert total >= 20
    assert matched >= 0.8 * total, (matched, total)


def test_levels_and_labels_follow_the_drawn_intensity(rendered):
    names = [au_column_name(a) for a in EMOTIONET_AUS]
    active = set()
    for clip in _summary(rendered)["clips"]:
        for r in read_truth(rendered / clip["truth"]):
            for p in r["people"]:
                assert list(p["levels"]) == names and list(p["labels"]) == names
                drawn = {int(k[2:]): v for k, v in p["intensity"].items()}
                assert all(facs_level(v) >= 1 for v in drawn.values())  # nothing under level A is drawn
                for au, name in zip(EMOTIONET_AUS, names):
                    assert p["levels"][name] == facs_level(label_intensity(drawn, p["unilateral"], au))
                    assert p["labels"][name] == int(p["levels"][name] >= 1)
                active |= {(clip["clip"], p["person"], name) for name in names if p["labels"][name]}
    assert len(active) >= 5  # AU events happen


# ----------------------------------------------------------------------------------------------
# Determinism, reruns, interruptions, reading


def _count_renders(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return render_posed_scene(*args, **kwargs)

    monkeypatch.setattr(video, "render_posed_scene", counting)
    return calls


def test_same_seed_same_clips_and_a_rerun_does_nothing(rendered, tmp_path, monkeypatch):
    again = render_videos(tmp_path / "again", SMALL, workers=2)
    assert again == _summary(rendered)
    for clip in again["clips"]:
        assert (tmp_path / "again" / clip["truth"]).read_bytes() == (rendered / clip["truth"]).read_bytes()
        ours, theirs = _frames(tmp_path / "again" / clip["video"]), _frames(rendered / clip["video"])
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "again").iterdir()}
    calls = _count_renders(monkeypatch)
    assert render_videos(tmp_path / "again", SMALL) == again
    assert calls["n"] == 0 and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "again").iterdir()} == stamp
    other = render_videos(tmp_path / "other", replace(SMALL, seed=2, clips=1), workers=1)
    first = "clip_000.truth.jsonl"
    assert other["settings"]["seed"] == 2
    assert (tmp_path / "other" / first).read_bytes() != (rendered / first).read_bytes()


def test_an_interrupted_render_is_redone(rendered, tmp_path, monkeypatch):
    root = tmp_path / "clips"
    calls = {"n": 0}

    def dies_in_the_second_clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:  # one call a frame, 24 a clip: the second clip's 6th frame
            raise KeyboardInterrupt  # as if killed mid-way
        return render_posed_scene(*args, **kwargs)

    monkeypatch.setattr(video, "render_posed_scene", dies_in_the_second_clip)
    with pytest.raises(KeyboardInterrupt):
        render_videos(root, SMALL, workers=1)
    assert sorted(p.name for p in root.iterdir()) == ["clip_000.avi", "clip_000.truth.jsonl"]  # no marker, no temp
    (root / ".clip_001.99-0badc0de.tmp.avi").write_bytes(b"half a video")  # what a kill -9 leaves
    calls = _count_renders(monkeypatch)
    summary = render_videos(root, SMALL, workers=1)
    assert calls["n"] > 0 and summary == _summary(rendered)
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in rendered.iterdir())
    for clip in summary["clips"]:
        assert (root / clip["truth"]).read_bytes() == (rendered / clip["truth"]).read_bytes()
    # the marker gone (a render cut short before it) or a file missing: rendered again
    for damage in (lambda: (root / SUMMARY).unlink(), lambda: (root / "clip_001.avi").unlink()):
        damage()
        calls["n"] = 0
        render_videos(root, SMALL, workers=1)
        assert calls["n"] > 0 and (root / SUMMARY).is_file() and (root / "clip_001.avi").is_file()


def test_a_bad_truth_line_is_named(rendered, tmp_path):
    lines = (rendered / "clip_000.truth.jsonl").read_text().splitlines(keepends=True)
    cases = {"broken.truth.jsonl": lines[:2] + ['{"frame": 2, "people": [\n'] + lines[3:],
             "skips.truth.jsonl": lines[:4] + lines[5:],
             "no_box.truth.jsonl": lines[:1] + ['{"frame": 1, "time_s": 0.1, "people": [{"person": 0}]}\n']}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text("".join(text))
        line = {"broken.truth.jsonl": 3, "skips.truth.jsonl": 5, "no_box.truth.jsonl": 2}[name]
        with pytest.raises(ValueError, match=rf"{path.name}, line {line}:"):
            read_truth(path)
    assert len(read_truth(rendered / "clip_000.truth.jsonl")) == 24


def test_settings_and_folders_are_checked(tmp_path):
    for bad in ({"people": (1, 3)}, {"people": (3, 2)}, {"people": (2, 7)}, {"seconds": 2.0}, {"fps": 4.0},
                {"clips": 0}, {"width": 100}, {"quality": 0}):
        with pytest.raises(ValueError):
            replace(SMALL, **bad).checked()
    assert VideoSettings(people=[3, 3]).checked().people == (3, 3)  # as a JSON summary holds them
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a clip")
    with pytest.raises(FileExistsError):
        render_videos(tmp_path / "mine", SMALL)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.slow  # the command imports Lightning
def test_synth_command_renders_videos(tmp_path, capsys):
    root = tmp_path / "v"
    main(["synth", "--video", "true", "--root", str(root), "--clips", "1", "--seconds", "3", "--fps", "5",
          "--width", "160", "--height", "120", "--people", "2", "--workers", "1"])
    out = capsys.readouterr().out
    assert f"SynthAU video in {root}" in out and "1 clips, 2 people, 15 frames" in out
    summary = _summary(root)
    assert summary["settings"]["people"] == [2, 2] and summary["settings"]["fps"] == 5
    assert len(read_truth(root / "clip_000.truth.jsonl")) == len(_frames(root / "clip_000.avi")) == 15
    with pytest.raises(SystemExit, match="a range such as 2-4"):
        main(["synth", "--video", "true", "--root", str(tmp_path / "w"), "--people", "two"])
