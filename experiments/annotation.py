"""Annotated copies of what ``au-detect predict`` saw: each face's box and landmarks, and beside
it a panel listing the AUs that are on with their probability.

Panels are placed by :func:`place_panels` (right of the face, else left, else above or below),
inside the frame and off the other faces. Images are written as JPEG; videos as H.264 MP4 where
this OpenCV build can encode it, else VP9 WebM, else MPEG-4 Part 2 MP4 (which browsers do not
play), whichever :func:`video_codec` finds working first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from datamodules.io.manifest import au_column_name
from datamodules.io.sources import Frame, Source
from lightning_modules.serving.predictor import Face

log = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive

FONT = cv2.FONT_HERSHEY_SIMPLEX
# BGR; a face's box, landmarks and panel border share its colour, so a panel pushed away from
# its face by the others still says whose it is.
PALETTE = ((0, 220, 0), (255, 170, 0), (0, 170, 255), (230, 60, 230), (0, 230, 230), (120, 120, 255))
PANEL_FILL, ON_TEXT, OFF_TEXT = (28, 28, 28), (255, 255, 255), (150, 150, 150)
TOP_WHEN_NONE = 3  # probabilities shown, greyed, for a face with no AU on


@dataclass(frozen=True)
class Style:
    """Sizes for one frame size: text about 12 px tall at 480p and 50 px at 4K."""

    font_scale: float
    text_thickness: int
    line: int  # box and landmark strokes
    pad: int  # inside a panel
    gap: int  # between a box and its panel
    text_height: int  # capitals, above the baseline
    descent: int  # below it
    row: int  # baseline to baseline

    @classmethod
    def for_frame(cls, height: int, width: int) -> Style:
        # The short side sets the size: a portrait photo reads like a landscape one of its size.
        scale = max(0.45, min(height, width) / 1000)
        thickness = max(1, round(1.4 * scale))
        (_, text_h), baseline = cv2.getTextSize("AU0.9", FONT, scale, thickness)
        line = max(2, round(2 * scale))
        pad = max(4, round(text_h / 3))
        return cls(scale, thickness, line, pad, line + max(2, pad // 2), text_h, baseline,
                   text_h + baseline + max(2, pad // 2))


def panel_lines(face: Face, aus: Sequence[int], top: int = TOP_WHEN_NONE) -> list[tuple[str, bool]]:
    """A face's panel, line by line with whether the line is an AU that is on: the AUs on with
    their probability, highest first (``AU12 0.87``); with none on, a line saying so, then the
    ``top`` highest probabilities (drawn grey)."""
    probs = np.asarray(face.probs, dtype=float)
    order = np.argsort(-probs, kind="stable")
    on = [(f"{au_column_name(aus[k])} {probs[k]:.2f}", True) for k in order if face.decisions[k]]
    if on:
        return on
    return [("no AU on", False)] + [(f"{au_column_name(aus[k])} {probs[k]:.2f}", False) for k in order[:top]]


def _columns(lines: Sequence[tuple[str, bool]], style: Style, max_height: int) -> tuple[int, int, int]:
    """Rows per column, the width of a column and the number of columns."""
    rows = max(1, min(len(lines), (max_height - 2 * style.pad) // style.row))
    col_w = max(cv2.getTextSize(t, FONT, style.font_scale, style.text_thickness)[0][0] for t, _ in lines)
    return rows, col_w, math.ceil(len(lines) / rows)


def panel_size(lines: Sequence[tuple[str, bool]], style: Style, frame_height: int) -> tuple[int, int]:
    """Width and height of a panel; lines that would not fit the frame's height go on in a new column."""
    rows, col_w, cols = _columns(lines, style, frame_height)
    spacing = style.row - style.text_height - style.descent  # none after the last row
    return cols * col_w + (cols + 1) * style.pad, rows * style.row - spacing + 2 * style.pad


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _inside(r: Rect, width: int, height: int) -> bool:
    return r[0] >= 0 and r[1] >= 0 and r[2] <= width and r[3] <= height


def _clamp(r: Rect, width: int, height: int) -> Rect:
    w, h = r[2] - r[0], r[3] - r[1]
    x0, y0 = min(max(r[0], 0), width - w), min(max(r[1], 0), height - h)
    return x0, y0, x0 + w, y0 + h


def _candidates(box: Sequence[float], w: int, h: int, gap: int, width: int, height: int) -> list[Rect]:
    """Right of the box, left, above, below; then the same sides aligned to the box's other end.
    Each slides along its side to stay in the frame; off the frame across it, it is not inside."""
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    x1, y1 = math.ceil(box[2]), math.ceil(box[3])

    def along_y(y: int) -> int:
        return min(max(y, 0), height - h)

    def along_x(x: int) -> int:
        return min(max(x, 0), width - w)

    right, left = x1 + gap, x0 - gap - w
    above, below = y0 - gap - h, y1 + gap
    spots = [(right, along_y(y0)), (left, along_y(y0)), (along_x(x0), above), (along_x(x0), below),
             (right, along_y(y1 - h)), (left, along_y(y1 - h)), (along_x(x1 - w), above), (along_x(x1 - w), below)]
    return [(x, y, x + w, y + h) for x, y in spots]


def place_panels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], frame_size: tuple[int, int],
                 gap: int = 4) -> list[Rect]:
    """Where each face's panel goes: the first candidate (right of its box, left, above, below;
    see ``_candidates``) that is inside the frame and overlaps neither another face's box nor a
    panel placed before it; if none is, the candidate, moved inside the frame, that overlaps them
    (and its own box) least. Faces are placed in order, so the first (largest) choose first.

    Args:
        boxes: per face ``x0, y0, x1, y1`` (may reach past the frame).
        sizes: per face its panel's ``(width, height)``; one larger than the frame is cut to it.
        frame_size: ``(width, height)``.
        gap: pixels kept between a panel and any box.

    Returns:
        per face ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive, always within the frame.
    """
    width, height = frame_size
    # Other boxes grown by the gap: a panel touching a box's stroke reads as covering it.
    grown = [(b[0] - gap, b[1] - gap, b[2] + gap, b[3] + gap) for b in boxes]
    placed: list[Rect] = []
    for i, (box, (w, h)) in enumerate(zip(boxes, sizes)):
        w, h = min(int(w), width), min(int(h), height)
        obstacles = [g for j, g in enumerate(grown) if j != i] + placed
        candidates = _candidates(box, w, h, gap, width, height)
        chosen = next((r for r in candidates if _inside(r, width, height)
                       and not any(_overlap(r, o) for o in obstacles)), None)
        if chosen is None:
            moved = [_clamp(r, width, height) for r in candidates]
            chosen = min(moved, key=lambda r: sum(_overlap(r, o) for o in obstacles) + _overlap(r, box))
        placed.append(chosen)
    return placed


@dataclass
class Label:
    """A face's panel: where it goes and what it says."""

    rect: Rect
    lines: list[tuple[str, bool]]


def labels(shape: tuple[int, ...], faces: Sequence[Face], aus: Sequence[int],
           people: Sequence[int | None] | None = None) -> list[Label]:
    """The panels of a frame of this shape (``height, width[, channels]``), one per face, placed;
    with ``people`` (a video's person ids) each panel starts with its face's person."""
    height, width = shape[:2]
    style = Style.for_frame(height, width)
    lines = [panel_lines(f, aus) for f in faces]
    if people is not None:
        lines = [([(f"person {p}", True)] if p is not None and p != "" else []) + ls for ls, p in zip(lines, people)]
    sizes = [panel_size(ls, style, height) for ls in lines]
    rects = place_panels([f.box for f in faces], sizes, (width, height), style.gap)
    return [Label(r, ls) for r, ls in zip(rects, lines)]


def annotate(frame: np.ndarray, faces: list[Face], aus: Sequence[int],
             people: Sequence[int | None] | None = None) -> np.ndarray:
    """BGR copy of an RGB frame with each face's box, landmarks and AU panel drawn; with
    ``people``, each face in its person's colour (the same from frame to frame) and its id."""
    image = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    style = Style.for_frame(*image.shape[:2])
    keys = [p if people is not None and p is not None and p != "" else k
            for k, p in enumerate(people if people is not None else [None] * len(faces))]
    for k, face in zip(keys, faces):  # every box first: a panel pushed onto a face stays readable
        colour = PALETTE[int(k) % len(PALETTE)]
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        cv2.rectangle(image, (x0, y0), (x1, y1), colour, style.line)
        for x, y in face.landmarks:
            cv2.circle(image, (int(round(x)), int(round(y))), style.line + 1, colour, -1)
    for k, label in zip(keys, labels(image.shape, faces, aus, people)):
        x0, y0, x1, y1 = label.rect
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), PANEL_FILL, -1)
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), PALETTE[int(k) % len(PALETTE)], max(1, style.line // 2))
        rows, col_w, _ = _columns(label.lines, style, image.shape[0])
        for n, (text, on) in enumerate(label.lines):
            col, row = divmod(n, rows)
            origin = (x0 + style.pad + col * (col_w + style.pad), y0 + style.pad + row * style.row + style.text_height)
            cv2.putText(image, text, origin, FONT, style.font_scale, ON_TEXT if on else OFF_TEXT,
                        style.text_thickness, cv2.LINE_AA)
    return image


@dataclass(frozen=True)
class Codec:
    """A video format annotated copies can be written in."""

    fourcc: str
    suffix: str
    name: str
    plays_in_browsers: bool


# In order of preference: what browsers play, smallest first.
CODECS = (Codec("avc1", ".mp4", "H.264", True), Codec("VP90", ".webm", "VP9", True),
          Codec("mp4v", ".mp4", "MPEG-4 Part 2", False))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: FFmpeg and OpenCV print a missing encoder's errors (and
    WebM's tag warning) from C, past Python's logging. Anything another thread prints in the
    few milliseconds this lasts is lost too, so it wraps only the opening of a writer."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to keep quiet
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def open_writer(path: str | Path, codec: Codec, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """A VideoWriter for ``size`` (width, height) frames; check ``isOpened()``."""
    with _quiet_stderr():
        return cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec.fourcc), fps, size)


def probe(codec: Codec, size: tuple[int, int] = (64, 48), frames: int = 3) -> bool:
    """Whether this OpenCV build writes ``codec``: a few frames to a temporary file, which must
    have opened and not be empty (a writer can open and then fail to encode)."""
    w, h = size
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "probe" + codec.suffix)
        writer = open_writer(path, codec, 10.0, size)
        try:
            if not writer.isOpened():
                return False
            with _quiet_stderr():
                for k in range(frames):
                    writer.write(np.full((h, w, 3), 60 * k, np.uint8))
        finally:
            with _quiet_stderr():
                writer.release()
        return os.path.isfile(path) and os.path.getsize(path) > 0


def choose_codec(candidates: Sequence[Codec] = CODECS) -> Codec:
    """The first candidate this OpenCV build can write (the last if none can: its writers will
    fail to open and say so); one warning when browsers will not play it."""
    chosen = next((c for c in candidates if probe(c)), candidates[-1])
    if not chosen.plays_in_browsers:
        missing = ", ".join(f"{c.name} ({c.fourcc})" for c in candidates if c is not chosen)
        log.warning("annotated videos will be %s (%s) %s files, which browsers do not play: this OpenCV build "
                    "cannot encode %s; VLC or ffplay play them", chosen.name, chosen.fourcc, chosen.suffix, missing)
    return chosen


@functools.cache
def video_codec() -> Codec:
    """What annotated videos are written in, probed once per process."""
    return choose_codec(CODECS)


def source_fps(path: str) -> float:
    """A video's frame rate, 25 when it does not say."""
    cap = cv2.VideoCapture(path)
    try:
        return cap.get(cv2.CAP_PROP_FPS) or 25.0
    finally:
        cap.release()


class Annotator:
    """Annotated copies under a folder: one JPEG per image, one video per video (see
    :func:`video_codec`), at the source's path relative to the folder all sources share
    (``a/x.jpg`` and ``b/x.jpg`` stay apart).

    No two sources share a copy: ``x.png`` beside ``x.jpg`` keeps its own suffix
    (``x.png.jpg``), and a name taken by then, compared without case (``X.jpg`` and ``x.jpg`` are
    one file on macOS and Windows), gets a number (``x.png-2.jpg``). An image's copy is written
    under a temporary name and renamed, so it is whole or absent."""

    def __init__(self, folder: str, inputs: Sequence[str], sources: Sequence[Source], every: int):
        self.folder, self.every = Path(folder), every
        places = [os.path.dirname(os.path.abspath(s.path)) for s in sources
                  if s.error is None and s.data is None and os.path.isfile(s.path)]
        places += [os.path.abspath(i) for i in inputs if os.path.isdir(i)]  # a folder given keeps its tree
        self.root = Path(os.path.commonpath(places)) if places else None
        self.targets: dict[str, Path] = {}
        self.taken: set[str] = set()  # targets, case-folded
        self.writers: dict[str, cv2.VideoWriter | None] = {}  # None: could not be opened, frames dropped

    def _target(self, source: str, suffix: str) -> Path:
        if source not in self.targets:
            path = Path(os.path.abspath(source))
            rel = path.relative_to(self.root) if self.root is not None else Path(path.name)
            target = (self.folder / rel).with_suffix(suffix)
            if self._is_taken(target):  # x.png beside x.jpg: keep the source's own suffix too
                target = (self.folder / rel).with_name(rel.name + suffix)
            n = 2
            while self._is_taken(target):
                target = (self.folder / rel).with_name(f"{rel.name}-{n}{suffix}")
                n += 1
            target.parent.mkdir(parents=True, exist_ok=True)
            self.taken.add(str(target).casefold())
            self.targets[source] = target
        return self.targets[source]

    def _is_taken(self, target: Path) -> bool:
        return str(target).casefold() in self.taken

    def _open(self, source: str, size: tuple[int, int]) -> cv2.VideoWriter | None:
        codec = video_codec()
        target = self._target(source, codec.suffix)
        writer = open_writer(target, codec, source_fps(source) / self.every, size)
        if writer.isOpened():
            return writer
        log.warning("%s: cannot write its annotated copy %s (%s, %dx%d); frames not annotated",
                    source, target, codec.name, *size)
        return None

    def add(self, frame: Frame, faces: list[Face], aus, people: Sequence[int | None] | None = None) -> None:
        image = annotate(frame.pixels, faces, aus, people)
        source = frame.source.path
        if frame.frame is None:
            target = self._target(source, ".jpg")
            # the suffix last: it tells imwrite the format
            tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.jpg")
            try:
                if cv2.imwrite(str(tmp), image):
                    os.replace(tmp, target)
                else:
                    log.warning("%s: could not write its annotated copy %s", source, target)
            finally:
                tmp.unlink(missing_ok=True)
            return
        if source not in self.writers:
            h, w = image.shape[:2]
            self.writers[source] = self._open(source, (w, h))
        writer = self.writers[source]
        if writer is not None:
            writer.write(image)

    def close(self) -> None:
        for w in self.writers.values():
            if w is not None:
                w.release()
