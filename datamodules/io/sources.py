"""What prediction reads: images, folders, globs, lists of images and videos, each frame at a time.

Inputs expand to a list of :class:`Source` (an image or a video file, or a bad entry already
carrying its status), in the order given; folders are walked recursively and sorted. Whatever
cannot be expanded (a folder that cannot be listed, a list file that is empty or not text, a
pattern that matches nothing) becomes a source with its error, so it gets a row. Images are
decoded by :mod:`datamodules.io.images`; videos are streamed with OpenCV's decoder: memory holds
the frames of one batch, never the video.
"""

from __future__ import annotations

import glob
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from datamodules.io.images import (DEFAULT_MAX_PIXELS, EMPTY, IMAGE_SUFFIXES, MISSING, TOO_LARGE, UNREADABLE,
                                InputError, check_file, probe, read_image)
from datamodules.io.manifest import ManifestError, read_image_list

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
MANIFEST_SUFFIXES = (".tsv", ".csv", ".txt")
# Statuses of an output row besides the decoder's (missing, empty, unreadable, too_large).
OK, NO_FACE, BROKEN_VIDEO = "ok", "no_face", "broken_video"
# Decoded frames held at once, in a batch or decoded ahead of it, are capped by pixels as well as
# by count: a folder of 50 MP photos (150 MB each as RGB) holds a few at a time, not a batch's worth.
BATCH_PIXELS = 64_000_000


@dataclass(frozen=True)
class Source:
    """One input to predict on: an image or video file (``path``), an image's bytes (``data``,
    a request row; ``path`` then names it in messages), or an entry that failed to expand
    (``error`` set; ``kind`` may then be folder or list). ``key`` is what the output rows call
    it (the path, or a request's row number)."""

    path: str
    kind: str
    error: InputError | None = None
    data: bytes | None = field(default=None, repr=False)
    key: str | int | None = None

    @property
    def label(self) -> str | int:
        return self.path if self.key is None else self.key


@dataclass
class Frame:
    """A frame on its way to the detector (``pixels`` RGB uint8, ``copy`` its detection copy when
    made while decoding), or an input that yielded none (``error``)."""

    source: Source
    frame: int | None = None  # index in a video
    time_s: float | None = None
    pixels: np.ndarray | None = None
    copy: tuple[np.ndarray, float] | None = None
    error: InputError | None = None

    @property
    def size(self) -> int:
        return 0 if self.pixels is None else self.pixels.shape[0] * self.pixels.shape[1]


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def _walk(folder: Path) -> list[Source]:
    """Images and videos under a folder, sorted; a folder that cannot be listed is a source
    with its error (root can read everything, a user cannot: a share mounted for someone else)."""
    found: list[Source] = []

    def unlisted(e: OSError) -> None:
        found.append(Source(e.filename or str(folder), "folder",
                            InputError(UNREADABLE, f"{e.filename or folder}: cannot list the folder "
                                                   f"({e.strerror or e})")))

    for root, dirs, files in os.walk(folder, onerror=unlisted):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Source(str(Path(root) / f), _kind(Path(f))) for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
    return found


def _listed(path: Path) -> list[Source]:
    """The images and videos a list file names, or one source saying why it cannot be read."""
    try:
        refs = read_image_list(path)
    except (ManifestError, OSError) as e:
        return [Source(str(path), "list", InputError(UNREADABLE, str(e)))]
    if not refs:
        return [Source(str(path), "list", InputError(EMPTY, f"{path}: the list names no image"))]
    return [Source(ref, _kind(Path(ref))) for _, ref in refs]


def expand(inputs: list[str]) -> list[Source]:
    """Images, folders (recursive), globs, lists of images (``.tsv``/``.csv``/``.txt``) and
    videos -> sources, in the order given."""
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if any(c in item for c in "*?[") and not path.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                sources.append(Source(item, "image", InputError(MISSING, f"{item}: the pattern matches no file")))
            for m in matches:
                mp = Path(m)
                sources += _walk(mp) if mp.is_dir() else [Source(m, _kind(mp))]
        elif path.is_dir():
            sources += _walk(path)
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            sources += _listed(path)
        else:
            sources.append(Source(item, _kind(path)))
    return sources


@dataclass
class VideoInfo:
    fps: float
    frames: int  # as the container declares it (may be 0 or approximate)
    width: int
    height: int


def open_video(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video for streaming, or raise :class:`InputError` (missing, empty, not a regular
    file, undecodable, frames over ``max_pixels``)."""
    check_file(path)
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise InputError(BROKEN_VIDEO, f"{path}: OpenCV cannot open it as a video")
    info = VideoInfo(cap.get(cv2.CAP_PROP_FPS) or 0.0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
                     int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    if info.width * info.height > max_pixels:
        cap.release()
        raise InputError(TOO_LARGE, f"{path}: frames of {info.width}x{info.height} are over the limit of "
                                    f"{max_pixels / 1e6:.0f} MP (max_pixels); not decoded")
    return cap, info


def video_frames(path: str, every: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame index, time in seconds, RGB frame)`` of every ``every``-th frame, streamed.

    Skipped frames are only grabbed (demuxed, not converted). Raises :class:`InputError` when
    the video cannot be opened or yields no frame at all; a video that breaks off midway ends
    there (what was decoded stands).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    cap, info = open_video(path, max_pixels)
    fps = info.fps if info.fps > 0 else 0.0
    index = 0
    try:
        while True:
            if index % every:
                if not cap.grab():
                    break
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                t = index / fps if fps else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
                yield index, round(float(t), 4), cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise InputError(BROKEN_VIDEO, f"{path}: no frame could be decoded")


def frames(sources: Iterable[Source], every: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2,
           prepare: Callable[[np.ndarray], tuple[np.ndarray, float]] | None = None, ahead: int = 16,
           budget: int = BATCH_PIXELS) -> Iterator[Frame]:
    """Every frame of the sources, in order; image files and bytes decoded ahead in ``workers``
    threads (with ``prepare``, e.g. the detection copy, made there too) while the caller works
    (``workers=0``: decoded in the caller's thread, when asked for).

    At most ``ahead`` images, and at most ``budget`` pixels, are decoded ahead: each image's
    size is read from its header before it is queued, so the bound holds before any pixel is
    decoded (one image larger than the budget goes through alone). Videos stream frame by frame.
    """
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    pending: deque[tuple[Source, Future | InputError, int]] = deque()  # in order, with their pixels
    held = 0

    def decode(src: Source) -> tuple[np.ndarray, tuple[np.ndarray, float] | None]:
        pixels = read_image(src.data if src.data is not None else src.path, max_pixels, name=src.path)
        return pixels, prepare(pixels) if prepare is not None else None

    def submit(src: Source) -> Future:
        if pool is not None:
            return pool.submit(decode, src)
        done: Future = Future()
        try:
            done.set_result(decode(src))
        except InputError as e:
            done.set_exception(e)
        return done

    def drain(count: int, room: int = 0) -> Iterator[Frame]:
        nonlocal held
        while pending and (len(pending) > count or held + room > budget):
            src, job, size = pending.popleft()
            held -= size
            try:
                if isinstance(job, InputError):
                    raise job
                pixels, copy = job.result()
                yield Frame(src, pixels=pixels, copy=copy)
            except InputError as e:
                yield Frame(src, error=e)

    try:
        for src in sources:
            if src.error is not None:
                pending.append((src, src.error, 0))  # a row in its place, without waiting
            elif src.kind == "video":
                yield from drain(0)
                try:
                    for index, t, rgb in video_frames(src.path, every, max_pixels):
                        yield Frame(src, index, t, rgb)
                except InputError as e:
                    yield Frame(src, error=e)
            else:
                try:
                    size = probe(src.data if src.data is not None else src.path, max_pixels, name=src.path).pixels
                except InputError as e:
                    pending.append((src, e, 0))
                    continue
                yield from drain(ahead - 1, size)
                pending.append((src, submit(src), size))
                held += size
        yield from drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def batches(frames: Iterable[Frame], size: int, pixels: int = BATCH_PIXELS) -> Iterator[list[Frame]]:
    """Frames in batches of at most ``size`` decoded frames holding at most ``pixels`` pixels (a
    larger frame alone); inputs without pixels ride along with the batch they come in."""
    batch: list[Frame] = []
    count = held = 0
    for frame in frames:
        if count and (count == size or held + frame.size > pixels):
            yield batch
            batch, count, held = [], 0, 0
        batch.append(frame)
        if frame.pixels is not None:
            count, held = count + 1, held + frame.size
    if batch:
        yield batch
