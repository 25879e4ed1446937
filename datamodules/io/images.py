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

# Why an input yields no pixels (the status of its output row).
MISSING, EMPTY, UNREADABLE, TOO_LARGE = "missing", "empty", "unreadable", "too_large"


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
          name: str | None = None) -> ImageInfo:
    """Read only the header: format and size, checked against the allowlist and ``max_pixels``.

    Raises :class:`InputError`. Cheap enough to size a batch before decoding it.
    """
    name, handle = _open_source(source, name)
    try:
        with handle, Image.open(handle, formats=FORMATS) as im:
            return _check(im, name, max_pixels)
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes PIL raise: this image only
        raise _failure(name, e) from None


def read_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to RGB uint8 (H, W, 3) with EXIF orientation applied.

    Raises :class:`InputError` (status ``missing``, ``empty``, ``unreadable`` or ``too_large``)
    with a message that names the image (``name`` labels bytes in messages).
    """
    name, handle = _open_source(source, name)
    try:
        with handle, Image.open(handle, formats=FORMATS) as im:  # reads the header only
            _check(im, name, max_pixels)
            ImageOps.exif_transpose(im, in_place=True)  # without an orientation tag: untouched, not copied
            im.load()  # a truncated file fails here rather than yielding grey pixels
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes PIL raise: this image only
        raise _failure(name, e) from None


def verify_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> ImageInfo:
    """Decode the whole image once (nothing kept) and return its header facts, or raise
    :class:`InputError`: the check of a downloaded file or of a manifest's images."""
    name, handle = _open_source(source, name)
    try:
        with handle, Image.open(handle, formats=FORMATS) as im:
            info = _check(im, name, max_pixels)
            im.load()
            return info
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes PIL raise: this image only
        raise _failure(name, e) from None
