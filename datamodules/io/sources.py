"""What prediction reads: images, folders, globs, lists of images and videos, each frame at a time.

Inputs expand to a list of :class:`Source` (an image or a video file, or a bad entry already
carrying its status), in the order given; folders are walked recursively and sorted. Whatever
cannot be expanded (a folder that cannot be listed, a list file that is empty or not text, a
pattern that matches nothing) becomes a source with its error, so it gets a row. Images are
decoded by :mod:`datamodules.io.images`; videos are streamed with OpenCV's decoder: memory holds
the frames of one batch, never the video.

FFmpeg, under OpenCV, reads far more than videos: an SGI, PCX, DDS or TIFF file named ``.mp4``
would be decoded by one of its image demuxers, past the image allowlist. So a video is probed
before any frame is decoded: its first bytes must be a container a camera or phone writes
(MP4/MOV/M4V, AVI, Matroska/WebM, MPEG program or transport stream, ASF/WMV; :func:`sniff_container`),
its codec one of :data:`VIDEO_CODECS` (by the fourcc OpenCV reports), and the frame size it
declares within ``max_pixels``; anything else is a ``broken_video`` or ``too_large`` row naming
what was found. Motion-JPEG frames are independent JPEG pictures whose size may change from one
frame to the next; they are read undecoded from the container and decoded by
:func:`datamodules.io.images.read_image`, so each frame's header is checked (pixels, JPEG scans)
before it is decoded. Frames of other codecs are checked after decoding (OpenCV scales a frame
whose size changed mid-stream to the first frame's size, so what it returns stays within the
declared size; FFmpeg has decoded it at its own size by then, within the codec's own limits).
"""

from __future__ import annotations

import glob
import os
import struct
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from datamodules.io.images import (DEFAULT_MAX_PIXELS, EMPTY, IMAGE_SUFFIXES, MISSING, TOO_COSTLY, TOO_LARGE,
                                UNREADABLE, InputError, check_file, probe, read_image)
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


# Codecs of camera, phone and screen-recorder videos, by the fourcc OpenCV reports (the
# container's codec tag, or the first four letters of FFmpeg's codec name where the container has
# none), lower-cased: H.264, HEVC, AV1, VP8, VP9, MPEG-4 part 2 (and MS-MPEG4, H.263), MPEG-1/2,
# WMV/VC-1, DV and Motion-JPEG. Image codecs (PNG, TIFF, SGI, PCX, BMP, WebP, GIF...) are not here.
VIDEO_CODECS = frozenset({
    "avc1", "avc3", "h264", "x264", "davc",
    "hvc1", "hev1", "hevc", "h265", "x265",
    "av01", "vp80", "vp08", "vp90", "vp09",
    "mp4v", "fmp4", "xvid", "divx", "dx50", "mp42", "mp43", "div3", "msmp", "h263", "s263",
    "mpg1", "mpg2", "mp1v", "mp2v", "m2v1", "mpeg", "pim1", "pim2",
    "wmv1", "wmv2", "wmv3", "wvc1", "wmva", "vc-1",
    "dvsd", "dv25", "dvc ", "dvcp",
})
MJPEG_CODECS = frozenset({"mjpg", "jpeg", "mjpa", "avrn", "dmb1", "mjpe"})
_ASF = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
# ISO base media files that hold pictures, not video: HEIF/HEIC, AVIF, JPEG 2000, Canon raw.
_PICTURE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis",
                             b"jp2 ", b"jpx ", b"jpm ", b"mjp2", b"crx "})


def sniff_container(head: bytes) -> str | None:
    """The video container that the first bytes of a file announce, or None (not one taken)."""
    if head[4:8] in _MP4_BOXES:
        return None if head[4:8] == b"ftyp" and head[8:12] in _PICTURE_BRANDS else "MP4/QuickTime"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "MPEG program or video stream"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "MPEG transport stream"
    if len(head) > 388 and head[4] == head[196] == head[388] == 0x47:
        return "MPEG transport stream (M2TS)"
    if head[:16] == _ASF:
        return "ASF/WMV"
    return None


def _fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    text = struct.pack("<I", code).decode("latin-1")
    return text if text.isprintable() else f"0x{code:08x}"


def _refuse(cap: cv2.VideoCapture, status: str, message: str) -> InputError:
    cap.release()
    return InputError(status, message)


@dataclass
class VideoInfo:
    fps: float
    frames: int  # as the container declares it (may be 0 or approximate)
    width: int
    height: int
    container: str = ""
    codec: str = ""  # the fourcc OpenCV reports
    raw_jpeg: bool = False  # Motion-JPEG read as undecoded JPEG pictures, each checked then decoded


def open_video(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video for streaming, or raise :class:`InputError`: missing, empty, not a regular
    file, not a container and codec taken (``broken_video``), frames over ``max_pixels``
    (``too_large``). No frame is decoded."""
    check_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise InputError(UNREADABLE, f"{path}: {e.strerror or e}") from None
    container = sniff_container(head)
    if container is None:
        raise InputError(BROKEN_VIDEO, f"{path}: not a video container taken (MP4/MOV, AVI, MKV/WebM, MPEG, "
                                       f"WMV); the file starts with {head[:12]!r}; not decoded")
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise _refuse(cap, BROKEN_VIDEO, f"{path}: OpenCV cannot open it as a video ({container})")
    codec = _fourcc(cap)
    if codec.lower() not in VIDEO_CODECS | MJPEG_CODECS:
        raise _refuse(cap, BROKEN_VIDEO, f"{path}: codec {codec!r} in {container} is not a video codec taken "
                                         f"(H.264, HEVC, AV1, VP8/9, MPEG-1/2/4, WMV, DV, Motion-JPEG); not decoded")
    info = VideoInfo(cap.get(cv2.CAP_PROP_FPS) or 0.0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
                     int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     container, codec)
    if info.width < 1 or info.height < 1:
        raise _refuse(cap, BROKEN_VIDEO, f"{path}: the {container} file declares frames of {info.width}x"
                                         f"{info.height}; not decoded")
    if info.width * info.height > max_pixels:
        raise _refuse(cap, TOO_LARGE, f"{path}: frames of {info.width}x{info.height} are over the limit of "
                                      f"{max_pixels / 1e6:g} MP (max_pixels); not decoded")
    if codec.lower() in MJPEG_CODECS:
        # Packets as stored (CAP_PROP_FORMAT -1): each frame's JPEG header is checked before decoding.
        info.raw_jpeg = bool(cap.set(cv2.CAP_PROP_FORMAT, -1))
    return cap, info


def _frame_pixels(path: str, index: int, cap: cv2.VideoCapture, info: VideoInfo, max_pixels: int) -> np.ndarray | None:
    """The RGB pixels of the next frame, None at the end; raises :class:`InputError` for a frame
    over ``max_pixels`` or too costly (its status) or damaged (``broken_video``)."""
    ok, frame = cap.read()
    if not ok or frame is None:
        return None
    name = f"{path} frame {index}"
    if info.raw_jpeg:
        try:
            return read_image(frame.tobytes(), max_pixels, name=name)
        except InputError as e:
            raise e if e.status != UNREADABLE else InputError(BROKEN_VIDEO, str(e)) from None
    h, w = frame.shape[:2]
    if w * h > max_pixels:
        raise InputError(TOO_LARGE, f"{name}: {w}x{h} = {w * h / 1e6:g} MP is over the limit of "
                                    f"{max_pixels / 1e6:g} MP (max_pixels); the rest of the video is not decoded")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def video_frames(path: str, every: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, start_s: float | None = None,
                 end_s: float | None = None, resume_at: int = 0) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame index, time in seconds, RGB frame)`` of every ``every``-th frame, streamed;
    with ``start_s``/``end_s`` only the frames from that time and before that one (indices and
    times stay the video's own; ``every`` counts from the first frame taken); ``resume_at``: the
    frames before this index are passed over undecoded, as a run stopped there would go on.

    Skipped frames are only grabbed (demuxed; a Motion-JPEG frame is not even decoded). Raises
    :class:`InputError` when the video cannot be opened (see :func:`open_video`) or yields no
    frame at all, and, after the frames before it, at a frame over ``max_pixels`` or too costly
    to decode (the rest of the video is not decoded); a video that breaks off midway otherwise
    ends there (what was decoded stands).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    cap, info = open_video(path, max_pixels)
    fps = info.fps if info.fps > 0 else 0.0
    index, first = 0, None  # first: the index of the first frame taken
    try:
        while True:
            t = index / fps if fps else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
            if end_s is not None and t >= end_s:
                break
            if start_s is not None and t < start_s:  # before the start: demuxed only, never decoded
                if not cap.grab():
                    break
                index += 1
                continue
            first = index if first is None else first
            if index < resume_at:  # done by the run this one resumes
                if not cap.grab():
                    break
                index += 1
                continue
            if (index - first) % every:
                if not cap.grab():
                    break
            else:
                rgb = _frame_pixels(path, index, cap, info, max_pixels)
                if rgb is None:
                    break
                if not fps:  # no declared rate: the decoder's position of the frame just read
                    t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
                yield index, round(float(t), 4), rgb
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise InputError(BROKEN_VIDEO, f"{path}: no frame could be decoded")


def frames(sources: Iterable[Source], every: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2,
           prepare: Callable[[np.ndarray], tuple[np.ndarray, float]] | None = None, ahead: int = 16,
           budget: int = BATCH_PIXELS, decode_seconds: float | None = None, start_s: float | None = None,
           end_s: float | None = None, resume_at: int = 0) -> Iterator[Frame]:
    """Every frame of the sources, in order; image files and bytes decoded ahead in ``workers``
    threads (with ``prepare``, e.g. the detection copy, made there too) while the caller works
    (``workers=0``: decoded in the caller's thread, when asked for).

    At most ``ahead`` images, and at most ``budget`` pixels, are decoded ahead: each image's
    size is read from its header before it is queued, so the bound holds before any pixel is
    decoded (one image larger than the budget goes through alone). Videos stream frame by frame.

    ``decode_seconds`` (with ``workers`` > 0) is the last line against an image whose decoding
    is slow in a way its header does not show: one not decoded that long after its decoding
    began gets a ``too_costly`` frame and the rest go on. A thread cannot be stopped, so the
    abandoned decode still runs to its end on its own (its memory bounded by ``max_pixels``);
    what the budget bounds is how long the caller, a server's request, waits for it.

    ``start_s``/``end_s``: of each video, only the frames between these times (images whole).
    ``resume_at``: the first source is a video to go on with from this frame index.
    """
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    pending: deque[tuple[Source, Future | InputError, int, list[float]]] = deque()  # in order, with their pixels
    held = 0

    def decode(src: Source, began: list[float]) -> tuple[np.ndarray, tuple[np.ndarray, float] | None]:
        began.append(time.monotonic())
        pixels = read_image(src.data if src.data is not None else src.path, max_pixels, name=src.path)
        return pixels, prepare(pixels) if prepare is not None else None

    def submit(src: Source, began: list[float]) -> Future:
        if pool is not None:
            return pool.submit(decode, src, began)
        done: Future = Future()
        try:
            done.set_result(decode(src, began))
        except InputError as e:
            done.set_exception(e)
        return done

    def result(src: Source, job: Future, began: list[float]):
        if decode_seconds is None or pool is None:
            return job.result()
        while True:
            left = began[0] + decode_seconds - time.monotonic() if began else 0.05  # not begun: queued
            try:
                return job.result(timeout=max(left, 0.0))
            except TimeoutError:
                if began and time.monotonic() >= began[0] + decode_seconds:
                    job.cancel()
                    raise InputError(TOO_COSTLY, f"{src.path}: not decoded within {decode_seconds:g} s "
                                                 "(decode_seconds); given up") from None

    def drain(count: int, room: int = 0) -> Iterator[Frame]:
        nonlocal held
        while pending and (len(pending) > count or held + room > budget):
            src, job, size, began = pending.popleft()
            held -= size
            try:
                if isinstance(job, InputError):
                    raise job
                pixels, copy = result(src, job, began)
                yield Frame(src, pixels=pixels, copy=copy)
            except InputError as e:
                yield Frame(src, error=e)

    try:
        for n, src in enumerate(sources):
            if src.error is not None:
                pending.append((src, src.error, 0, []))  # a row in its place, without waiting
            elif src.kind == "video":
                yield from drain(0)
                try:
                    for index, t, rgb in video_frames(src.path, every, max_pixels, start_s, end_s,
                                                      resume_at if n == 0 else 0):
                        yield Frame(src, index, t, rgb)
                except InputError as e:
                    yield Frame(src, error=e)
            else:
                try:
                    size = probe(src.data if src.data is not None else src.path, max_pixels, name=src.path).pixels
                except InputError as e:
                    pending.append((src, e, 0, []))
                    continue
                yield from drain(ahead - 1, size)
                began: list[float] = []
                pending.append((src, submit(src, began), size, began))
                held += size
        yield from drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def batches(frames: Iterable[Frame], size: int, pixels: int = BATCH_PIXELS) -> Iterator[list[Frame]]:
    """Frames in batches of at most ``size`` decoded frames holding at most ``pixels`` pixels (a
    larger frame alone); inputs without pixels ride along with the batch they come in. A video's
    first frame starts a batch: its frames fall into the same batches whatever came before it, so
    what depends on the batch (where the detection prior searches whole frames) is the video's own,
    whether it is predicted alone (a rank's share) or after other inputs."""
    batch: list[Frame] = []
    count = held = 0
    for frame in frames:
        starts_video = frame.frame is not None and bool(batch) and batch[-1].source is not frame.source
        if count and (count == size or held + frame.size > pixels or starts_video):
            yield batch
            batch, count, held = [], 0, 0
        batch.append(frame)
        if frame.pixels is not None:
            count, held = count + 1, held + frame.size
    if batch:
        yield batch
