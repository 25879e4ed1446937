"""What prediction reads: images, folders, globs, manifests and videos, each frame at a time.

Inputs expand to a list of :class:`Source` (an image or a video file, or a bad entry already
carrying its status), in the order given; folders are walked recursively and sorted. Images are
checked before decoding: an empty file, a file that is not an image, and an image whose header
declares more pixels than ``max_pixels`` (a decompression bomb) are refused without decoding
it. Videos are streamed with OpenCV's decoder (the one alignment already uses): memory holds
the frames of one batch, never the video.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
MANIFEST_SUFFIXES = (".tsv", ".csv", ".txt")
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: above any camera a face photo comes from, below a bomb

# Statuses of an output row.
OK, NO_FACE, MISSING, EMPTY, UNREADABLE, TOO_LARGE, BROKEN_VIDEO = (
    "ok", "no_face", "missing", "empty", "unreadable", "too_large", "broken_video")


class InputError(Exception):
    """A source that yields no pixels; ``status`` is the row's status, the message says why."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Source:
    """One file to predict on (``kind``: image or video), or an entry that failed to expand."""

    path: str
    kind: str
    error: InputError | None = None


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def _walk(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
    return found


def manifest_images(path: Path) -> list[str]:
    """Image references of a manifest: its ``image`` column (else its first), relative to its folder."""
    text = path.read_text(encoding="utf-8-sig")
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.reader(text.splitlines(), dialect=dialect))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    col = header.index("image") if "image" in header else 0
    out = []
    for row in rows[1:]:
        if len(row) > col and row[col].strip():
            ref = Path(row[col].strip())
            out.append(str(ref if ref.is_absolute() else path.parent / ref))
    return out


def expand(inputs: list[str]) -> list[Source]:
    """Images, folders (recursive), globs, manifests (``.tsv``/``.csv``/``.txt``) and videos -> sources."""
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if any(c in item for c in "*?[") and not path.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                sources.append(Source(item, "image", InputError(MISSING, f"{item}: the pattern matches no file")))
            for m in matches:
                mp = Path(m)
                sources += [Source(str(p), _kind(p)) for p in _walk(mp)] if mp.is_dir() else [Source(m, _kind(mp))]
        elif path.is_dir():
            sources += [Source(str(p), _kind(p)) for p in _walk(path)]
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            sources += [Source(ref, _kind(Path(ref))) for ref in manifest_images(path)]
        else:
            sources.append(Source(item, _kind(path)))
    return sources


def read_image(source: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to RGB uint8 with EXIF orientation applied, or raise
    :class:`InputError` saying why not; ``name`` labels bytes in messages."""
    if isinstance(source, (bytes, bytearray)):
        name, size, handle = name or "image", len(source), io.BytesIO(source)
    else:
        name, handle = name or source, source
        try:
            size = os.path.getsize(source)
        except FileNotFoundError:
            raise InputError(MISSING, f"{name}: no such file") from None
        except OSError as e:
            raise InputError(UNREADABLE, f"{name}: {e.strerror or e}") from None
    if size == 0:
        raise InputError(EMPTY, f"{name}: the file is empty (0 bytes)")
    try:
        with Image.open(handle) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(TOO_LARGE, f"{name}: {w}x{h} = {w * h / 1e6:.0f} MP is over the limit of "
                                            f"{max_pixels / 1e6:.0f} MP (max_pixels); not decoded")
            ImageOps.exif_transpose(im, in_place=True)  # without an orientation tag: untouched, not copied
            im.load()  # a truncated file fails here rather than yielding grey pixels
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(UNREADABLE, f"{name}: not an image file PIL can read") from None
    except Image.DecompressionBombError as e:  # PIL refuses at twice its own limit, before our check
        raise InputError(TOO_LARGE, f"{name}: {e} Not decoded.") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(UNREADABLE, f"{name}: damaged image ({type(e).__name__}: {e})") from None


@dataclass
class VideoInfo:
    fps: float
    frames: int  # as the container declares it (may be 0 or approximate)
    width: int
    height: int


def open_video(path: str) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video for streaming, or raise :class:`InputError` (missing, empty, undecodable)."""
    if not os.path.exists(path):
        raise InputError(MISSING, f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise InputError(EMPTY, f"{path}: the file is empty (0 bytes)")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise InputError(BROKEN_VIDEO, f"{path}: OpenCV cannot open it as a video")
    info = VideoInfo(cap.get(cv2.CAP_PROP_FPS) or 0.0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
                     int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return cap, info


def video_frames(path: str, every: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame index, time in seconds, RGB frame)`` of every ``every``-th frame, streamed.

    Skipped frames are only grabbed (demuxed, not converted). Raises :class:`InputError` when
    the video cannot be opened or yields no frame at all; a video that breaks off midway ends
    there (what was decoded stands).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    cap, info = open_video(path)
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
