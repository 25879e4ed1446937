"""Mutated image files for the fuzz tests: bits flipped, bytes overwritten, files truncated,
spliced with each other, chunks repeated or cut, headers of other formats, dimensions inflated,
JPEG scans repeated by the thousand (scan bombs); and videos: Motion-JPEG AVIs whose frames are
over the pixel limit (declared so, or declared small, or growing mid-stream), carry a scan bomb,
are mutated, or are image files named like videos.

``python -m tests.fuzz_inputs DIR N SEED`` decodes N mutations of the seed files in DIR with
the project's decoder, then :data:`VIDEOS` videos with the project's video reader, and prints a
JSON summary; the test runs it in a child process so that a
hang or a crash inside a C decoder fails the test (with the input that caused it) instead of
taking the test run down. The child writes each input to ``DIR/current.bin`` before decoding
it, so the input that hung or crashed is there to look at.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

# Starts of files in formats the decoder must refuse, some of which PIL would hand to an external
# program or parse with a rarely used plugin.
FOREIGN_HEADERS = {
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n",
    "eps_binary": b"\xc5\xd0\xd3\xc6" + b"\x20\x00\x00\x00" * 6,
    "pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n",
    "psd": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x30\x00\x00\x00\x40\x00\x08\x00\x03",
    "ico": b"\x00\x00\x01\x00\x01\x00\x30\x30\x00\x00\x01\x00\x20\x00",
    "svg": b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg' width='64' height='48'/>",
    "html": b"<!DOCTYPE html><html><body>not an image</body></html>",
    "jpeg2000": b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ",
    "mp4": b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",
    "zip": b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
    "fits": b"SIMPLE  =                    T" + b" " * 50,
    "xbm": b"#define im_width 64\n#define im_height 48\nstatic char im_bits[] = {0x00};\n",
    "ppm": b"P6\n64 48\n255\n",
    "tga": b"\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x30\x00\x18\x00",
    "dds": b"DDS \x7c\x00\x00\x00\x07\x10\x00\x00",
    "qoi": b"qoif\x00\x00\x00\x40\x00\x00\x00\x30\x03\x00",
}
INTERESTING = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
VIDEOS = 120  # fuzzed videos per run, each a small file
VIDEO_MAX_PIXELS = 100_000  # the limit videos are read with: a 640x480 frame is over it


def jpeg_scans_at(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each scan of a well-formed JPEG: its SOS segment and entropy-coded data."""
    import re

    scans, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        code = data[at + 1]
        if code == 0xD9:
            break
        end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if code == 0xDA:
            found = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end)
            end = found.start() if found else len(data)
            scans.append((at, end))
        at = end
    return scans


def scan_bomb(jpeg: bytes, scans: int) -> bytes:
    """``jpeg`` with its shortest scan repeated ``scans`` times more: the shape of the progressive
    JPEG whose every scan is another pass over all its pixels (a JPEG without scans is returned
    as it is)."""
    found = jpeg_scans_at(jpeg)
    if not found:
        return jpeg
    start, end = min(found, key=lambda s: s[1] - s[0])
    return jpeg[:end] + jpeg[start:end] * scans + jpeg[end:]


def _riff(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def mjpeg_avi(frames: list[bytes], size: tuple[int, int], fps: int = 5) -> bytes:
    """An AVI of Motion-JPEG ``frames`` (JPEG files) whose headers declare frames of ``size``
    (w, h), whatever the JPEG pictures inside are."""
    w, h = size
    n = len(frames)
    avih = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, 0, w, h, 0, 0, 0, 0)
    strh = b"vids" + b"MJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, fps, 0, n, 0, 0xFFFFFFFF, 0,
                                           0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    hdrl = _riff(b"LIST", b"hdrl" + _riff(b"avih", avih)
                 + _riff(b"LIST", b"strl" + _riff(b"strh", strh) + _riff(b"strf", strf)))
    movi, index, at = b"", b"", 4
    for frame in frames:
        chunk = _riff(b"00dc", frame)
        index += b"00dc" + struct.pack("<III", 0x10, at, len(frame))
        movi += chunk
        at += len(chunk)
    body = b"AVI " + hdrl + _riff(b"LIST", b"movi" + movi) + _riff(b"idx1", index)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _jpeg(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


def video_corpus(scene: np.ndarray, n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` named videos (``.avi`` or ``.mp4`` bytes): honest Motion-JPEG AVIs of ``scene``,
    ones with frames over :data:`VIDEO_MAX_PIXELS` (declared, declared small, or from the second
    frame on), with a scan bomb for a frame, image files (SGI, PCX, PNG, JPEG...) and foreign
    headers named ``.mp4``, and byte mutations of all of them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(scene).resize((64, 48))
    big = Image.fromarray(scene).resize((640, 480))
    frame, large = _jpeg(small, quality=80), _jpeg(big, quality=60)
    bomb = scan_bomb(_jpeg(small, progressive=True), 400)
    pictures = {}
    for fmt in ("SGI", "PCX", "PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"):
        buf = io.BytesIO()
        (small.convert("P") if fmt == "GIF" else small).save(buf, fmt)
        pictures[fmt.lower()] = buf.getvalue()
    bases = {
        "honest.avi": mjpeg_avi([frame] * 3, (64, 48)),
        "declared_large.avi": mjpeg_avi([large] * 2, (640, 480)),
        "declared_small.avi": mjpeg_avi([large] * 2, (64, 48)),
        "grows.avi": mjpeg_avi([frame, large, large], (64, 48)),
        "scan_bomb.avi": mjpeg_avi([frame, bomb, frame], (64, 48)),
    }
    bases |= {f"image_{k}.mp4": v for k, v in pictures.items()}
    bases |= {f"foreign_{k}.mp4": v + bytes(64) for k, v in FOREIGN_HEADERS.items()}
    items = list(bases.items())
    names, values = list(bases), list(bases.values())
    while len(items) < n:
        i = int(rng.integers(0, 5))  # mutate the videos, not the pictures
        kind, data = mutate(values[i], values, rng)
        items.append((f"{len(items):05d}_{kind}_{names[i]}", data))
    return items[:n]


def seed_images(scene: np.ndarray) -> dict[str, bytes]:
    """The same small picture in every allowed format, and in the modes cameras and editors
    write (grey, palette, RGBA, 16-bit, CMYK), plus EXIF-rotated and multi-frame files."""
    from PIL import Image

    rgb = Image.fromarray(scene)
    out = {}

    def save(name: str, image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("jpeg", rgb, "JPEG", quality=85)
    save("jpeg_progressive", rgb, "JPEG", quality=70, progressive=True)
    save("jpeg_cmyk", rgb.convert("CMYK"), "JPEG")
    exif = rgb.getexif()
    exif[0x0112] = 6
    save("jpeg_exif", rgb, "JPEG", exif=exif)
    save("png", rgb, "PNG")
    save("png_rgba", rgb.convert("RGBA"), "PNG")
    save("png_grey16", rgb.convert("I").point(lambda v: v * 256).convert("I;16"), "PNG")
    save("png_palette", rgb.convert("P"), "PNG")
    save("bmp", rgb, "BMP")
    save("bmp_1bit", rgb.convert("1"), "BMP")
    save("webp", rgb, "WEBP", quality=80)
    save("webp_lossless", rgb, "WEBP", lossless=True)
    save("tiff", rgb, "TIFF")
    save("tiff_lzw", rgb, "TIFF", compression="tiff_lzw")
    save("tiff_jpeg", rgb, "TIFF", compression="jpeg")
    save("gif", rgb.convert("P"), "GIF")
    save("gif_animated", rgb.convert("P"), "GIF", save_all=True,
         append_images=[rgb.rotate(90).convert("P")], duration=100, loop=0)
    return out


def _inflate_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """The header claims a huge or odd size (a decompression bomb's shape) where we know the format."""
    size = int(rng.choice([0, 1, 65535, 30000, 2**31 - 1, 2**32 - 1]))
    b = bytearray(data)
    if data.startswith(b"\x89PNG") and len(b) >= 33:
        b[16:24] = struct.pack(">II", size, size)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)  # a valid IHDR checksum
    elif data.startswith(b"BM") and len(b) >= 26:
        b[18:26] = struct.pack("<ii", min(size, 2**31 - 1), min(size, 2**31 - 1))
    elif data.startswith(b"GIF") and len(b) >= 10:
        b[6:10] = struct.pack("<HH", size & 0xFFFF, size & 0xFFFF)
    elif data.startswith(b"\xff\xd8"):
        at = data.find(b"\xff\xc0") if b"\xff\xc0" in data else data.find(b"\xff\xc2")
        if at > 0 and len(b) > at + 9:
            b[at + 5:at + 9] = struct.pack(">HH", size & 0xFFFF, size & 0xFFFF)
    return bytes(b)


def mutate(data: bytes, others: list[bytes], rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutation of ``data`` (``others`` to splice with): its kind and the bytes."""
    kind = str(rng.choice(["flip", "overwrite", "truncate", "splice", "repeat", "cut", "foreign", "inflate",
                           "prefix", "scans"]))
    b = bytearray(data)
    n = len(b)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 17))):
            i = int(rng.integers(0, n))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "overwrite":
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(0, n))] = int(rng.choice(INTERESTING))
    elif kind == "truncate":
        b = b[: int(rng.integers(0, n))]
    elif kind == "splice":
        other = others[int(rng.integers(0, len(others)))]
        b = b[: int(rng.integers(0, n))] + other[int(rng.integers(0, len(other))):]
    elif kind == "repeat":
        i, j = sorted(int(x) for x in rng.integers(0, n, 2))
        b = b[:j] + b[i:j] * int(rng.integers(2, 5)) + b[j:]
    elif kind == "cut":
        i, j = sorted(int(x) for x in rng.integers(0, n, 2))
        b = b[:i] + b[j:]
    elif kind == "foreign":
        header = list(FOREIGN_HEADERS.values())[int(rng.integers(0, len(FOREIGN_HEADERS)))]
        b = bytearray(header) + b[len(header):] if rng.random() < 0.5 else bytearray(header)
    elif kind == "inflate":
        b = bytearray(_inflate_dimensions(data, rng))
    elif kind == "scans":  # a scan bomb made of this JPEG, or of another one
        jpegs = [data] if data.startswith(b"\xff\xd8") else [o for o in others if o.startswith(b"\xff\xd8")]
        if jpegs:
            b = bytearray(scan_bomb(jpegs[int(rng.integers(0, len(jpegs)))], int(rng.integers(50, 3000))))
    else:  # another format's magic in front of this one's body
        other = others[int(rng.integers(0, len(others)))]
        b = bytearray(other[:16]) + b[16:]
    return kind, bytes(b)


def corpus(seeds: dict[str, bytes], n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` named inputs: every seed as it is, every foreign header, then mutations."""
    rng = np.random.default_rng(seed)
    items = [(f"seed_{k}", v) for k, v in seeds.items()] + [(f"foreign_{k}", v) for k, v in FOREIGN_HEADERS.items()]
    items += [("empty", b""), ("one_byte", b"\xff")]
    names, values = list(seeds), list(seeds.values())
    while len(items) < n:
        base = names[int(rng.integers(0, len(names)))]
        kind, data = mutate(seeds[base], values, rng)
        items.append((f"{len(items):05d}_{base}_{kind}", data))
    return items[:n]


def _read_videos(folder: Path, seed: int) -> tuple[dict[str, int], int, list[str]]:
    """Every video of :func:`video_corpus` through the video reader: frames, or InputError naming it."""
    from PIL import Image

    from datamodules.io.images import InputError
    from datamodules.io.sources import video_frames

    scene = np.asarray(Image.open(io.BytesIO((folder / "seed_jpeg.bin").read_bytes())).convert("RGB"))
    statuses: dict[str, int] = {}
    frames, failures = 0, []
    for name, data in video_corpus(scene, VIDEOS, seed):
        path = folder / f"current{Path(name).suffix}"
        path.write_bytes(data)  # the culprit, if this one hangs or crashes
        try:
            for _, _, rgb in video_frames(str(path), max_pixels=VIDEO_MAX_PIXELS):
                if rgb.shape[0] * rgb.shape[1] > VIDEO_MAX_PIXELS:
                    failures.append(f"{name}: a frame of {rgb.shape} over the limit")
                frames += 1
            statuses["ok"] = statuses.get("ok", 0) + 1
        except InputError as e:
            statuses[e.status] = statuses.get(e.status, 0) + 1
            if not str(e).startswith(str(path)):
                failures.append(f"{name}: message does not name the video: {e}")
        except BaseException as e:  # noqa: BLE001 - exactly what the test is looking for
            failures.append(f"{name}: {type(e).__name__}: {e}")
        path.unlink()
    return statuses, frames, failures


def _decode_all(folder: Path, n: int, seed: int) -> dict:
    from datamodules.io.images import InputError, read_image

    seeds = {p.stem: p.read_bytes() for p in sorted(folder.glob("seed_*.bin"))}
    seeds = {k[len("seed_"):]: v for k, v in seeds.items()}
    statuses: dict[str, int] = {}
    decoded, failures = 0, []
    start = time.perf_counter()
    for name, data in corpus(seeds, n, seed):
        (folder / "current.bin").write_bytes(data)  # the culprit, if this one hangs or crashes
        try:
            pixels = read_image(data, max_pixels=4_000_000, name=name)
        except InputError as e:
            statuses[e.status] = statuses.get(e.status, 0) + 1
            if str(e).split(":")[0] != name:
                failures.append(f"{name}: message does not name the input: {e}")
            continue
        except BaseException as e:  # noqa: BLE001 - exactly what the test is looking for
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
            failures.append(f"{name}: decoded to {pixels.dtype} {pixels.shape}")
        decoded += 1
    (folder / "current.bin").unlink()
    video_statuses, video_frames, video_failures = _read_videos(folder, seed)
    return {"inputs": n, "decoded": decoded, "statuses": statuses, "failures": failures + video_failures,
            "videos": VIDEOS, "video_frames": video_frames, "video_statuses": video_statuses,
            "seconds": round(time.perf_counter() - start, 2)}


if __name__ == "__main__":
    print(json.dumps(_decode_all(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
