"""Aff-Wild2 as the ABAW AU Detection Challenge distributes it: one annotation file per video (per
person in a two-person video) under ``AU_Detection_Challenge/{Train_Set,Validation_Set}``, and the
challenge's aligned face crops ``cropped_aligned/<video>/00001.jpg``, imported into one manifest.

Data line *k* after the header is frame *k*. ``-1`` marks a frame nobody annotated (the face is
off screen or another person's); a line of nothing but ``-1`` is not a labelled frame. The crops
miss frames where no face was found, and some crops have no line: both are counted in the report.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from datamodules.benchmarks.report import (FrameRow, ImportReport, check_aus, frame_images, image_fault, spans,
                                           write_frames)
from datamodules.io.manifest import UNLABELLED, au_column_name

AFFWILD2_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)  # ABAW3 onwards
LABEL_FOLDER = "AU_Detection_Challenge"
SPLITS = {"train_set": "train", "validation_set": "validation"}  # folder name (any case) -> split
IMAGE_FOLDER = "cropped_aligned"
MANIFEST_NAME = "affwild2.tsv"
VALUES = {"0": 0, "1": 1, "-1": UNLABELLED}

_AU_NAME = re.compile(r"^au\s*0*(\d+)$", re.IGNORECASE)
_PERSON = re.compile(r"^(.+)_(left|right)$", re.IGNORECASE)  # one person of a two-person video
_LINE_BREAK = re.compile(r"\r\n|\n|\r")


def import_affwild2(root: str, out: str, aus: Sequence[int] = AFFWILD2_AUS) -> ImportReport:
    """Import Aff-Wild2's AU Detection Challenge annotations and aligned crops into
    ``<out>/affwild2.tsv``, with every line left out in ``<out>/import_report.json``.

    One manifest row per annotated frame that has its crop: ``image`` (absolute path), ``subject``
    (the annotation file's name: ``<video>_left`` and ``<video>_right`` are two people),
    ``sequence`` (the video), ``frame`` (*k*), ``split`` (``train`` or ``validation``), then 0/1
    per AU with -1 as 999. Lines where every AU is -1 are left out, counted per file.

    Args:
        root: the folder holding the data set; ``AU_Detection_Challenge/{Train_Set,Validation_Set}/*.txt``
            and ``cropped_aligned/<video>/`` are found anywhere below it.
        out: the folder the manifest and the report are written to.
        aus: the AUs to import, each a column of every annotation file (the challenge's 12 by default).

    Returns:
        The report; ``frames`` is 0 (and no manifest written) when nothing could be imported.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``aus`` is empty or names an AU twice.
    """
    aus = check_aus(aus)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"Aff-Wild2 root not found: {root}")
    report = ImportReport("Aff-Wild2", str(base.resolve()), aus)
    report.notes = {"unannotated": "-1 -> 999; lines where every AU is -1 left out",
                    "frame_match": "data line k after the header is the image whose stem is the integer k",
                    "blank_lines": "not counted as frames (as pandas reads the files)",
                    "subject": "the annotation file's stem (_left/_right: a person of a two-person video)",
                    "au_columns": "by header name"}
    annotations, videos = _find(base, report)
    report.notes.update(annotation_files=len(annotations), video_folders=len(videos))
    if not annotations:
        report.skip(base, None, f"no label files: no {LABEL_FOLDER}/{{Train_Set,Validation_Set}}/*.txt under the root")

    rows: list[FrameRow] = []
    split_columns = {split: {"split": split} for split in SPLITS.values()}  # one dict shared by a split's rows
    for stem, (split, path) in sorted(annotations.items()):
        folder = videos.get(stem)
        if folder is None:
            report.skip(path, None, f"no image folder: no {IMAGE_FOLDER}/{stem}/ with JPEG frames under the root")
            continue
        read = _read_labels(path, aus, report)
        if read is None:
            continue
        labelled, unannotated, data_frames = read
        directory, images = folder
        person = _PERSON.match(stem)
        sequence = person.group(1) if person else stem
        missing: list[int] = []
        for frame, line, labels in labelled:
            name = images.get(frame)
            if name is None:
                missing.append(line)
                continue
            image = os.path.join(directory, name)
            fault = image_fault(image)
            if fault:
                report.skip(path, line, fault)
                continue
            rows.append(FrameRow(image, stem, sequence, frame, labels, extra=split_columns[split]))
        if unannotated:
            report.skip(path, None, f"unannotated: {len(unannotated)} lines where every AU is -1 "
                                    f"(lines {spans(unannotated)})")
        if missing:
            report.skip(path, None, f"no image: {len(missing)} annotated frames have no image in {directory} "
                                    f"(lines {spans(missing)})")
        left = sorted(set(images) - data_frames)
        if left:
            report.skip(path, None, f"unlabelled images: {len(left)} images in {directory} have no line "
                                    f"(frames {spans(left)})")

    if rows:
        write_frames(Path(out) / MANIFEST_NAME, rows, aus, report, extra=("split",))
    report.write(out)
    return report


def _find(base: Path, report: ImportReport
          ) -> tuple[dict[str, tuple[str, Path]], dict[str, tuple[str, dict[int, str]]]]:
    """Annotation files by stem as (split, path), and video folders by name as (absolute folder,
    {frame: file name}), from one walk of the tree. A second copy of either is reported, the
    first in sorted order kept."""
    annotations: dict[str, tuple[str, Path]] = {}
    videos: dict[str, tuple[str, dict[int, str]]] = {}
    without_labels: dict[str, list[str]] = {}
    seen: set[tuple[int, int]] = set()
    for directory, dirs, _ in os.walk(base, followlinks=True):
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        here = Path(directory)
        if here.name == LABEL_FOLDER:
            for name in dirs:
                split = SPLITS.get(name.lower())
                if split is None:
                    report.skip(here / name, None, "not a split folder: expected Train_Set or Validation_Set")
                    continue
                for file in sorted(os.listdir(here / name)):
                    path = here / name / file
                    if not file.lower().endswith(".txt") or not path.is_file():
                        continue
                    stem = path.stem
                    if stem in annotations:
                        report.skip(path, None, f"duplicate annotation file: {annotations[stem][1]} is used")
                    else:
                        annotations[stem] = (split, path)
            dirs[:] = []
        elif here.name == IMAGE_FOLDER:
            for name in dirs:
                images = frame_images(here / name, os.listdir(here / name), report)
                if not images:
                    continue
                if name in videos:
                    report.skip(here / name, None, f"duplicate image folder: {videos[name][0]} is used")
                else:
                    videos[name] = (os.path.abspath(here / name), images)
                    without_labels.setdefault(directory, []).append(name)
            dirs[:] = []
    for directory, names in without_labels.items():
        names = [n for n in names if n not in annotations]
        if names:
            report.skip(directory, None, f"no label file: {len(names)} video folders have no {LABEL_FOLDER} "
                                         f"annotation file (first: {', '.join(names[:3])})")
    return annotations, videos


def _read_labels(path: Path, aus: tuple[int, ...], report: ImportReport
                 ) -> tuple[list[tuple[int, int, tuple[int, ...]]], list[int], set[int]] | None:
    """``([(frame, line, labels)], [lines where every AU is -1], {frames that have a line})`` of one
    annotation file, each bad line reported; None (the file reported) when the file cannot be
    read as text or its header lacks a requested AU."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        report.skip(path, None, f"unreadable: {e.strerror}")
        return None
    if b"\0" in raw:
        report.skip(path, raw[:raw.index(b"\0")].count(b"\n") + 1, "unreadable: a NUL byte: not a text file")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        report.skip(path, raw[:e.start].count(b"\n") + 1, f"unreadable: not UTF-8 text ({e.reason} at byte {e.start})")
        return None
    lines = _LINE_BREAK.split(text)
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if not filled:
        report.skip(path, None, "empty file: no header")
        return None
    first, last = filled[0], filled[-1]
    names = [c.strip() for c in lines[first].split(",")]
    while names and not names[-1]:
        names.pop()
    width = len(names)
    columns: dict[int, list[int]] = {}
    for j, name in enumerate(names):
        m = _AU_NAME.match(name)
        if m:
            columns.setdefault(int(m.group(1)), []).append(j)
    if not columns:
        report.skip(path, first + 1, f"no header: the first line names no AU (AU1,AU2,...): {lines[first][:80]!r}")
        return None
    missing = [au_column_name(a) for a in aus if a not in columns]
    if missing:
        report.skip(path, first + 1, f"missing AU column: {', '.join(missing)} not in the header ({', '.join(names)})")
        return None
    twice = [f"{au_column_name(a)} (columns {', '.join(str(j + 1) for j in columns[a])})"
             for a in aus if len(columns[a]) > 1]
    if twice:
        report.skip(path, first + 1, f"duplicate AU column: {'; '.join(twice)}")
        return None
    au_cols = [columns[a][0] for a in aus]

    labelled: list[tuple[int, int, tuple[int, ...]]] = []
    unannotated: list[int] = []
    blank: list[int] = []
    shared: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per label pattern: few patterns, many frames
    frame = 0
    for i in range(first + 1, last + 1):
        line = i + 1
        if not lines[i].strip():
            blank.append(line)
            continue
        frame += 1
        cells = lines[i].split(",")
        if len(cells) != width and (len(cells) < width or any(c.strip() for c in cells[width:])):
            given = len(cells)
            while given > width and not cells[given - 1].strip():
                given -= 1
            report.skip(path, line, f"malformed: frame {frame}: expected {width} cells as in the header, found {given}")
            continue
        values, faults = [], []
        for a, j in zip(aus, au_cols):
            v = VALUES.get(cells[j].strip())
            if v is None:
                faults.append(f"column {j + 1} ({au_column_name(a)}): {cells[j].strip()!r} is not 0, 1 or -1")
            values.append(v)
        if faults:
            report.skip(path, line, f"malformed: frame {frame}: " + "; ".join(faults))
        elif all(v == UNLABELLED for v in values):
            unannotated.append(line)
        else:
            key = tuple(values)
            labelled.append((frame, line, shared.setdefault(key, key)))
    if blank:
        report.skip(path, None, f"blank lines: {len(blank)} inside the data, not counted as frames "
                                f"(lines {spans(blank)})")
    return labelled, unannotated, set(range(1, frame + 1))
