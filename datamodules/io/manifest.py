"""AU manifests in EmotioNet form: one row per image, an image reference, then 0/1/999 per AU.

``999`` means "not labelled" (EmotioNet leaves many AUs unlabelled). It is carried as a mask,
never as a negative, so the loss and the metrics can ignore it. Every malformed value is an
error that names the file, the line and the column, because a silently misread manifest trains
a model on wrong labels and nobody notices until the scores look odd.
"""

from __future__ import annotations

import csv
import gc
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import Iterator

import numpy as np

from datamodules.io import files
from datamodules.io.images import MISSING, InputError, verify_image

EMOTIONET_AUS: tuple[int, ...] = (
    1, 2, 4, 5, 6, 9, 10, 12, 15, 17, 18, 20, 24, 25, 26, 28, 43, 51, 52, 53, 54, 55, 56,
)
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
BP4D_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
UNLABELLED = 999
MAX_LEVEL = 5  # FACS intensity levels: 0 absent, A-E = 1-5

_AU_HEADER = re.compile(r"^(?:au[\s_-]*)?(\d+)$", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_FAST_VALUES = {"0": 0, "1": 1, "999": UNLABELLED}
# A label is written 0, 1 or 999, in ASCII digits; a decimal point and zeros after it (1.0, as
# pandas writes a float column) say the same. Anything float() would round onto a label
# (0.99999999999999999, 1e-400, full-width or Arabic-Indic digits) is not a label as written.
_LABEL = re.compile(r"(0|1|999)(?:\.0+)?", re.ASCII)
# An intensity level is written 0-5 or 999 (unknown), with the same latitude as a label.
_LEVEL = re.compile(r"([0-5]|999)(?:\.0+)?", re.ASCII)
_FAST_LEVELS = {**{str(v): v for v in range(MAX_LEVEL + 1)}, "999": UNLABELLED}
_NOT_FAST = -1  # a cell outside _FAST_VALUES: its chunk is read again row by row
# Data rows parsed together: per-cell work runs in C over a chunk, and only a chunk of raw rows
# is held at a time (1M rows of 23 AUs here: 10 s and 680 MB peak RSS row by row, 4 s and 320 MB so).
_CHUNK_ROWS = 8192
# Distinct values an extra column keeps one copy of (identities, expressions repeat a lot).
_SHARED_VALUES_MAX = 1 << 16


class ManifestError(ValueError):
    """A manifest that cannot be read as written; the message names file, line and column."""


def au_column_name(au: int) -> str:
    """The canonical column name of an AU, as the project writes manifests.

    >>> au_column_name(12)
    'AU12'
    """
    return f"AU{int(au)}"


def intensity_column_name(au: int) -> str:
    """The column of an AU's 0-5 intensity level (``999`` unknown), beside its 0/1 occurrence column.

    >>> intensity_column_name(12)
    'AU12_intensity'
    """
    return f"{au_column_name(au)}_intensity"


def is_url(ref: str) -> bool:
    """True for references with a scheme (``http://``, ``https://``, ``s3://``...): not local files."""
    return bool(_URL.match(ref))


@dataclass
class SkippedRow:
    """A row left out by ``check_images``, kept so the user can see what was dropped and why."""

    line: int
    image: str
    reason: str


@dataclass
class Manifest:
    """A parsed manifest; all per-row arrays are aligned with ``images``.

    ``labels`` is float32 0/1 with unlabelled entries set to 0; ``mask`` is False exactly where
    the file said ``999``, so a consumer that forgets the mask sees negatives, not 999s.
    ``root`` is the folder relative references are resolved against (None: the manifest's own).
    """

    path: Path
    aus: tuple[int, ...]
    images: list[str]
    labels: np.ndarray
    mask: np.ndarray
    lines: np.ndarray
    extra: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[SkippedRow] = field(default_factory=list)
    root: Path | None = None

    def __post_init__(self) -> None:
        n, k = len(self.images), len(self.aus)
        for name in ("labels", "mask"):
            shape = getattr(self, name).shape
            if shape != (n, k):
                raise ValueError(f"{name} has shape {shape}, expected {(n, k)} ({n} images, {k} AUs)")
        if self.lines.shape != (n,):
            raise ValueError(f"lines has shape {self.lines.shape}, expected {(n,)}")
        for name, values in self.extra.items():
            if len(values) != n:
                raise ValueError(f"extra column {name!r} has {len(values)} values, expected {n}")

    def __len__(self) -> int:
        return len(self.images)

    def resolve(self, i: int, root: Path | str | None = None) -> str:
        """Absolute path of row ``i``'s image; URLs are returned unchanged.

        ``root`` overrides the manifest's root, which defaults to the manifest's folder, so a
        manifest and its images can be moved together.
        """
        return _resolve(self.images[i], self.root_for(root))

    def subset(self, keep: np.ndarray | Sequence[int] | Sequence[bool]) -> Manifest:
        """The rows selected by a boolean mask or an index array, everything kept aligned."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            if keep.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {keep.shape}, expected {(len(self),)}")
            idx = np.flatnonzero(keep)
        else:
            idx = keep.astype(np.int64, copy=False).reshape(-1)
        return Manifest(
            path=self.path,
            aus=self.aus,
            images=[self.images[i] for i in idx],
            labels=self.labels[idx],
            mask=self.mask[idx],
            lines=self.lines[idx],
            extra={name: [values[i] for i in idx] for name, values in self.extra.items()},
            skipped=list(self.skipped),
            root=self.root,
        )

    def positive_rate(self) -> np.ndarray:
        """Per AU, positives / labelled entries (nan where no entry is labelled)."""
        return positive_rate(self.labels, self.mask)

    def root_for(self, root: Path | str | None) -> Path:
        """The folder relative image paths start from: ``root`` when given, else the manifest's
        image root, else its own folder."""
        if root is not None:
            return Path(root)
        return self.root if self.root is not None else self.path.parent


def positive_rate(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per AU, the share of positives among the labelled entries (nan where none is labelled):
    the label statistic behind sampling weights, the prior predictor and the label plots.

    >>> positive_rate(np.array([[1, 0], [0, 0], [1, 0]]), np.array([[1, 0], [1, 0], [0, 0]], bool))
    array([0.5, nan])
    """
    labelled = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(labelled > 0, (labels * mask).sum(0) / labelled, np.nan)


def read_levels(manifest: Manifest, aus: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row and AU of ``aus`` (default: the manifest's), the FACS intensity level 0-5 from its
    ``AU<n>_intensity`` column (in ``manifest.extra``), as uint8 (N, K), and a bool (N, K) mask,
    False where the file says ``999`` or the AU has no intensity column (its level reads 0 there).

    Raises ``ManifestError`` naming file, line and column for a value that is not 0-5 or 999.
    """
    aus = manifest.aus if aus is None else tuple(int(a) for a in aus)
    n = len(manifest)
    levels = np.zeros((n, len(aus)), np.uint8)
    known = np.zeros((n, len(aus)), bool)
    first_bad: tuple[int, str, str] | None = None  # the earliest bad cell in file order
    for k, au in enumerate(aus):
        name = intensity_column_name(au)
        cells = manifest.extra.get(name)
        if cells is None:
            continue
        values = np.fromiter(map(_FAST_LEVELS.get, cells, repeat(_NOT_FAST)), dtype=np.int16, count=n)
        for i in np.flatnonzero(values == _NOT_FAST):  # not plain: ``3.0`` (as pandas writes), or not a level
            m = _LEVEL.fullmatch(cells[i].strip())
            if m is None:
                if first_bad is None or manifest.lines[i] < first_bad[0]:
                    first_bad = (int(manifest.lines[i]), name, cells[i])
                break
            values[i] = _FAST_LEVELS[m.group(1)]
        known[:, k] = values != UNLABELLED
        levels[:, k] = np.where(known[:, k], values, 0)
    if first_bad is not None:
        line, name, cell = first_bad
        raise ManifestError(f"{manifest.path}:{line}: column {_column_number(manifest.path, name)}({name}): "
                            f"value {cell!r} is not an intensity level 0-{MAX_LEVEL} or {UNLABELLED}")
    return levels, known


def _column_number(path: Path, name: str) -> str:
    """``"<n> "``, the 1-based position of a column named in the header, for an error message."""
    try:
        header = [h.strip() for h in next(read_rows(path))[1]]
        return f"{header.index(name) + 1} "
    except (OSError, ManifestError, StopIteration, ValueError):
        return ""


def _resolve(ref: str, root: Path) -> str:
    if is_url(ref):
        return ref
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = root.expanduser() / p
    return os.path.abspath(p)


def _delimiter(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        return "\t"
    if suffix == ".csv":
        return ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        return "\t" if "\t" in f.readline() else ","


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """The cells of every non-blank row of a manifest (header included) with its 1-based line, as
    written: the delimiter follows the suffix (``.tsv``/``.txt`` tab, ``.csv`` comma), else a tab
    on the first line. Raises ``ManifestError`` naming file and line for text that is not UTF-8,
    holds NUL bytes or is not CSV."""
    path = Path(path)
    return _rows(path, _delimiter(path))


def _rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank rows with their 1-based starting line (blank lines still count)."""
    nul = _holds_nul(path)  # rows are searched for the NUL only when the file has one (rare)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            last = 0
            try:
                for row in reader:
                    start, last = last + 1, reader.line_num
                    if nul and any("\0" in cell for cell in row):  # csv takes NUL bytes; no text file holds them
                        raise ManifestError(f"{path}:{start}: a NUL byte: not a text file")
                    if row and (row[0].strip() or any(cell.strip() for cell in row)):
                        yield start, row
            except csv.Error as e:
                raise ManifestError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


def _holds_nul(path: Path) -> bool:
    """Whether the file has a NUL byte anywhere (UTF-8 encodes only U+0000 as one)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if b"\0" in block:
                return True
    return False


def _au_value(cell: str, path: Path, line: int, col: int, au: int) -> int:
    v = _FAST_VALUES.get(cell)
    if v is not None:
        return v
    m = _LABEL.fullmatch(cell.strip())
    if m is None:
        raise ManifestError(
            f"{path}:{line}: column {col} ({au_column_name(au)}): value {cell!r} is not 0, 1 or {UNLABELLED}"
        )
    return _FAST_VALUES[m.group(1)]


def _looks_like_data(row: list[str], image_col: int) -> bool:
    cells = [c.strip() for j, c in enumerate(row) if j != image_col]
    return bool(cells) and all(c in _FAST_VALUES for c in cells)


def _parse_header(
    path: Path, line: int, header: list[str], aus: tuple[int, ...], image_column: str | None
) -> tuple[int, list[int], dict[str, int]]:
    """Positions of the image column, of each AU in ``aus`` order, and of the other named columns."""
    names = [h.strip() for h in header]
    if image_column is None:
        image_col = 0
    else:
        matches = [j for j, h in enumerate(names) if h == image_column.strip()]
        if not matches:
            matches = [j for j, h in enumerate(names) if h.lower() == image_column.strip().lower()]
        if len(matches) != 1:
            problem = "not found" if not matches else "found more than once"
            raise ManifestError(f"{path}:{line}: image column {image_column!r} {problem}; columns: {names}")
        image_col = matches[0]

    found: dict[int, list[int]] = {}
    for j, h in enumerate(names):
        m = _AU_HEADER.match(h)
        if j != image_col and m:
            found.setdefault(int(m.group(1)), []).append(j)

    missing = [a for a in aus if a not in found]
    if missing:
        hint = ""
        if _looks_like_data(header, image_col):
            hint = " (the first line looks like data: pass has_header=False for headerless files)"
        raise ManifestError(
            f"{path}:{line}: missing AU column(s) {', '.join(au_column_name(a) for a in missing)}; "
            f"columns found: {names}{hint}"
        )
    for a in aus:
        if len(found[a]) > 1:
            cols = ", ".join(f"{j + 1} ({names[j]!r})" for j in found[a])
            raise ManifestError(f"{path}:{line}: {au_column_name(a)} appears in more than one column: {cols}")
    au_cols = [found[a][0] for a in aus]

    taken = {image_col, *au_cols}
    extra: dict[str, int] = {}
    for j, h in enumerate(names):
        if j in taken:
            continue
        if h in extra:
            raise ManifestError(f"{path}:{line}: column name {h!r} appears more than once (columns {extra[h] + 1} and {j + 1})")
        extra[h] = j
    return image_col, au_cols, extra


def _image_problem(path: str) -> str | None:
    try:
        verify_image(path)
    except InputError as e:
        return f"missing image: {path}" if e.status == MISSING else f"unreadable image: {e}"
    return None


def read_image_list(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[int, str]]:
    """``(line, image path)`` of a plain list of images: one per row, in the column named
    ``image`` when the first row names columns (``image`` or AU names: a manifest works too),
    else in the first column of every row. Relative paths start at ``root`` (default: the
    list's folder); URLs are kept as they are.

    Raises ``ManifestError`` naming the file (and line) for text that is not UTF-8 or not CSV.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    rows = _rows(path, _delimiter(path))
    first = next(rows, None)
    if first is None:
        return []
    names = [c.strip().lower() for c in first[1]]
    if "image" in names or any(_AU_HEADER.match(n) for n in names):
        col = names.index("image") if "image" in names else 0
    else:
        col, rows = 0, iter([first, *rows])
    return [(line, _resolve(row[col].strip(), base)) for line, row in rows if len(row) > col and row[col].strip()]


def read_columns(path: str | os.PathLike, columns: Sequence[str], image_column: str | None = None,
                 root: str | os.PathLike | None = None) -> list[tuple[int, str, list[str]]]:
    """``(line, image path, [values of columns])`` of a CSV/TSV with a header and no AU columns
    (e.g. images and their identities). The image is the ``image_column`` (default: the first);
    relative paths start at ``root`` (default: the file's folder).

    Raises ``ManifestError`` naming the file, line and column for a missing column or a short row.
    """
    path = Path(path)
    rows = _rows(path, _delimiter(path))
    first = next(rows, None)
    if first is None:
        raise ManifestError(f"{path} is empty")
    line, header = first[0], [h.strip() for h in first[1]]
    for name in [*columns, *([image_column] if image_column else [])]:
        if name not in header:
            raise ManifestError(f"{path}:{line}: no {name!r} column (columns: {header})")
    image_col = header.index(image_column) if image_column else 0
    cols = [header.index(c) for c in columns]
    base = Path(root) if root is not None else path.parent
    out = []
    for line, row in rows:
        if len(row) <= max(image_col, *cols):
            raise ManifestError(f"{path}:{line}: expected {len(header)} cells, found {len(row)}")
        out.append((line, _resolve(row[image_col].strip(), base), [row[j].strip() for j in cols]))
    if not out:
        raise ManifestError(f"{path} has a header but no rows")
    return out


def write_manifest(path: str | os.PathLike, header: Sequence[str] | None, rows: Iterable[Sequence[object]],
                   only_if_changed: bool = False) -> Path:
    """Write a manifest: tab-separated, the header first (EmotioNet's own form; None for its
    header-less raw files), whole or not at all (:func:`datamodules.io.files.write_text`); with
    ``only_if_changed`` an identical file is left untouched, so the caches keyed on it stay valid.

    Raises ``ValueError`` for a cell holding a tab or a line break (it would shift the columns).
    """
    lines = []
    for cells in ([header] if header is not None else []) + list(rows):
        text = [str(c) for c in cells]
        bad = next((c for c in text if any(ch in c for ch in "\t\n\r")), None)
        if bad is not None:
            raise ValueError(f"{path}: a cell with a tab or line break cannot be written: {bad!r}")
        lines.append("\t".join(text) + "\n")
    return files.write_text(path, "".join(lines), only_if_changed=only_if_changed)


def read_manifest(
    path: str | os.PathLike,
    aus: Sequence[int] = EMOTIONET_AUS,
    root: str | os.PathLike | None = None,
    image_column: str | None = None,
    has_header: bool = True,
    check_images: bool = False,
) -> Manifest:
    """Read a manifest in EmotioNet form.

    The AU set is an argument, not a constant, so DISFA/BP4D users pass their own list. With a
    header, AU columns are found by name (``AU12``, ``AU 12``, ``au012``, ``12``) and all other
    columns except the image go to ``extra``; without one (EmotioNet's raw files) the image comes
    first and then the AUs in the order of ``aus``, with further columns ignored. The delimiter
    follows the suffix (``.tsv``/``.txt`` tab, ``.csv`` comma), else a tab on the first line.

    ``check_images`` opens and fully decodes every local image, so missing or truncated files
    are dropped (and listed in ``skipped``) here rather than crashing a worker mid-epoch. URLs
    are not checked. ``root`` is where relative references live (default: the manifest's folder).

    Raises ``FileNotFoundError`` for a missing file and ``ManifestError`` for anything malformed.
    """
    path = Path(path)
    aus = tuple(int(a) for a in aus)
    if not aus:
        raise ValueError("aus is empty: give at least one AU")
    if len(set(aus)) != len(aus):
        raise ValueError(f"aus has duplicates: {aus}")
    if not path.is_file():
        if path.exists():
            raise ManifestError(f"{path}: not a file")
        raise FileNotFoundError(f"manifest not found: {path}")

    rows = _rows(path, _delimiter(path))
    k = len(aus)
    if has_header:
        first = next(rows, None)
        if first is None:
            raise ManifestError(f"{path} is empty")
        header_line, header = first
        image_col, au_cols, extra_cols = _parse_header(path, header_line, header, aus, image_column)
        expected = len(header)
        col_names = [h.strip() for h in header]
    else:
        if image_column is not None:
            raise ValueError("image_column needs a header (has_header=True)")
        image_col, au_cols, extra_cols = 0, list(range(1, k + 1)), {}
        expected = k + 1
        col_names = ["image", *(au_column_name(a) for a in aus)]

    table = _Table(path, aus, image_col, au_cols, extra_cols, expected, col_names, has_header)
    with _collector_paused():
        table.read(rows)
    if not table.images:
        raise ManifestError(f"{path} has a header but no rows" if has_header else f"{path} is empty")

    raw = np.concatenate(table.values).reshape(len(table.images), k)
    table.values.clear()  # the chunks, before the labels take their room
    manifest = Manifest(
        path=path,
        aus=aus,
        images=table.images,
        labels=(raw == 1).astype(np.float32),
        mask=raw != UNLABELLED,
        lines=np.concatenate(table.lines),
        extra=table.extra,
        root=Path(root) if root is not None else None,
    )
    if check_images:
        manifest = _drop_bad_images(manifest)
    return manifest


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a while. Reading makes no reference cycles, but
    its rows outlive a few collections and so set off full ones, each walking the whole heap: in
    a training process (lightning imported) that was 2 of the 5 s a 1M-row manifest took."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Table:
    """The data rows of a manifest, read a chunk of rows at a time.

    A chunk whose rows are all plain (the header's number of cells, an image, every AU cell
    exactly ``0``, ``1`` or ``999``) is taken in with C-level passes over its columns. Any other
    chunk is read again row by row by :meth:`_add_rows`, the reference reading, which raises the
    first error in file order or takes in values such as `` 1.0 ``: both ways give the same result.
    """

    def __init__(self, path: Path, aus: tuple[int, ...], image_col: int, au_cols: list[int],
                 extra_cols: dict[str, int], expected: int, col_names: list[str], has_header: bool) -> None:
        self.path, self.aus, self.image_col, self.au_cols = path, aus, image_col, au_cols
        self.extra_cols, self.expected, self.col_names, self.has_header = extra_cols, expected, col_names, has_header
        self.images: list[str] = []
        self.values: list[np.ndarray] = [np.zeros(0, np.int16)]  # flat (rows * AUs) int16 per chunk
        self.lines: list[np.ndarray] = [np.zeros(0, np.int64)]
        self.extra: dict[str, list[str]] = {name: [] for name in extra_cols}
        # one string object per distinct value of an extra column, while there are few
        self._shared: dict[str, dict[str, str] | None] = {name: {} for name in extra_cols}
        self._image = itemgetter(image_col)
        # k == 1: itemgetter of one column gives the cell itself, not a 1-tuple
        self._au_cells = itemgetter(*au_cols) if len(au_cols) > 1 else (lambda row, j=au_cols[0]: (row[j],))

    def read(self, rows: Iterator[tuple[int, list[str]]]) -> None:
        while True:
            chunk: list[list[str]] = []
            lines: list[int] = []
            try:
                for line, row in islice(rows, _CHUNK_ROWS):
                    lines.append(line)
                    chunk.append(row)
            except Exception:  # a row that is not CSV or UTF-8: the rows before it are checked first, in order
                try:
                    self._add_chunk(chunk, lines)
                except ManifestError as earlier:
                    raise earlier from None
                raise
            self._add_chunk(chunk, lines)
            if len(chunk) < _CHUNK_ROWS:
                return

    def _add_chunk(self, rows: list[list[str]], lines: list[int]) -> None:
        if not rows:
            return
        if not self._plain_lengths(rows):
            self._add_rows(rows, lines)
            return
        n, k = len(rows), len(self.au_cols)
        images = list(map(str.strip, map(self._image, rows)))
        values = np.fromiter(map(_FAST_VALUES.get, chain.from_iterable(map(self._au_cells, rows)), repeat(_NOT_FAST)),
                             dtype=np.int16, count=n * k)
        if not (all(images) and (values != _NOT_FAST).all()):
            self._add_rows(rows, lines)
            return
        self.images += images
        self.values.append(values)
        self.lines.append(np.asarray(lines, dtype=np.int64))
        for name, j in self.extra_cols.items():
            self._add_extra(name, list(map(str.strip, map(itemgetter(j), rows))))

    def _plain_lengths(self, rows: list[list[str]]) -> bool:
        """Every row has the cells the reference reading accepts without a question."""
        lengths = set(map(len, rows))
        if min(lengths) < self.expected:
            return False
        if self.has_header and max(lengths) > self.expected:  # blank trailing cells only
            return not any(any(c.strip() for c in row[self.expected:]) for row in rows if len(row) > self.expected)
        return True

    def _add_extra(self, name: str, values: list[str]) -> None:
        shared = self._shared[name]
        if shared is not None:
            values = list(map(shared.setdefault, values, values))
            if len(shared) > _SHARED_VALUES_MAX:  # mostly distinct values: sharing saves nothing
                self._shared[name] = None
        self.extra[name] += values

    def _add_rows(self, rows: list[list[str]], lines: list[int]) -> None:
        """The reference reading, row by row: every check in file order, each error naming its cell."""
        path, expected, col_names, image_col = self.path, self.expected, self.col_names, self.image_col
        values: list[list[int]] = []
        for line, row in zip(lines, rows):
            if len(row) < expected:
                raise ManifestError(
                    f"{path}:{line}: expected {expected} cells, found {len(row)} "
                    f"(columns: {', '.join(col_names)})"
                )
            if self.has_header and len(row) > expected and any(c.strip() for c in row[expected:]):
                raise ManifestError(
                    f"{path}:{line}: expected {expected} cells, found {len(row)} (values beyond the header's columns)"
                )
            image = row[image_col].strip()
            if not image:
                raise ManifestError(
                    f"{path}:{line}: column {image_col + 1} ({col_names[image_col]}): empty image reference")
            values.append([_au_value(row[j], path, line, j + 1, a) for j, a in zip(self.au_cols, self.aus)])
        self.images += [row[image_col].strip() for row in rows]
        self.values.append(np.asarray(values, dtype=np.int16).reshape(-1))
        self.lines.append(np.asarray(lines, dtype=np.int64))
        for name, j in self.extra_cols.items():
            self._add_extra(name, [row[j].strip() for row in rows])


def _drop_bad_images(manifest: Manifest) -> Manifest:
    local = [i for i, ref in enumerate(manifest.images) if not is_url(ref)]
    paths = [manifest.resolve(i) for i in local]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_image_problem, paths, chunksize=64))
    skipped = [
        SkippedRow(line=int(manifest.lines[i]), image=manifest.images[i], reason=reason)
        for i, reason in zip(local, problems)
        if reason is not None
    ]
    if not skipped:
        return manifest
    keep = np.ones(len(manifest), dtype=bool)
    keep[[i for i, reason in zip(local, problems) if reason is not None]] = False
    if not keep.any():
        raise ManifestError(
            f"{manifest.path}: none of its {len(manifest)} images could be read "
            f"(first: line {skipped[0].line}: {skipped[0].reason}); is the root right?"
        )
    out = manifest.subset(keep)
    out.skipped = skipped
    return out
