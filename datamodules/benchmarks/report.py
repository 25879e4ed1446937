"""What an import found: subjects, frames, per-AU rates, and every row left out with the file and
line that caused it.

The benchmarks come as thousands of label files written by hand and by scripts over years: a
truncated line, a label file without its video, frames nobody coded. An importer never drops
such a row silently: it goes to :attr:`ImportReport.skipped` naming the file, the line (when
there is one) and why, and the report is written beside the manifest (``import_report.json``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from datamodules.io import files
from datamodules.io.manifest import UNLABELLED, au_column_name, intensity_column_name, write_manifest

# The columns every imported manifest has before its AU columns, in this order.
ID_COLUMNS = ("image", "subject", "sequence", "frame")
REPORT_NAME = "import_report.json"
FRAME_SUFFIXES = (".jpg", ".jpeg")  # the benchmarks' frames are JPEGs


def check_aus(aus: Sequence[int]) -> tuple[int, ...]:
    """The AUs an importer is asked for, as integers: at least one, none twice (a ``ValueError`` otherwise)."""
    aus = tuple(int(a) for a in aus)
    if not aus:
        raise ValueError("aus is empty: give at least one AU")
    if len(set(aus)) != len(aus):
        raise ValueError(f"aus names an AU twice: {aus}")
    return aus


@dataclass
class Skipped:
    """A row, file or frame left out of the manifest: where (``file``, ``line`` from 1 when the
    fault is on a line) and why."""

    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line is not None else f"{self.file}: {self.reason}"


@dataclass
class FrameRow:
    """One labelled frame: its image (a path the manifest can hold), who and which sequence, the
    frame number in that sequence, 0/1/999 per AU, and 0-5/999 intensities where the data set has them;
    ``extra`` holds the values of further columns by name (Aff-Wild2's ``split``), written where
    :func:`write_frames` is given their names."""

    image: str
    subject: str
    sequence: str
    frame: int
    labels: Sequence[int]
    intensities: Sequence[int] | None = None
    extra: Mapping[str, str] | None = None


@dataclass
class ImportReport:
    """The outcome of one import; :meth:`write` puts it beside the manifest."""

    dataset: str
    root: str
    aus: tuple[int, ...]
    manifest: str = ""
    frames: int = 0
    subjects: dict[str, int] = field(default_factory=dict)  # frames per subject
    sequences: int = 0
    positive_rate: dict[str, float] = field(default_factory=dict)  # per AU, over labelled frames
    unlabelled_share: dict[str, float] = field(default_factory=dict)  # per AU, share of 999
    skipped: list[Skipped] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)  # the rules applied (e.g. DISFA's threshold)

    def skip(self, file: str | Path, line: int | None, reason: str) -> None:
        self.skipped.append(Skipped(str(file), line, reason))

    def skipped_by_reason(self) -> dict[str, int]:
        """How many rows were left out for each kind of reason (the text before the first colon)."""
        return dict(Counter(s.reason.split(":")[0] for s in self.skipped).most_common())

    def summary(self) -> str:
        rates = ", ".join(f"{k} {v:.3f}" for k, v in self.positive_rate.items())
        lines = [f"{self.dataset}: {self.frames} labelled frames of {len(self.subjects)} subjects, "
                 f"{self.sequences} sequences -> {self.manifest}",
                 f"  positive rate per AU: {rates}"]
        if self.skipped:
            lines.append(f"  {len(self.skipped)} rows/files left out: " + ", ".join(
                f"{n} {reason}" for reason, n in self.skipped_by_reason().items()))
            lines += [f"    {s}" for s in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"    ... {len(self.skipped) - 10} more in {REPORT_NAME}")
        return "\n".join(lines)

    def write(self, out: str | Path) -> Path:
        data = asdict(self)
        data["skipped_by_reason"] = self.skipped_by_reason()
        return files.write_text(Path(out) / REPORT_NAME, json.dumps(data, indent=2) + "\n")


def spans(numbers: Iterable[int], limit: int = 5) -> str:
    """Line or frame numbers said briefly, runs as ranges, the first ``limit`` runs only: where a
    report row that counts many rows points.

    >>> spans([3, 4, 5, 9, 12, 13], limit=2)
    '3-5, 9, ... (6 in all)'
    """
    numbers = sorted(set(numbers))
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit])
    return text + (f", ... ({len(numbers)} in all)" if len(runs) > limit else "")


def frame_images(folder: str | Path, names: Iterable[str], report: ImportReport) -> dict[int, str]:
    """``{frame: file name}`` of a folder of frames named by their number, matched by the integer
    value of the stem: copies of one data set name a frame ``643.jpg``, ``0643.jpg`` or ``00643.jpg``.
    JPEGs named otherwise, and a second file for a frame already seen, make one report row each
    per folder (the first name in sorted order is used)."""
    images: dict[int, str] = {}
    odd: list[str] = []
    twice: list[str] = []
    for name in sorted(names):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in FRAME_SUFFIXES:
            continue
        if not (stem.isascii() and stem.isdigit()):
            odd.append(name)
        elif int(stem) in images:
            twice.append(f"{name} ({images[int(stem)]} is used)")
        else:
            images[int(stem)] = name
    if odd:
        report.skip(folder, None, f"not a frame name: {len(odd)} JPEGs not named by a frame number "
                                  f"(first: {', '.join(odd[:3])})")
    if twice:
        report.skip(folder, None, f"duplicate frame image: {len(twice)} files name a frame already named "
                                  f"(first: {', '.join(twice[:3])})")
    return images


def image_fault(image: str) -> str | None:
    """Why a listed frame cannot be used, if it cannot; decoding waits for alignment, which reports
    unreadable images itself (decoding every frame of a benchmark here would take long)."""
    try:
        size = os.stat(image).st_size
    except OSError as e:  # a broken link, or removed since the listing
        return f"no image: {image} ({e.strerror})"
    return f"empty image: {image}" if size == 0 else None


def write_frames(path: str | Path, rows: Sequence[FrameRow], aus: Sequence[int], report: ImportReport,
                 intensity: bool = False, extra: Sequence[str] = ()) -> Path:
    """The imported manifest, whole or not at all: ``image, subject, sequence, frame``, the
    ``extra`` columns (values from each row's ``extra``, empty where it has none), the AU columns
    (0/1/999), then with ``intensity`` an ``AU<n>_intensity`` column per AU (0-5, 999 unknown);
    rows sorted by subject, sequence and frame. Fills the report's counts and rates."""
    if not rows:
        raise ValueError(f"{report.dataset}: no labelled frame found under {report.root} "
                         f"({len(report.skipped)} rows left out; see {REPORT_NAME})")
    rows = sorted(rows, key=lambda r: (r.subject, r.sequence, r.frame))
    header = [*ID_COLUMNS, *extra, *(au_column_name(a) for a in aus)]
    if intensity:
        header += [intensity_column_name(a) for a in aus]

    def cells(r: FrameRow) -> list[object]:
        out = [r.image, r.subject, r.sequence, r.frame, *(r.extra.get(c, "") if r.extra else "" for c in extra),
               *r.labels]
        if intensity:
            out += list(r.intensities if r.intensities is not None else [UNLABELLED] * len(aus))
        return out

    path = write_manifest(path, header, map(cells, rows))
    labels = np.array([r.labels for r in rows], dtype=np.int64)
    labelled = labels != UNLABELLED
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(labelled.any(0), (labels == 1).sum(0) / np.maximum(labelled.sum(0), 1), np.nan)
    report.manifest = str(path)
    report.frames = len(rows)
    report.subjects = dict(sorted(Counter(r.subject for r in rows).items()))
    report.sequences = len({(r.subject, r.sequence) for r in rows})
    report.positive_rate = {au_column_name(a): round(float(v), 4) for a, v in zip(aus, rate)}
    report.unlabelled_share = {au_column_name(a): round(float(v), 4) for a, v in zip(aus, 1 - labelled.mean(0))}
    return path
