"""Decoding work bounded before it starts: JPEG scan bombs, video frames over the pixel limit,
image files named like videos, and the downloader's deadline over its verification. Real PIL,
OpenCV and FFmpeg on real bytes."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from datamodules.download.downloader import DownloadSettings, download_images, is_permanent
from datamodules.io.images import (MAX_JPEG_SCANS, TOO_COSTLY, TOO_LARGE, InputError, jpeg_scans, probe, read_image,
                                   verify_image)
from datamodules.io.sources import BROKEN_VIDEO, Source, frames, video_frames

from .fuzz_inputs import FOREIGN_HEADERS, mjpeg_avi, scan_bomb


def _picture(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (7, 7), 3)
    return Image.fromarray(smooth)


def _encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# JPEG scans


def test_scan_bomb_is_refused_before_decoding(tmp_path):
    bomb = scan_bomb(_encode(_picture(), progressive=True), 3000)
    assert len(bomb) < 200_000 and jpeg_scans(bomb) > 3000
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb)
    for check in (read_image, probe, verify_image):
        for source in (bomb, path):
            start = time.perf_counter()
            with pytest.raises(InputError) as e:
                check(source, name=str(path))
            assert time.perf_counter() - start < 0.5
            assert e.value.status == TOO_COSTLY
            assert str(e.value).startswith(str(path)) and f"more than {MAX_JPEG_SCANS} scans" in str(e.value)
    with pytest.raises(InputError, match="more than 20 scans"):
        read_image(scan_bomb(_encode(_picture(), progressive=True), 20), max_scans=20)


def test_ordinary_jpegs_decode_and_count_their_scans():
    picture = _picture()
    for kw, scans in (({}, 1), ({"progressive": True}, 10), ({"progressive": True, "optimize": True}, 10)):
        data = _encode(picture, **kw)
        assert jpeg_scans(data) == scans
        assert read_image(data).shape == (48, 64, 3)
    grey = _encode(picture.convert("L"), progressive=True)
    assert jpeg_scans(grey) == 6 and read_image(grey).shape == (48, 64, 3)


def test_scan_markers_inside_other_segments_are_not_counted():
    """A comment (or an EXIF thumbnail) full of SOS bytes is skipped by its length, as libjpeg does."""
    data = _encode(_picture(), progressive=True)
    comment = b"\xff\xda\x00\x02" * 1000
    padded = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
    assert jpeg_scans(padded) == 10
    assert read_image(padded).shape == (48, 64, 3)


def test_only_the_first_picture_of_a_multi_picture_file_counts():
    """A camera MPO (and any JPEG followed by another) decodes its first picture only: a scan
    bomb after it is neither counted nor decoded."""
    first = _encode(_picture())
    behind = first + scan_bomb(_encode(_picture(seed=1), progressive=True), 3000)
    assert jpeg_scans(behind) == 1
    np.testing.assert_array_equal(read_image(behind), read_image(first))
    frames_ = [_picture(seed=i) for i in range(3)]
    mpo = _encode(frames_[0], "MPO", save_all=True, append_images=frames_[1:])
    assert probe(mpo).format == "MPO"
    np.testing.assert_array_equal(read_image(mpo), read_image(_encode(frames_[0])))


def test_a_49_megapixel_scan_bomb_is_refused_in_milliseconds(tmp_path):
    """The shape of the reported file: 7000x7000, a few hundred KB, thousands of scans (decoded,
    minutes)."""
    path = tmp_path / "bomb49.jpg"
    path.write_bytes(scan_bomb(_encode(Image.new("RGB", (7000, 7000), (90, 120, 150)), progressive=True), 3000))
    assert path.stat().st_size < 1_000_000
    start = time.perf_counter()
    with pytest.raises(InputError) as e:
        read_image(path)
    assert e.value.status == TOO_COSTLY and time.perf_counter() - start < 0.25


# ---------------------------------------------------------------------------------------------
# videos


def _rows(path: Path, max_pixels: int) -> list[tuple[int | None, str]]:
    """(frame index, status) of each row ``frames`` gives a video."""
    return [(f.frame, "ok" if f.error is None else f.error.status)
            for f in frames([Source(str(path), "video")], max_pixels=max_pixels, workers=0)]


def test_video_frames_over_max_pixels_are_refused(tmp_path):
    small, large = _encode(_picture()), _encode(_picture(640, 480))
    declared = tmp_path / "declared.mp4"
    writer = cv2.VideoWriter(str(declared), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 240))
    for _ in range(3):
        writer.write(np.zeros((240, 320, 3), np.uint8))
    writer.release()
    assert _rows(declared, 50_000) == [(None, TOO_LARGE)]
    assert [s for _, s in _rows(declared, 100_000)] == ["ok"] * 3

    declared_small = tmp_path / "declared_small.avi"  # headers say 64x48, the pictures are 640x480
    declared_small.write_bytes(mjpeg_avi([large] * 3, (64, 48)))
    assert _rows(declared_small, 50_000) == [(None, TOO_LARGE)]

    grows = tmp_path / "grows.avi"  # the second frame is over the limit: the rest is not decoded
    grows.write_bytes(mjpeg_avi([small, large, large, small], (64, 48)))
    assert _rows(grows, 50_000) == [(0, "ok"), (None, TOO_LARGE)]
    with pytest.raises(InputError, match=r"grows.avi frame 1: 640x480"):
        list(video_frames(str(grows), max_pixels=50_000))
    assert [s for _, s in _rows(grows, 400_000)] == ["ok"] * 4


def test_a_scan_bomb_inside_a_motion_jpeg_video_is_refused(tmp_path):
    small = _encode(_picture())
    path = tmp_path / "bomb.avi"
    path.write_bytes(mjpeg_avi([small, scan_bomb(_encode(_picture(), progressive=True), 3000), small], (64, 48)))
    assert _rows(path, 50_000) == [(0, "ok"), (None, TOO_COSTLY)]


def test_image_files_named_like_videos_are_not_decoded(tmp_path):
    picture = _picture()
    files = {fmt: _encode(picture, fmt) for fmt in ("SGI", "PCX", "DDS", "PNG", "JPEG", "TIFF", "BMP")}
    files["dds_header"] = FOREIGN_HEADERS["dds"] + bytes(128)
    for name, data in files.items():
        path = tmp_path / f"{name.lower()}.mp4"
        path.write_bytes(data)
        rows = list(frames([Source(str(path), "video")], workers=0))
        assert len(rows) == 1 and rows[0].pixels is None, name
        assert rows[0].error.status == BROKEN_VIDEO and str(rows[0].error).startswith(str(path))
        assert "not a video container" in str(rows[0].error)


def test_image_codecs_inside_a_video_container_are_not_decoded(tmp_path):
    path = tmp_path / "lossless.mkv"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 5, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write FFV1")
    for _ in range(2):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    with pytest.raises(InputError, match=r"codec 'ffv1' in Matroska/WebM") as e:
        list(video_frames(str(path)))
    assert e.value.status == BROKEN_VIDEO


def test_ordinary_videos_still_stream(tmp_path):
    for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi"), ("mp4v", ".mov"), ("MJPG", ".mkv")):
        path = tmp_path / f"clip_{fourcc}{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5, (64, 48))
        for i in range(3):
            writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
        writer.release()
        got = list(video_frames(str(path)))
        assert [(i, f.shape) for i, _, f in got] == [(i, (48, 64, 3)) for i in range(3)], path.name


# ---------------------------------------------------------------------------------------------
# the downloader


@contextlib.contextmanager
def _serving(files: dict[str, bytes]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_refuses_a_scan_bomb(tmp_path):
    with _serving({"/bomb.jpg": scan_bomb(_encode(_picture(), progressive=True), 3000),
                   "/good.jpg": _encode(_picture(), progressive=True)}) as base:
        results = download_images([base + "/bomb.jpg", base + "/good.jpg"], tmp_path, DownloadSettings(workers=2),
                                  progress=False)
    bomb, good = results[base + "/bomb.jpg"], results[base + "/good.jpg"]
    assert good.status == "downloaded"
    assert bomb.status == "failed" and bomb.reason == "too_costly" and is_permanent(bomb.reason)
    assert "scans" in bomb.detail and bomb.detail.startswith(base + "/bomb.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.path.name]


def test_download_deadline_covers_verification(tmp_path):
    """An image within every limit whose decoding outlasts ``timeout`` (a 9 MP progressive JPEG of
    99 scans, each a pass over all its pixels) fails with ``timeout`` when the deadline passes."""
    slow = scan_bomb(_encode(Image.new("RGB", (3000, 3000), (90, 120, 150)), progressive=True), 0)
    last_start = slow.rfind(b"\xff\xda")
    end = slow.rfind(b"\xff\xd9")
    slow = slow[:end] + slow[last_start:end] * 89 + slow[end:]
    assert jpeg_scans(slow) == 99
    with _serving({"/slow.jpg": slow}) as base:
        start = time.perf_counter()
        results = download_images([base + "/slow.jpg"], tmp_path, DownloadSettings(timeout=0.3, retries=0),
                                  progress=False)
        took = time.perf_counter() - start
    result = results[base + "/slow.jpg"]
    assert result.status == "failed" and result.reason == "timeout", result
    assert "verifying the image" in result.detail and not is_permanent(result.reason)
    assert took < 0.3 + 0.5
    assert list(tmp_path.iterdir()) == []


def test_decode_seconds_gives_up_on_a_slow_image_and_goes_on():
    """An image whose decoding takes longer than ``decode_seconds`` (here its detection copy is
    slow: what the header cannot show) gets a ``too_costly`` frame; the images after it come
    through at once, in order."""
    slow_marker = _encode(_picture(seed=1))

    def prepare(pixels: np.ndarray):
        if pixels.shape == (48, 64, 3) and np.array_equal(pixels, read_image(slow_marker)):
            time.sleep(3)
        return pixels, 1.0

    sources = [Source("slow.jpg", "image", data=slow_marker), Source("a.jpg", "image", data=_encode(_picture(seed=2))),
               Source("b.jpg", "image", data=_encode(_picture(seed=3)))]
    start = time.monotonic()
    got = [(f.source.path, f.error.status if f.error else "ok") for f in
           frames(sources, prepare=prepare, decode_seconds=0.5)]
    assert time.monotonic() - start < 2
    assert got == [("slow.jpg", TOO_COSTLY), ("a.jpg", "ok"), ("b.jpg", "ok")]
    # Without a budget the caller waits for it.
    start = time.monotonic()
    assert [f.error for f in frames(sources[:1], prepare=prepare)] == [None]
    assert time.monotonic() - start >= 3
