"""The files ``au-detect predict`` writes, and how it writes them safely.

Rows go to ``<out>.partial``, held under an exclusive lock (:func:`open_partial`), and become
``--out`` whole at the end (:func:`commit`); a run's place is saved in ``<out>.resume.json``
(:func:`resume_path`); a video's AU events, people and AU-curve pictures go beside ``--out``
(:func:`events_path`, :func:`people_path`, :func:`curves_path`). Text cells a spreadsheet would
run as formulas are escaped (:func:`neutralise`). One process (:mod:`experiments.predict`) and the
ranks of a distributed run (:mod:`experiments.predict_ranks`) write through these.
"""

from __future__ import annotations

import csv
import fcntl
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from datamodules.io.manifest import au_column_name
from lightning_modules.serving.parquet_rows import csv_to_parquet
from lightning_modules.serving.predictor import columns
from lightning_modules.serving.signals import smooth_columns


# What a spreadsheet takes as the start of a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


CsvFormulas = Literal["escape", "keep"]  # the option's type: a wrong word is refused by the CLI


PARTIAL_SUFFIX = ".partial"


class OutputBusy(RuntimeError):
    """Another run is writing the same output."""


def neutralise(row: dict) -> dict:
    """``row`` with each text cell that a spreadsheet would run as a formula prefixed by ``'``
    (numbers, even negative ones, are not text and stay as they are)."""
    return {k: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v for k, v in row.items()}


def open_partial(out: Path, keep: int | None = None) -> tuple[Path, IO[str]]:
    """``<out>.partial``, created or emptied (or, with ``keep``, cut to its first ``keep`` bytes
    and opened to append: a run going on), with an exclusive lock held on it for as long as the
    returned file is open. Raises :class:`OutputBusy` when another process holds the lock."""
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    while True:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"--out {out}: another au-detect predict is writing it (its rows go to {partial}); "
                             "wait for it to finish or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(partial))
        except FileNotFoundError:
            same = False
        if same:  # not a file the run before us has just renamed onto --out
            break
        os.close(fd)
    os.ftruncate(fd, keep or 0)
    os.lseek(fd, 0, os.SEEK_END)
    return partial, os.fdopen(fd, "a" if keep else "w", newline="")


@dataclass
class PredictionSummary:
    """What a prediction run did: counts by status, faces, frames and speed."""

    out: str
    statuses: Counter = field(default_factory=Counter)
    faces: int = 0
    frames: int = 0
    seconds: float = 0.0
    events: int | None = None  # AU events of the videos (None: not smoothed)

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        events = "" if self.events is None else (f"; {self.events} AU events in "
                                                 f"{events_path(Path(self.out)).name}, {people_path(Path(self.out)).name}")
        return (f"{self.frames} frames, {self.faces} faces in {self.seconds:.1f} s "
                f"({self.frames_per_second:.1f} frames/s); rows by status: {counts}; written to {self.out}{events}")


RESUME_SUFFIX = ".resume.json"


def resume_path(out: Path) -> Path:
    """Where a run saves where it stands: ``aus.csv`` -> ``aus.csv.resume.json``."""
    return out.with_name(out.name + RESUME_SUFFIX)


EVENT_COLUMNS = ["source", "person", "au", "onset_s", "apex_s", "offset_s", "duration_s", "peak_prob"]


def events_path(out: Path) -> Path:
    """Where the AU events of a run's videos go: ``aus.csv`` -> ``aus.events.csv``."""
    return out.with_name(f"{out.stem}.events.csv")


def people_path(out: Path) -> Path:
    """Where each video person's share of time per AU goes: ``aus.csv`` -> ``aus.people.csv``."""
    return out.with_name(f"{out.stem}.people.csv")


def curves_path(out: Path) -> Path:
    """Where each video's picture of AU curves per person goes: ``aus.csv`` -> ``aus.curves/``."""
    return out.with_name(f"{out.stem}.curves")


def write_table(path: Path, header: list[str], rows: list[dict], csv_formulas: CsvFormulas) -> int:
    """A small CSV written whole (temporary name beside it, then renamed); returns its rows."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(map(neutralise, rows) if csv_formulas == "escape" else rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(rows)


def commit(f: IO[str], partial: Path, out: Path, header: list[str]) -> None:
    """The rows of ``<out>.partial`` (``f``, open and locked) made ``out``, whole: renamed onto it,
    or for ``.parquet`` streamed into its row groups; under the lock, so that the next writer waits
    for a whole file."""
    f.flush()
    os.fsync(f.fileno())
    if out.suffix.lower() == ".parquet":
        csv_to_parquet(partial, out, header)
        partial.unlink()
    else:
        os.replace(partial, out)


def row_header(predictor, smoothed: bool) -> list[str]:
    """The columns of a run's rows: :func:`~lightning_modules.serving.predictor.columns` with the
    ``person`` column, and with ``smoothed`` videos each AU's smoothed probability and decision."""
    names = [au_column_name(a) for a in predictor.aus]
    return columns(predictor.aus, predictor.has_intensity, person=True) + (smooth_columns(names) if smoothed else [])
