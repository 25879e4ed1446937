"""Images nobody vouched for: one decoder, a format allowlist, a pixel limit, every failure named.

Every image this project reads (training alignment, ``au-detect predict``, the served MLflow
model, the downloader's verification, a manifest's ``check_images``) goes through
:func:`read_image` or :func:`probe`. What they promise:

* Only raster formats a face photo comes in are parsed: JPEG (camera MPO included), PNG, BMP,
  WebP, TIFF and GIF (first frame). PIL knows some forty formats, some of which hand the file to
  an external program (EPS starts Ghostscript); anything outside :data:`FORMATS` is refused
  before any plugin but the allowed ones has looked at it.
* The pixel count is read from the header and checked against ``max_pixels`` before a single
  pixel is decoded (a 100-byte PNG can declare 900 MP).
* The work the decoder will do is bounded before it starts (status ``too_costly`` otherwise):
  every scan of a progressive JPEG passes over the whole image, so a 400 KB file of 49 MP with
  thousands of nearly empty scans takes minutes; the scans are counted by walking the marker
  segments, without decoding, and more than ``max_scans`` (:data:`MAX_JPEG_SCANS`; an ordinary
  progressive JPEG has about 10) are refused. Only the first frame of a multi-frame file (GIF,
  WebP, TIFF pages, a camera's MPO) is ever decoded, so its other frames cost nothing. With both,
  a decode is at most ``max_scans`` passes over ``max_pixels`` (seconds, where thousands of scans
  take minutes). There is no wall-clock budget inside the decoder: it runs in C in the caller's
  thread, and a thread cannot be stopped from outside (the downloader bounds how long it waits
  for a verification instead).
* Only regular files are opened: a FIFO named ``x.jpg`` would block the reader forever, a
  device file would never end.
* Any exception the image library raises while decoding one image (fuzzed files make it raise
  many kinds) becomes that image's :class:`InputError` with status ``unreadable``; the caller
  reports the image and goes on.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# PIL plugin names. MPO (multi-picture JPEG from cameras) is opened by the JPEG plugin.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
# File names that are taken for images: the formats above, by their usual suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: above any camera a face photo comes from, below a bomb

# Scans of one JPEG image: libjpeg's standard progressive script writes 10 (6 for grey), tuned
# encoders a few more; each scan is a pass over the whole image, thousands of them a denial of service.
MAX_JPEG_SCANS = 100

# Why an input yields no pixels (the status of its output row).
MISSING, EMPTY, UNREADABLE, TOO_LARGE = "missing", "empty", "unreadable", "too_large"
TOO_COSTLY = "too_costly"  # a header within max_pixels declaring far more decoding work than a photo needs


class InputError(Exception):
    """An input that yields no pixels; ``status`` says which kind, the message names it and why.

    ``truncated`` marks image data that ends early (a download cut short may be worth asking
    for again; a damaged file is not).
    """

    def __init__(self, status: str, message: str, truncated: bool = False):
        super().__init__(message)
        self.status = status
        self.truncated = truncated


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header declares."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def check_file(path: str | os.PathLike, name: str | None = None) -> int:
    """The size of a regular, non-empty file, or the :class:`InputError` saying what it is instead."""
    name = name or os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(MISSING, f"{name}: no such file") from None
    except OSError as e:  # permission, a loop of links, a name too long...
        raise InputError(UNREADABLE, f"{name}: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the name
        raise InputError(UNREADABLE, f"{name!r}: not a valid file name ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise InputError(UNREADABLE, f"{name}: {kind}")
    if st.st_size == 0:
        raise InputError(EMPTY, f"{name}: the file is empty (0 bytes)")
    return st.st_size


def _open_source(source: str | os.PathLike | bytes, name: str | None) -> tuple[str, BinaryIO]:
    """A readable handle on a regular file or on bytes, or the reason there is none."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "image"
        if not len(source):
            raise InputError(EMPTY, f"{name}: no bytes (an empty image)")
        return name, io.BytesIO(source)
    name = name or os.fspath(source)
    check_file(source, name)
    try:
        return name, open(source, "rb")
    except OSError as e:
        raise InputError(UNREADABLE, f"{name}: {e.strerror or e}") from None


def _check(im: Image.Image, name: str, max_pixels: int) -> ImageInfo:
    w, h = im.size
    if w < 1 or h < 1:
        raise InputError(UNREADABLE, f"{name}: the header declares a {w}x{h} image")
    if w * h > max_pixels:
        raise InputError(TOO_LARGE, f"{name}: {w}x{h} = {w * h / 1e6:.0f} MP is over the limit of "
                                    f"{max_pixels / 1e6:.0f} MP (max_pixels); not decoded")
    return ImageInfo(im.format or "?", w, h, im.mode)


_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = frozenset({0x01, 0xD8})  # TEM, SOI: no length field


def jpeg_scans(data: bytes | bytearray, stop_after: int | None = None) -> int:
    """The scans (SOS segments) of the first image of JPEG ``data``, without decoding any.

    Segments are skipped by their length (an EXIF thumbnail inside APP1 is not counted) and
    entropy-coded data is searched for the next marker, as libjpeg reads them; counting ends at
    the first EOI (a camera MPO's other pictures are never decoded) or past ``stop_after``.
    """
    end, at, scans = len(data), 2, 0
    while True:
        at = data.find(b"\xff", at)  # 0xFF is rare in entropy-coded data: a few hundred per MB
        if at < 0 or at + 1 >= end:
            break
        code = data[at + 1]
        if code in (0x00, 0xFF) or 0xD0 <= code <= 0xD7:  # a stuffed zero, a fill byte, a restart marker
            at += 1
            continue
        at += 2
        if code == _EOI:
            break
        if code in _STANDALONE:
            continue
        if code == _SOS:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
        if at + 2 > end:
            break
        at += int.from_bytes(data[at:at + 2], "big")  # the length counts its own two bytes
    return scans


def _check_work(im: Image.Image, handle: BinaryIO, name: str, max_scans: int) -> None:
    """Refuse a file whose header promises more decoding work than its pixels: too many JPEG scans.

    Other allowed formats decode each pixel of the first frame once (GIF, PNG, BMP, WebP, TIFF's
    first page), which ``max_pixels`` already bounds.
    """
    if im.format not in ("JPEG", "MPO"):
        return
    at = handle.tell()
    handle.seek(0)
    # A BytesIO made from bytes hands them back without a copy; a file is read once more (its
    # compressed bytes, from the page cache: little next to decoding them).
    data = handle.getvalue() if isinstance(handle, io.BytesIO) else handle.read()
    handle.seek(at)
    scans = jpeg_scans(data, stop_after=max_scans)
    if scans > max_scans:
        raise InputError(TOO_COSTLY, f"{name}: a JPEG of more than {max_scans} scans (max_scans; each one a pass "
                                     f"over all {im.width}x{im.height} pixels); not decoded")


def _failure(name: str, e: BaseException) -> InputError:
    """The one translation of the image library's exceptions into an unreadable input."""
    if isinstance(e, InputError):
        return e
    if isinstance(e, Image.DecompressionBombError):  # PIL's own limit, when set below ours
        return InputError(TOO_LARGE, f"{name}: {e} Not decoded.")
    if isinstance(e, Image.UnidentifiedImageError):
        return InputError(UNREADABLE, f"{name}: not an image in an allowed format ({', '.join(FORMATS)})")
    message = f"{type(e).__name__}: {e}"
    truncated = isinstance(e, EOFError) or "truncat" in message.lower()
    return InputError(UNREADABLE, f"{name}: damaged image ({message})", truncated=truncated)


def probe(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
          name: str | None = None, max_scans: int = MAX_JPEG_SCANS) -> ImageInfo:
    """Read only the headers: format and size, checked against the allowlist, ``max_pixels``
    and the decoding work (``max_scans``).

    Raises :class:`InputError`. Cheap enough to size a batch before decoding it.
    """
    name, handle = _open_source(source, name)
    try:
        with handle, Image.open(handle, formats=FORMATS) as im:
            info = _check(im, name, max_pixels)
            _check_work(im, handle, name, max_scans)
            return info
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes PIL raise: this image only
        raise _failure(name, e) from None


def read_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None, max_scans: int = MAX_JPEG_SCANS) -> np.ndarray:
    """Decode an image file (or its bytes) to RGB uint8 (H, W, 3) with EXIF orientation applied.

    Raises :class:`InputError` (status ``missing``, ``empty``, ``unreadable``, ``too_large`` or
    ``too_costly``) with a message that names the image (``name`` labels bytes in messages).
    """
    name, handle = _open_source(source, name)
    try:
        with handle, Image.open(handle, formats=FORMATS) as im:  # reads the header only
            _check(im, name, max_pixels)
            _check_work(im, handle, name, max_scans)
            ImageOps.exif_transpose(im, in_place=True)  # without an orientation tag: untouched, not copied
            im.load()  # a truncated file fails here rather than yielding grey pixels
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes PIL raise: this image only
        raise _failure(name, e) from None


def verify_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None, max_scans: int = MAX_JPEG_SCANS) -> ImageInfo:
    """Decode the whole image once (nothing kept) and return its header facts, or raise
    :class:`InputError`: the check of a downloaded file or of a manifest's images."""
    name, handle = _open_source(source, name)
    try:
        with handle, Image.open(handle, formats=FORMATS) as im:
            info = _check(im, name, max_pixels)
            _check_work(im, handle, name, max_scans)
            im.load()
            return info
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes PIL raise: this image only
        raise _failure(name, e) from None
