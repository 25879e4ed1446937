"""DISFA as distributed to a manifest of JPEG frames with 0/1 occurrence and 0-5 intensity per AU.

DISFA comes as one label file per subject and AU, and one AVI per subject and camera::

    <root>/ActionUnit_Labels/SN001/SN001_au1.txt ... SN001_au26.txt    lines "<frame>,<intensity>"
    <root>/Videos_LeftCamera/LeftVideoSN001_comp.avi
    <root>/Video_RightCamera/RightVideoSN001_Comp.avi

Frame numbers in the label files start at 1: label frame *k* is video frame *k-1*. Folder and
file spellings differ between copies, so files are found anywhere under the root by name
(``SN###_au<n>.txt``, ``(Left|Right)VideoSN###_comp.avi``, any case). Both cameras share the
subject's labels.

Occurrence is intensity >= 2, the field's rule (ME-GraphAU and most work since); AU_R-CNN used
>= 1, hence ``occurrence_threshold``. The intensities themselves are kept in ``AU<n>_intensity``.

Frames are written as ``<out>/frames/<camera>/<SN>/<frame:05d>.jpg``, each under a temporary
name and renamed, and videos are streamed frame by frame. An import that is stopped resumes: a
subject whose frames are all written has a marker (``.import.json`` in its folder, holding the
video's size and mtime and its frame count) and is not decoded again; the subject that was cut
short is decoded again, writing only the frames not yet on disk.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from datamodules.benchmarks.report import FrameRow, ImportReport, write_frames
from datamodules.io import files
from datamodules.io.images import InputError
from datamodules.io.manifest import DISFA_AUS, UNLABELLED
from datamodules.io.sources import video_frames

CAMERAS = ("left", "right")
MANIFEST_NAME = "disfa.tsv"
MARKER_NAME = ".import.json"
OCCURRENCE_THRESHOLD = 2  # the field's rule: intensity B (2) or more is present
MAX_INTENSITY = 5
LABELS_FOLDER = "ActionUnit_Labels"

_LABEL_FILE = re.compile(r"(SN\d{3})_au(\d+)\.txt", re.IGNORECASE)
_VIDEO_FILE = re.compile(r"(left|right)video(SN\d{3})_comp\.avi", re.IGNORECASE)
_NUMBER = re.compile(r"\d+", re.ASCII)

# Per label frame: its intensity per AU (999 unknown), and the first label file and line naming it.
LabelTable = dict[int, tuple[tuple[int, ...], Path, int]]


@dataclass
class AuLabels:
    """One label file as read: the intensity of each frame it names, and the frames it names
    without a usable intensity (a malformed line, conflicting duplicates), unknown for the AU."""

    path: Path
    au: int
    intensity: dict[int, int] = field(default_factory=dict)
    line: dict[int, int] = field(default_factory=dict)  # frame -> first line naming it
    unknown: set[int] = field(default_factory=set)


@dataclass
class SubjectFrames:
    """What the video gave for one subject: the labelled frames whose image is on disk, how many
    frames of the video were seen, and whether the video had to be decoded for it."""

    present: list[int]
    seen: int  # frames of the video up to the last one decoded (exact when every_seen is 1)
    every_seen: int  # the ``every`` that ``seen`` was counted with
    decoded: bool
    complete: bool = True  # False: the video broke off with an error


def import_disfa(root: str, out: str, aus: Sequence[int] = DISFA_AUS, camera: str = "left",
                 occurrence_threshold: int = OCCURRENCE_THRESHOLD, every: int = 1,
                 jpeg_quality: int = 95) -> ImportReport:
    """DISFA's label files and one camera's videos to ``<out>/disfa.tsv``: one row per labelled
    frame (``image, subject, sequence, frame``, 0/1/999 per AU, then the 0-5 intensity per AU),
    its JPEG frames under ``<out>/frames/<camera>/<subject>/`` and ``<out>/import_report.json``,
    which names the file and line of every label or frame left out. Run again after an
    interruption, it decodes only the subject it had not finished.

    Args:
        root: The DISFA folder as distributed (``ActionUnit_Labels/SN001/SN001_au1.txt``...,
            ``Videos_LeftCamera/LeftVideoSN001_comp.avi``...); files are found anywhere under it.
        out: Folder for the manifest, the frames and the report; image paths in the manifest are
            relative to it.
        aus: The AUs to import (DISFA's 12 by default; the field reports 1, 2, 4, 6, 9, 12, 25, 26).
        camera: Which camera's video gives the frames, ``left`` or ``right``; both share the labels.
        occurrence_threshold: An AU is present where its intensity is at least this (0-5 scale). 2
            is the field's rule (ME-GraphAU and others); AU_R-CNN used 1.
        every: Import every n-th frame only (label frames 1, 1+n, 1+2n...); the others are not
            decoded.
        jpeg_quality: JPEG quality of the frames written (1-100).

    Returns:
        The report, also written as ``<out>/import_report.json``; ``frames`` is 0, and no
        manifest written, when no labelled frame had its video frame.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: An argument out of range.
    """
    aus = tuple(int(a) for a in aus)
    _check_arguments(aus, camera, occurrence_threshold, every, jpeg_quality)
    root_path, out_path = Path(root), Path(out)
    if not root_path.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (give the DISFA folder holding {LABELS_FOLDER})")
    report = ImportReport(dataset="DISFA", root=str(root), aus=aus)
    report.notes.update({
        "occurrence": f"AU present (1) where its intensity is >= {occurrence_threshold}, absent (0) below; "
                      f"intensities 0-5 kept in AU<n>_intensity",
        "occurrence_threshold": occurrence_threshold,
        "frame": "the label files' 1-based frame number; label frame k is video frame k-1",
        "camera": camera,
        "every": every,
        "jpeg_quality": jpeg_quality,
    })
    labels, videos = _find_files(root_path, out_path, camera, report)
    rows: list[FrameRow] = []
    decoded: list[str] = []
    reused: list[str] = []
    for subject in sorted(set(labels) | set(videos)):
        subject_labels = labels.get(subject, {})
        video = videos.get(subject)
        if not subject_labels:
            report.skip(video, None, f"no labels: no {subject}_au<n>.txt label file under {root}; video not imported")
            continue
        table = _read_subject(subject, subject_labels, aus, report)
        if not table:
            continue
        if video is None:
            folder = next(iter(subject_labels.values())).parent
            report.skip(folder, None, f"no video: {subject} has labels but no {camera.capitalize()}Video{subject}"
                                      f"_comp.avi under {root}; its frames are not imported")
            continue
        folder = out_path / "frames" / camera / subject
        got = _subject_frames(video, folder, table, every, jpeg_quality, report)
        if got is None:
            continue
        (decoded if got.decoded else reused).append(subject)
        _report_mismatch(subject, video, table, got, report)
        for frame in got.present:
            values = table[frame][0]
            rows.append(FrameRow(
                image=f"frames/{camera}/{subject}/{_frame_name(frame)}", subject=subject, sequence=camera, frame=frame,
                labels=[UNLABELLED if v == UNLABELLED else int(v >= occurrence_threshold) for v in values],
                intensities=list(values)))
    report.notes["subjects_decoded"] = decoded
    report.notes["subjects_from_marker"] = reused
    if rows:  # none: no manifest, and the report says why (frames 0)
        write_frames(out_path / MANIFEST_NAME, rows, aus=aus, report=report, intensity=True)
    report.write(out_path)
    return report


def _check_arguments(aus: tuple[int, ...], camera: str, threshold: int, every: int, quality: int) -> None:
    unknown = [a for a in aus if a not in DISFA_AUS]
    if not aus or unknown or len(set(aus)) != len(aus):
        raise ValueError(f"aus: {list(aus)} is not a set of DISFA's AUs {list(DISFA_AUS)}")
    if camera not in CAMERAS:
        raise ValueError(f"camera: {camera!r} is not one of {', '.join(CAMERAS)}")
    if not 1 <= threshold <= MAX_INTENSITY:
        raise ValueError(f"occurrence_threshold: {threshold} is not an intensity 1-{MAX_INTENSITY}")
    if every < 1:
        raise ValueError(f"every: {every} is not at least 1")
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_quality: {quality} is not within 1-100")


def _find_files(root: Path, out: Path, camera: str, report: ImportReport
                ) -> tuple[dict[str, dict[int, Path]], dict[str, Path]]:
    """Label files by subject and AU, and the camera's video by subject, from anywhere under the
    root; a second file for the same subject and AU (or camera) is reported and not used."""
    labels: dict[str, dict[int, Path]] = {}
    videos: dict[str, Path] = {}
    out_real = os.path.realpath(out)

    def unlisted(e: OSError) -> None:
        report.skip(e.filename or root, None, f"unreadable folder: {e.strerror or e}")

    for folder, dirs, names in os.walk(root, onerror=unlisted):
        # The output's own frames (out inside root) are not searched.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) != out_real)
        for name in sorted(names):
            path = Path(folder) / name
            if m := _LABEL_FILE.fullmatch(name):
                subject, au = m.group(1).upper(), int(m.group(2))
                first = labels.setdefault(subject, {}).setdefault(au, path)
            elif (m := _VIDEO_FILE.fullmatch(name)) and m.group(1).lower() == camera:
                subject = m.group(2).upper()
                first = videos.setdefault(subject, path)
            else:
                continue
            if first != path:
                report.skip(path, None, f"duplicate file: {first} is used for {subject}")
    return labels, videos


def read_au_file(path: Path, au: int, report: ImportReport) -> AuLabels | None:
    """One ``<frame>,<intensity>`` label file; BOM, CRLF, blank lines and spaces around values
    are taken. Each malformed line or repeated frame is a report row naming the line, and its
    frame is unknown (999) for the AU; None (reported) when the file cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        report.skip(path, None, f"unreadable label file: {e.strerror or e}; AU{au} unknown (999) for the subject")
        return None
    labels = AuLabels(path, au)
    # Lines end at "\n" only (a stray "\r" is stripped), so line numbers are an editor's.
    for number, line in enumerate(data.decode("utf-8-sig", errors="replace").split("\n"), 1):
        text = line.strip()
        if not text:
            continue
        frame, intensity, problem = _parse_line(text)
        if frame is not None and frame in labels.line:
            _duplicate(labels, frame, intensity, number, report)
            continue
        if frame is not None:
            labels.line[frame] = number
        if problem is not None:
            which = f"frame {frame}" if frame is not None else "its frame"
            report.skip(path, number, f"malformed line: {problem}; {which} unknown (999) for AU{au}")
            if frame is not None:
                labels.unknown.add(frame)
        else:
            labels.intensity[frame] = intensity
    return labels


def _parse_line(text: str) -> tuple[int | None, int | None, str | None]:
    """``(frame, intensity, problem)`` of a non-blank line; the frame is kept where only the
    intensity is wrong, so that frame alone becomes unknown."""
    cells = [c.strip() for c in text.split(",")]
    frame = int(cells[0]) if _NUMBER.fullmatch(cells[0]) and int(cells[0]) >= 1 else None
    if frame is None:
        return None, None, f"column 1 (frame): {cells[0][:40]!r} is not a frame number (1, 2, ...)"
    if len(cells) != 2:
        return frame, None, f"{text[:60]!r} has {len(cells)} comma-separated values, expected <frame>,<intensity>"
    if not _NUMBER.fullmatch(cells[1]) or int(cells[1]) > MAX_INTENSITY:
        return frame, None, f"column 2 (intensity): {cells[1][:40]!r} is not an intensity 0-{MAX_INTENSITY}"
    return frame, int(cells[1]), None


def _duplicate(labels: AuLabels, frame: int, intensity: int | None, number: int, report: ImportReport) -> None:
    first = labels.line[frame]
    before = labels.intensity.get(frame)
    if before is not None and before == intensity:
        report.skip(labels.path, number, f"duplicate frame: frame {frame} again (first on line {first}), "
                                         f"same intensity {intensity}; kept")
        return
    said = "an unreadable intensity" if intensity is None else f"intensity {intensity}"
    first_said = f"intensity {before}" if before is not None else "no usable intensity"
    report.skip(labels.path, number, f"duplicate frame: frame {frame} again with {said} (line {first}: "
                                     f"{first_said}); unknown (999) for AU{labels.au}")
    labels.intensity.pop(frame, None)
    labels.unknown.add(frame)


def _read_subject(subject: str, paths: dict[int, Path], aus: tuple[int, ...], report: ImportReport
                  ) -> LabelTable:
    """Per frame named by any of the subject's label files: its intensity per AU (999 unknown),
    and the first label file and line naming it (for the report)."""
    folder = next(iter(paths.values())).parent
    per_au: list[AuLabels | None] = []
    for au in aus:
        path = paths.get(au)
        if path is None:
            report.skip(folder / f"{subject}_au{au}.txt", None,
                        f"missing AU file: AU{au} unknown (999) for every frame of {subject}")
            per_au.append(None)
        else:
            per_au.append(read_au_file(path, au, report))
    read = [a for a in per_au if a is not None]
    frames = sorted(set().union(*(a.line for a in read)))
    for a in read:
        if not a.line:
            report.skip(a.path, None, f"empty label file: no <frame>,<intensity> line; AU{a.au} unknown (999) "
                                      f"for {subject}")
            continue
        gaps = [f for f in frames if f not in a.line]
        if gaps:
            report.skip(a.path, None, f"frames missing from the file: {len(gaps)} frame(s) of {subject} named by "
                                      f"its other label files (first: {gaps[0]}); unknown (999) for AU{a.au}")
    table: LabelTable = {}
    for f in frames:
        named = next(a for a in read if f in a.line)
        table[f] = (tuple(UNLABELLED if a is None else a.intensity.get(f, UNLABELLED) for a in per_au),
                    named.path, named.line[f])
    return table


def _subject_frames(video: Path, folder: Path, table: LabelTable, every: int, quality: int,
                    report: ImportReport) -> SubjectFrames | None:
    """The subject's labelled frames on disk, decoding the video only where some are not: a
    marker says all are there; without it, frames already on disk are kept (only the subject an
    interruption cut short has some) and the video is decoded to write the rest."""
    wanted = {f for f in table if (f - 1) % every == 0}
    try:
        st = video.stat()
    except OSError as e:
        report.skip(video, None, f"unreadable video: {e.strerror or e}")
        return None
    identity = {"video": video.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "jpeg_quality": quality}
    marker = _read_marker(folder)
    if marker is not None and any(marker.get(k) != v for k, v in identity.items()):
        _remove_frames(folder)  # written from another video, or at another quality
        marker = None
    if (marker is not None and marker.get("complete") is True and isinstance(marker.get("frames"), int)
            and isinstance(marker.get("every"), int) and marker["every"] >= 1 and every % marker["every"] == 0):
        # The frames decoded with every m-th are those decoded with every n-th when m divides n.
        present = sorted(f for f in wanted if f - 1 < marker["frames"])
        if all(_on_disk(folder / _frame_name(f)) for f in present):
            return SubjectFrames(present, marker["frames"], marker["every"], decoded=False)

    for tmp in folder.glob(".*.tmp"):  # a frame a stopped run had not renamed yet
        tmp.unlink(missing_ok=True)
    written: list[Path] = []
    present = []
    seen = 0
    try:
        # Frames other than every n-th are only grabbed; each decoded frame is dropped once written.
        for index, _, rgb in video_frames(str(video), every):
            seen = index + 1
            if seen not in wanted:
                continue
            path = folder / _frame_name(seen)
            if not _on_disk(path):
                if not written:  # frames from now on are of this video and quality, even if stopped
                    files.write_text(folder / MARKER_NAME, json.dumps({**identity, "complete": False}) + "\n")
                write_jpeg(path, rgb, quality)
                written.append(path)
            present.append(seen)
    except InputError as e:
        report.skip(video, None, f"unreadable video: {e}")
        later = sorted(f for f in wanted if f > seen)
        if later and present:
            report.skip(video, None, f"not decoded: {len(later)} labelled frame(s) from frame {later[0]} on, "
                                     f"after the error above; the frames before it are imported")
        return SubjectFrames(present, seen, every, decoded=True, complete=False)
    for path in written:  # on the disk before the marker that says they are
        files.sync(path)
    files.write_text(folder / MARKER_NAME, json.dumps({**identity, "complete": True, "frames": seen,
                                                       "every": every, "written": len(present)}) + "\n")
    return SubjectFrames(present, seen, every, decoded=True)


def _report_mismatch(subject: str, video: Path, table: LabelTable, got: SubjectFrames, report: ImportReport) -> None:
    """Label lines past the video's end (one row each, naming a label file and line) and video
    frames past the labels' end (one row)."""
    if not got.complete:
        return
    # With every n-th frame decoded, frames up to seen + n - 2 may exist undecoded; past that none does.
    end = got.seen + got.every_seen - 1
    for f in table:
        if f - 1 >= end:
            _, path, line = table[f]
            report.skip(path, line, f"no frame in the video: frame {f} of {subject} (video frame {f - 1}); "
                                    f"{video.name} has {_count(got)} frames")
    last = max(table)
    if got.seen > last:
        report.skip(video, None, f"video frames beyond the labels: {got.seen - last} frame(s) after frame {last}, "
                                 f"where {subject}'s labels end ({video.name} has {_count(got)} frames); not imported")


def _count(got: SubjectFrames) -> str:
    return str(got.seen) if got.every_seen == 1 else f"{got.seen} to {got.seen + got.every_seen - 1}"


def _frame_name(frame: int) -> str:
    return f"{frame:05d}.jpg"


def _on_disk(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: matches no video, so the subject is written again
    return marker if isinstance(marker, dict) else {}


def _remove_frames(folder: Path) -> None:
    for path in folder.glob("*.jpg"):
        path.unlink(missing_ok=True)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """An RGB frame as a JPEG, written under a temporary name and renamed: a stopped import
    leaves whole frames or none, so the next run can keep what is on disk."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode a {rgb.shape[1]}x{rgb.shape[0]} frame as JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
