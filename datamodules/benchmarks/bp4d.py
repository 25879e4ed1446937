"""BP4D-Spontaneous as distributed: per-task occurrence CSVs (``AU_OCC/F001_T1.csv``) and a JPEG per
frame (``F001/T1/2440.jpg``), imported into one manifest of coded frames.

Only a segment of each task was FACS-coded, so most frames on disk have no label row; a label
row can also lack its frame (loaders keep a row only if the image exists). Frames are matched
by the integer value of the file stem, because copies of the data set name the same frame
``643.jpg`` or ``0643.jpg``. AU columns are found by their header name, never by position.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from datamodules.benchmarks.report import (FrameRow, ImportReport, check_aus, frame_images, image_fault, spans,
                                           write_frames)
from datamodules.io.manifest import BP4D_AUS, UNLABELLED, ManifestError, au_column_name, read_rows

LABEL_FOLDER = "AU_OCC"
MANIFEST_NAME = "bp4d.tsv"
VALUES = {"0": 0, "1": 1, "9": UNLABELLED}  # 9: the coder could not tell (not coded)

_LABEL_FILE = re.compile(r"^([FM]\d{3})_(T\d+)\.csv$", re.IGNORECASE)
_SUBJECT = re.compile(r"^[FM]\d{3}$", re.IGNORECASE)
_TASK = re.compile(r"^T\d+$", re.IGNORECASE)
_AU_NAME = re.compile(r"^(?:au\s*)?0*(\d+)$", re.IGNORECASE)


def import_bp4d(root: str, out: str, aus: Sequence[int] = BP4D_AUS) -> ImportReport:
    """Import BP4D-Spontaneous's occurrence labels and frames into ``<out>/bp4d.tsv``, with every
    row left out in ``<out>/import_report.json``.

    One manifest row per coded frame that has its image: ``image`` (absolute path), ``subject``
    (F001), ``sequence`` (the task, T1), ``frame``, then 0/1 per AU, with 9 (not coded) as 999.

    Args:
        root: the folder holding the data set; ``AU_OCC/<subject>_<task>.csv`` label files and
            ``<subject>/<task>/<frame>.jpg`` image folders are found anywhere below it.
        out: the folder the manifest and the report are written to.
        aus: the AUs to import, each a column of every label file (the field's 12 by default).

    Returns:
        The report; ``frames`` is 0 (and no manifest written) when nothing could be imported.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``aus`` is empty or names an AU twice.
    """
    aus = check_aus(aus)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"BP4D root not found: {root}")
    report = ImportReport("BP4D", str(base.resolve()), aus)
    report.notes = {"unknown_label": "9 -> 999", "frame_match": "integer value of the image file's stem",
                    "au_columns": "by header name", "duplicate_frame": "first line kept"}
    label_files, folders = _find(base, report)
    report.notes.update(label_files=len(label_files), image_folders=len(folders))
    if not label_files:
        report.skip(base, None, f"no label files: no {LABEL_FOLDER}/<subject>_<task>.csv under the root")

    rows: list[FrameRow] = []
    listed: dict[tuple[str, str], set[int] | None] = {}  # frames with a label line (None: the file left out)
    for key, path in sorted(label_files.items()):
        folder = folders.get(key)
        if folder is None:
            report.skip(path, None, f"no image folder: no {key[0]}/{key[1]}/ with JPEG frames under the root")
            continue
        read = _read_labels(path, aus, report)
        listed[key] = read[1] if read is not None else None
        if read is None:
            continue
        directory, images = folder
        for frame, (line, labels) in read[0].items():
            name = images.get(frame)
            if name is None:
                report.skip(path, line, f"no image: frame {frame} has no image in {directory}")
                continue
            image = os.path.join(directory, name)
            fault = image_fault(image)
            if fault:
                report.skip(path, line, fault)
                continue
            rows.append(FrameRow(image, key[0], key[1], frame, labels))

    for key, (directory, images) in sorted(folders.items()):
        if key not in label_files:
            report.skip(directory, None, f"no label file: {len(images)} frames, no "
                                         f"{LABEL_FOLDER}/{key[0]}_{key[1]}.csv under the root")
        elif listed[key] is None:
            report.skip(directory, None, f"unlabelled images: {len(images)} frames, their label file "
                                         f"{label_files[key].name} was left out")
        elif left := sorted(set(images) - listed[key]):
            report.skip(directory, None, f"unlabelled images: {len(left)} of {len(images)} frames have no label "
                                         f"line (frames {spans(left)})")

    if rows:
        write_frames(Path(out) / MANIFEST_NAME, rows, aus, report)
    report.write(out)
    return report


def _find(base: Path, report: ImportReport) -> tuple[dict[tuple[str, str], Path],
                                                     dict[tuple[str, str], tuple[str, dict[int, str]]]]:
    """Label files by (subject, task), and image folders by (subject, task) as (absolute folder,
    {frame: file name}), from one walk of the tree. A second copy of either is reported, the
    first in sorted order kept."""
    label_files: dict[tuple[str, str], Path] = {}
    folders: dict[tuple[str, str], tuple[str, dict[int, str]]] = {}
    seen: set[tuple[int, int]] = set()
    for directory, dirs, files in os.walk(base, followlinks=True):
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        here = Path(directory)
        if here.name.upper() == LABEL_FOLDER:
            for name in sorted(files):
                if not name.lower().endswith(".csv"):
                    continue
                m = _LABEL_FILE.match(name)
                if m is None:
                    report.skip(here / name, None, "not a label file name: expected <subject>_<task>.csv (F001_T1.csv)")
                    continue
                key = (m.group(1).upper(), m.group(2).upper())
                if key in label_files:
                    report.skip(here / name, None, f"duplicate label file: {label_files[key]} is used")
                else:
                    label_files[key] = here / name
        if _TASK.match(here.name) and _SUBJECT.match(here.parent.name):
            dirs[:] = []  # frames only below a task
            images = frame_images(here, files, report)
            if not images:
                continue
            key = (here.parent.name.upper(), here.name.upper())
            if key in folders:
                report.skip(here, None, f"duplicate image folder: {folders[key][0]} is used")
            else:
                folders[key] = (os.path.abspath(here), images)
    return label_files, folders


def _read_labels(path: Path, aus: tuple[int, ...], report: ImportReport
                 ) -> tuple[dict[int, tuple[int, tuple[int, ...]]], set[int]] | None:
    """``({frame: (line, labels)}, {frames with a line, malformed ones too})`` of one label file,
    each bad line reported; None (the file reported) when the file cannot be read as a whole or
    lacks a requested AU column."""
    try:
        lines = list(read_rows(path))
    except (ManifestError, OSError) as e:
        line, reason = _where(path, e)
        report.skip(path, line, f"unreadable: {reason}")
        return None
    if not lines:
        report.skip(path, None, "empty file: no header")
        return None
    header_line, header = lines[0]
    names = [c.strip() for c in header]
    while names and not names[-1]:  # trailing blank cells, as spreadsheets save them
        names.pop()
    width = len(names)
    if "0" not in names:
        report.skip(path, header_line, f"no frame column: no column named '0' in the header ({', '.join(names)})")
        return None
    frame_col = names.index("0")
    columns: dict[int, list[int]] = defaultdict(list)
    for j, name in enumerate(names):
        m = _AU_NAME.match(name)
        if m and j != frame_col:
            columns[int(m.group(1))].append(j)
    missing = [au_column_name(a) for a in aus if a not in columns]
    if missing:
        report.skip(path, header_line, f"missing AU column: {', '.join(missing)} not in the header "
                                       f"({', '.join(names)})")
        return None
    twice = [f"{au_column_name(a)} (columns {', '.join(str(j + 1) for j in columns[a])})"
             for a in aus if len(columns[a]) > 1]
    if twice:
        report.skip(path, header_line, f"duplicate AU column: {'; '.join(twice)}")
        return None
    au_cols = [columns[a][0] for a in aus]

    found: dict[int, tuple[int, tuple[int, ...]]] = {}
    frames: set[int] = set()
    shared: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per label pattern: few patterns, many frames
    for line, cells in lines[1:]:
        if len(cells) != width and (len(cells) < width or any(c.strip() for c in cells[width:])):
            given = len(cells)
            while given > width and not cells[given - 1].strip():
                given -= 1
            report.skip(path, line, f"malformed: expected {width} cells as in the header, found {given}")
            continue
        cell = cells[frame_col].strip()
        if not (cell.isascii() and cell.isdigit()):
            report.skip(path, line, f"malformed: column {frame_col + 1} (frame): {cell!r} is not a frame number")
            continue
        frame = int(cell)
        frames.add(frame)
        labels, faults = [], []
        for a, j in zip(aus, au_cols):
            v = VALUES.get(cells[j].strip())
            if v is None:
                faults.append(f"column {j + 1} ({au_column_name(a)}): {cells[j].strip()!r} is not 0, 1 or 9")
            labels.append(v)
        if faults:
            report.skip(path, line, "malformed: " + "; ".join(faults))
            continue
        if frame in found:
            first, kept = found[frame]
            same = "same labels" if kept == tuple(labels) else "different labels"
            report.skip(path, line, f"duplicate frame: frame {frame} again ({same}; line {first} kept)")
            continue
        key = tuple(labels)
        found[frame] = (line, shared.setdefault(key, key))
    return found, frames


def _where(path: Path, error: Exception) -> tuple[int | None, str]:
    """(line, reason) of a reading error whose message starts with ``<path>:<line>:``."""
    message = str(error)
    m = re.match(re.escape(str(path)) + r":(?:(\d+):)?\s*(.*)", message, re.S)
    if m is None:
        return None, message
    return (int(m.group(1)) if m.group(1) else None), m.group(2)
