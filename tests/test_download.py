"""The manifest image downloader against a local HTTP server that misbehaves in every usual way.

Every test talks only to a ``ThreadingHTTPServer`` on 127.0.0.1 that the test itself starts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from datamodules.download.downloader import (
    DownloadReport,
    DownloadSettings,
    download_images,
    download_manifests,
    local_name,
)
from datamodules.io.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
SLOW_SLEEP = 2.0
TRICKLE_SECONDS = 60  # how long the trickling and hanging routes last if nobody cuts them
CHUNKED_IMAGES = 40
# timeout: each file's whole transfer, retries included; under SLOW_SLEEP, with room for a retry on a busy machine
FAST = DownloadSettings(workers=8, timeout=1.5, retries=1, backoff=0.01, max_bytes=1_000_000)


# ---------------------------------------------------------------------------------------------
# content served


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 3, y * 3, (x + y) * 2], -1) % 256
    return (base + rng.integers(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)


@functools.cache
def good_images() -> dict[str, tuple[bytes, str]]:
    return {
        "a.jpg": (_encode(_picture(1), "JPEG", quality=90), "image/jpeg"),
        "b.png": (_encode(_picture(2), "PNG"), "image/png"),
        "c.gif": (_encode(_picture(3), "GIF"), "image/gif"),
        "d.webp": (_encode(_picture(4), "WEBP"), "image/webp"),
    }


@functools.cache
def chunked_images() -> list[bytes]:
    """~200 KB JPEGs (noise compresses badly) for the kill test."""
    rng = np.random.default_rng(7)
    return [
        _encode(rng.integers(0, 256, (280, 280, 3), dtype=np.uint8), "JPEG", quality=95, subsampling=0)
        for _ in range(CHUNKED_IMAGES)
    ]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.cache
def bomb_png() -> bytes:
    """A 30000x30000 1-bit PNG header (900 Mpixels) with a token IDAT: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 3751 * 8)) + _png_chunk(b"IEND", b""))


HTML = b"<!DOCTYPE html>\n<html><head><title>Photo not available</title></head><body>gone</body></html>\n"


class Handler(BaseHTTPRequestHandler):
    server: "Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None,
              length: int | None = -1) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length == -1:
            length = len(body)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes) -> None:
        for i in range(min(len(data), TRICKLE_SECONDS)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(1)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", ctype="text/plain", headers={"Location": location})

    def do_GET(self) -> None:
        n = self.server.hit(self.path)
        try:
            self._route(n)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout, a size limit, a SIGKILL): expected

    def _route(self, n: int) -> None:
        p = self.path
        good = good_images()
        if p.startswith("/img/") and p[5:] in good:
            body, ctype = good[p[5:]]
            self._send(200, body, ctype)
        elif p in ("/404", "/410", "/403", "/503"):
            self._send(int(p[1:]), b"no", ctype="text/plain")
        elif m := re.fullmatch(r"/status/(\d{3})", p):
            self._send(int(m.group(1)), b"no", ctype="text/plain")
        elif m := re.fullmatch(r"/busy/(\w+)/\w+", p):  # 503 + Retry-After once, then the image
            if n == 1:
                self._send(503, b"busy", ctype="text/plain", headers={"Retry-After": m.group(1)})
            else:
                self._send(200, good["a.jpg"][0])
        elif p.startswith("/trickle-body"):  # the headers at once, then one byte a second
            self._send(200, b"", length=len(good["a.jpg"][0]))
            self._trickle(good["a.jpg"][0])
        elif p.startswith("/trickle-headers"):  # the status line and headers one byte a second
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: {'x' * 100}\r\n\r\n"
            self.close_connection = True
            self._trickle(head.encode())
        elif p.startswith("/hang"):  # accepts the request, never answers
            time.sleep(TRICKLE_SECONDS)
        elif p == "/flaky":
            if n == 1:
                self._send(500, b"oops", ctype="text/plain")
            else:
                self._send(200, good["a.jpg"][0])
        elif p == "/slow":
            time.sleep(SLOW_SLEEP)
            self._send(200, good["a.jpg"][0])
        elif p == "/truncated":
            body = good["a.jpg"][0]
            self._send(200, body[: len(body) // 2], length=len(body))
        elif p == "/cut-jpeg":  # a consistent transfer of an image file that ends early
            body = good["a.jpg"][0]
            self._send(200, body[: len(body) // 2])
        elif p == "/html":
            self._send(200, HTML, ctype="image/jpeg")
        elif p == "/garbage":
            self._send(200, bytes(np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8)))
        elif p == "/huge":
            self._send(200, good["a.jpg"][0][:1000], length=10**9)
        elif p == "/endless":
            self._send(200, b"", length=None)
            chunk, sent = b"\xff\xd8\xff" + b"\0" * (64 * 1024 - 3), 0
            while sent < 50_000_000:
                self.wfile.write(chunk)
                sent += len(chunk)
        elif p == "/loop":
            self._redirect("/loop")
        elif p == "/redirect":
            self._redirect("/img/a.jpg")
        elif p == "/to-file":
            self._redirect("file:///etc/passwd")
        elif m := re.fullmatch(r"/hops/(\d+)(/\w+)?", p):  # a chain of k redirects; the tag names the chain
            k, tag = int(m.group(1)), m.group(2) or ""
            if k > 0:
                self._redirect(f"/hops/{k - 1}{tag}")
            else:
                self._send(200, good["b.png"][0], "image/png")
        elif p == "/bomb":
            self._send(200, bomb_png(), "image/png")
        elif p == "/empty":
            self._send(200, b"")
        elif m := re.fullmatch(r"/chunked/(\d+)\.jpg", p):
            body = chunked_images()[int(m.group(1))]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 4096):
                self.wfile.write(body[i:i + 4096])
                self.wfile.flush()
                time.sleep(0.004)
        else:
            self._send(404, b"unknown route", ctype="text/plain")


class KeepAliveHandler(Handler):
    protocol_version = "HTTP/1.1"  # connections stay open between requests, as real servers' do


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections when 8 workers connect at once

    def __init__(self, handler: type[Handler] = Handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.connections = 0
        self._lock = threading.Lock()

    def hit(self, path: str) -> int:
        with self._lock:
            self.counts[path] += 1
            self.times.setdefault(path, []).append(time.monotonic())
            return self.counts[path]

    def process_request(self, request, client_address) -> None:
        with self._lock:
            self.connections += 1  # one per TCP connection accepted
        super().process_request(request, client_address)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def handle_error(self, request, client_address) -> None:  # clients that vanish are expected
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def _serving(handler: type[Handler]) -> Iterator[Server]:
    good_images(), bomb_png()  # encoded before serving, not inside the first requests' deadlines
    srv = Server(handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server():
    with _serving(Handler) as srv:
        yield srv


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A URL whose host never completes a connection: a listening socket whose backlog is full
    and never accepted (SYNs are dropped, as by a dead host behind a firewall)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/face.jpg"
    finally:
        for s in fillers + [listener]:
            s.close()


@pytest.fixture
def keepalive_server():
    with _serving(KeepAliveHandler) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------
# the manifest end to end

GOOD = ["/img/a.jpg", "/img/b.png", "/img/c.gif", "/img/d.webp", "/flaky", "/redirect", "/hops/2/ok"]
EXPECTED_FAILED = {
    "empty": 1,
    "http_403": 1,
    "http_404": 1,
    "http_410": 1,
    "http_503": 1,
    "not_an_image": 2,      # /html (served as image/jpeg), /garbage
    "timeout": 1,           # /slow
    "too_large": 2,         # /huge (declared), /endless (streamed)
    "too_many_pixels": 1,   # /bomb
    "too_many_redirects": 2,  # /loop, /hops/6
    "truncated": 2,         # /truncated (short transfer), /cut-jpeg (the image itself ends early)
    "unsupported_scheme": 2,  # file:///etc/hosts, /to-file (redirect to file://)
}


def _train_rows(base: str) -> list[tuple[str, str, str]]:
    u = lambda p: base + p  # noqa: E731
    return [
        (u("/img/a.jpg"), "1", "0"),
        (u("/img/b.png"), "0", "999"),
        (u("/404"), "1", "1"),
        (u("/img/a.jpg"), "0", "1"),  # duplicate URL: fetched once, both rows kept
        ("file:///etc/hosts", "1", "0"),
        (u("/flaky"), "999", "1"),
        (u("/410"), "0", "0"),
        (u("/slow"), "1", "0"),
        (u("/truncated"), "0", "1"),
        (u("/html"), "1", "1"),
        (u("/huge"), "0", "0"),
        (u("/endless"), "1", "0"),
        (u("/loop"), "0", "1"),
        (u("/redirect"), "1", "999"),
        (u("/to-file"), "0", "0"),
        (u("/bomb"), "1", "1"),
        (u("/empty"), "0", "0"),
        (u("/503"), "1", "0"),
        (u("/403"), "0", "1"),
        (u("/cut-jpeg"), "1", "0"),
        (u("/garbage"), "0", "0"),
        (u("/hops/2/ok"), "1", "1"),
        (u("/hops/6/long"), "0", "1"),
        (u("/img/c.gif"), "999", "999"),
        (u("/img/d.webp"), "1", "0"),
    ]


def _val_rows(base: str) -> list[tuple[str, str, str, str]]:
    return [
        (base + "/404", "0", "1", "x"),       # shared with train: one request, both rows reported
        (base + "/img/b.png", "1", "1", "y"),  # shared with train
        (base + "/img/a.jpg", "1", "0", "z"),
    ]


def _write_manifests(tmp_path: Path, base: str) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    train = src / "train.tsv"
    train.write_text("image\tAU1\tAU2\n" + "".join("\t".join(r) + "\n" for r in _train_rows(base)))
    val = src / "val.csv"
    val.write_text("image,AU1,AU2,note\n" + "".join(",".join(r) + "\n" for r in _val_rows(base)))
    return train, val


def _good(url: str, base: str) -> bool:
    return url.startswith(base) and url[len(base):] in GOOD


def _decodes(path: Path) -> bool:
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def test_manifests_end_to_end(server, tmp_path, caplog):
    train, val = _write_manifests(tmp_path, server.base)
    out = tmp_path / "out"
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="datamodules.download.downloader"):
        report = download_manifests([train, val], out, FAST, aus=(1, 2), progress=False)
    elapsed = time.perf_counter() - start

    assert report.failed == EXPECTED_FAILED
    assert report.downloaded == len(GOOD) and report.present == 0
    train_rows, val_rows = _train_rows(server.base), _val_rows(server.base)
    bad_train = [r for r in train_rows if not _good(r[0], server.base)]
    bad_val = [r for r in val_rows if not _good(r[0], server.base)]
    assert report.rows_dropped == len(bad_train) + len(bad_val) == 18
    assert report.rows_kept == len(train_rows) + len(val_rows) - report.rows_dropped
    assert elapsed < 8, elapsed

    # the failures say which rows they cost, in every manifest
    by_url = {f["url"]: f for f in report.failures}
    assert by_url[server.base + "/404"]["rows"] == [(str(train), 4), (str(val), 2)]
    assert by_url[server.base + "/to-file"]["reason"] == "unsupported_scheme"
    assert "redirect" in by_url[server.base + "/to-file"]["detail"]
    assert by_url[server.base + "/html"]["reason"] == "not_an_image"
    assert by_url[server.base + "/cut-jpeg"]["reason"] == "truncated"
    assert by_url[server.base + "/slow"]["reason"] == "timeout"

    # the dropped rows are logged, never silent
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "17 of 25 rows dropped" in warned and "2 of 3 rows dropped" not in warned
    assert "1 of 3 rows dropped" in warned

    # the good images arrived, once each, and decode
    images = sorted((out / "images").iterdir())
    assert [p.name for p in images] == sorted(local_name(server.base + g) for g in GOOD)
    assert all(_decodes(p) for p in images)
    assert (out / "images" / local_name(server.base + "/img/b.png")).read_bytes() == good_images()["b.png"][0]
    assert (out / "images" / local_name(server.base + "/redirect")).read_bytes() == good_images()["a.jpg"][0]

    # the local manifests: exactly the good rows, in order, labels and other columns kept
    local_train = (out / "train.local.tsv").read_text().splitlines()
    assert local_train[0] == "image\tAU1\tAU2"
    assert local_train[1:] == [
        "\t".join([f"images/{local_name(r[0])}", *r[1:]]) for r in train_rows if _good(r[0], server.base)
    ]
    local_val = (out / "val.local.tsv").read_text().splitlines()
    assert local_val == ["image\tAU1\tAU2\tnote"] + [
        "\t".join([f"images/{local_name(r[0])}", *r[1:]]) for r in val_rows if _good(r[0], server.base)
    ]
    m = read_manifest(out / "train.local.tsv", aus=(1, 2), check_images=True)
    assert len(m) == 8 and not m.skipped
    assert all(Path(m.resolve(i)).is_file() for i in range(len(m)))
    assert m.labels[:, 0].tolist() == [1, 0, 0, 0, 1, 1, 0, 1]
    assert m.mask[:, 1].tolist() == [True, False, True, True, False, True, False, True]
    mv = read_manifest(out / "val.local.tsv", aus=(1, 2))
    assert mv.extra == {"note": ["y", "z"]}

    # the report on disk is the report returned
    saved = json.loads((out / "download_report.json").read_text())
    assert saved["failed"] == EXPECTED_FAILED
    assert saved["downloaded"] == report.downloaded and saved["rows_dropped"] == report.rows_dropped
    assert {f["url"]: f["reason"] for f in saved["failures"]} == {f["url"]: f["reason"] for f in report.failures}
    assert saved["local_manifests"] == {str(train): str(out / "train.local.tsv"), str(val): str(out / "val.local.tsv")}
    text = report.summary()
    assert "7 downloaded" in text and "timeout 1" in text and "18 dropped" in text

    # retries: transient failures only
    counts = server.snapshot()
    assert counts["/flaky"] == 2      # 500, then the image
    assert counts["/slow"] == 1       # timed out once: the deadline covers the retries, none is left
    assert counts["/503"] == 2
    assert counts["/truncated"] == 2  # a short transfer is a network failure: retried
    assert counts["/404"] == 1        # shared by two manifests, permanent: one request
    for path in ("/410", "/403", "/html", "/huge", "/bomb", "/empty", "/cut-jpeg", "/loop", "/to-file",
                 "/img/b.png", "/hops/0/ok", "/hops/1/long"):
        assert counts[path] == 1, path
    assert counts["/hops/0/long"] == 0  # the 6th redirect is refused, not followed
    assert counts["/img/a.jpg"] == 2  # in 3 rows of 2 manifests: once directly, once as /redirect's target
    assert not list((out / "images").glob("*.part-*"))


PERMANENT = ["/404", "/410", "/403", "/html", "/garbage", "/huge", "/endless", "/bomb", "/loop", "/hops/6/long",
             "/to-file", "/empty"]
TRANSIENT = {"/slow": 1, "/503": 2, "/truncated": 2, "/cut-jpeg": 1}  # requests per run (retries=1)


@pytest.mark.slow
def test_second_run_fetches_only_missing_images_and_transient_failures(server, tmp_path):
    train, val = _write_manifests(tmp_path, server.base)
    out = tmp_path / "out"
    first = download_manifests([train, val], out, FAST, aus=(1, 2), progress=False)
    before = server.snapshot()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    second = download_manifests([train, val], out, FAST, aus=(1, 2), progress=False)
    asked = server.snapshot() - before

    assert second.present == len(GOOD) and second.downloaded == 0
    assert second.failed == first.failed == EXPECTED_FAILED
    assert second.rows_dropped == first.rows_dropped
    for path in ("/img/a.jpg", "/img/b.png", "/img/c.gif", "/img/d.webp", "/flaky", "/redirect",
                 "/hops/2/ok", "/hops/1/ok", "/hops/0/ok"):
        assert asked[path] == 0, path  # present: not a single request
    for path in PERMANENT:  # remembered from the first report: not a single request
        assert asked[path] == 0, path
    assert {p: asked[p] for p in TRANSIENT} == TRANSIENT  # asked again, with their retries
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert (out / "train.local.tsv").read_text().count("\n") == 1 + 8

    # a remembered failure keeps its reason and says where it comes from and how to ask again
    firsts = {f["url"]: f for f in first.failures}
    seconds = {f["url"]: f for f in second.failures}
    report = out / "download_report.json"
    for path in PERMANENT + ["/file:///etc/hosts"]:
        url = server.base + path if not path.startswith("/file:") else path[1:]
        f = seconds[url]
        assert f["reason"] == firsts[url]["reason"] and f["attempts"] == 0, url
        assert f["detail"].startswith(firsts[url]["detail"]), url
        assert f"remembered from {report}" in f["detail"] and "--retry_failed" in f["detail"], url
    for path in TRANSIENT:
        assert "remembered" not in seconds[server.base + path]["detail"], path
    assert second.remembered == len(PERMANENT) + 1 and first.remembered == 0
    assert "13 permanent failures remembered" in second.summary()

    # remembered again from a report of remembered failures: one note, not a note on a note
    third = download_manifests([train, val], out, FAST, aus=(1, 2), progress=False)
    assert {f["url"]: f["detail"] for f in third.failures if f["attempts"] == 0} == \
        {f["url"]: f["detail"] for f in second.failures if f["attempts"] == 0}
    assert third.failed == EXPECTED_FAILED

    # retry_failed: every failure is asked again
    before = server.snapshot()
    fourth = download_manifests([train, val], out, FAST, aus=(1, 2), progress=False, retry_failed=True)
    asked = server.snapshot() - before
    assert fourth.failed == EXPECTED_FAILED and fourth.remembered == 0
    for path in PERMANENT:
        assert asked[path] == 1, path
    assert not any("remembered" in f["detail"] for f in fourth.failures)


def test_which_statuses_are_remembered(server, tmp_path):
    """4xx are permanent but 408 and 429; 5xx are not; au-detect download --retry_failed asks again."""
    from experiments.cli import main

    codes = [400, 401, 403, 404, 408, 410, 429, 451, 500, 502, 503]
    manifest = tmp_path / "m.tsv"
    manifest.write_text("image\tAU1\n" + "".join(f"{server.base}/status/{c}\t1\n" for c in codes)
                        + f"{server.base}/img/a.jpg\t0\n")
    out = tmp_path / "out"
    args = ["download", "--manifest", str(manifest), "--out", str(out), "--aus", "[1]", "--progress", "false",
            "--settings.retries", "1", "--settings.backoff", "0.01", "--settings.timeout", "5"]
    main(args)
    first = server.snapshot()
    retried = {408, 429, 500, 502, 503}
    assert {c: first[f"/status/{c}"] for c in codes} == {c: 2 if c in retried else 1 for c in codes}

    main(args)
    second = server.snapshot() - first
    assert {c: second[f"/status/{c}"] for c in codes} == {c: 2 if c in retried else 0 for c in codes}
    saved = json.loads((out / "download_report.json").read_text())
    assert {f["url"].rsplit("/", 1)[1]: f["attempts"] for f in saved["failures"]} == \
        {str(c): 2 if c in retried else 0 for c in codes}

    before = server.snapshot()
    main(args + ["--retry_failed"])
    third = server.snapshot() - before
    assert {c: third[f"/status/{c}"] for c in codes} == {c: 2 if c in retried else 1 for c in codes}
    assert third["/img/a.jpg"] == 0  # present


def test_headerless_manifest_and_name_clash(server, tmp_path):
    src = tmp_path / "raw.txt"  # EmotioNet's raw form: no header, the URL then the AUs
    src.write_text(f"{server.base}/img/a.jpg\t1\t0\n{server.base}/404\t0\t1\n{server.base}/img/b.png\t999\t1\n")
    report = download_manifests([src], tmp_path / "out", FAST, aus=(1, 2), progress=False, has_header=False)
    assert report.failed == {"http_404": 1} and report.rows_dropped == 1 and report.rows_kept == 2
    m = read_manifest(tmp_path / "out" / "raw.local.tsv", aus=(1, 2), has_header=False, check_images=True)
    assert len(m) == 2 and m.labels.tolist() == [[1, 0], [0, 1]] and m.mask.tolist() == [[True, True], [False, True]]

    other = tmp_path / "sub"
    other.mkdir()
    (other / "raw.csv").write_text("x")
    with pytest.raises(ValueError, match="same local manifest"):
        download_manifests([src, other / "raw.csv"], tmp_path / "out2", FAST, progress=False)
    assert sum(server.snapshot().values()) == 3  # the clash is found before anything is fetched


def test_redirect_limit(server, tmp_path):
    base = server.base
    urls = [base + "/hops/5", base + "/hops/6", base + "/img/a.jpg"]
    res = download_images(urls, tmp_path / "a", DownloadSettings(max_redirects=5, timeout=2, retries=0), progress=False)
    assert [res[u].status for u in urls] == ["downloaded", "failed", "downloaded"]
    assert res[base + "/hops/6"].reason == "too_many_redirects"
    res = download_images(urls[:1], tmp_path / "b", DownloadSettings(max_redirects=4, timeout=2, retries=0), progress=False)
    assert res[urls[0]].reason == "too_many_redirects"


def test_redirect_to_another_scheme_is_refused(server, tmp_path):
    url = server.base + "/to-file"  # 302 to file:///etc/passwd
    res = download_images([url], tmp_path, DownloadSettings(timeout=2, retries=3), progress=False)[url]
    assert res.reason == "unsupported_scheme" and res.attempts == 1 and res.path is None
    assert f"redirect from {url} to 'file:///etc/passwd'" in res.detail
    assert server.snapshot()["/to-file"] == 1  # permanent: not retried
    assert not list(tmp_path.iterdir())  # nothing of /etc/passwd was copied anywhere


def test_connections_are_reused(keepalive_server, tmp_path):
    """Images from one host share a few connections (one per worker at most), not one each."""
    n, workers = 40, 4
    urls = [f"{keepalive_server.base}/hops/0/{i}" for i in range(n)]  # the same PNG under 40 URLs
    urls += [f"{keepalive_server.base}/404", f"{keepalive_server.base}/hops/1/x"]  # an error page, a redirect
    res = download_images(urls, tmp_path, DownloadSettings(workers=workers, timeout=5), progress=False)
    assert [r.status for r in res.values()] == ["downloaded"] * n + ["failed", "downloaded"]
    assert sum(keepalive_server.snapshot().values()) == n + 3
    assert keepalive_server.connections <= workers, keepalive_server.connections


def test_retry_after_is_honoured(server, tmp_path):
    url = server.base + "/busy/1/a"  # 503 with Retry-After: 1, then the image
    settings = DownloadSettings(timeout=10, retries=2, backoff=0.01)
    res = download_images([url], tmp_path, settings, progress=False)[url]
    assert res.status == "downloaded" and res.attempts == 2
    first, second = server.times["/busy/1/a"]
    assert 1.0 <= second - first < 3.0, second - first  # the server's wait, not the 10 ms backoff


def test_retry_after_is_capped_and_held_to_the_deadline(server, tmp_path, monkeypatch):
    import datamodules.download.http_transfer as http_transfer

    # capped at 30 s: longer than the 5 s timeout, so no retry and no waiting
    url = server.base + "/busy/3600/a"
    start = time.perf_counter()
    res = download_images([url], tmp_path, DownloadSettings(timeout=5, retries=2), progress=False)[url]
    assert time.perf_counter() - start < 2
    assert res.reason == "http_503" and res.attempts == 1 and server.snapshot()["/busy/3600/a"] == 1
    assert "retry after 30 s (Retry-After, capped at 30 s)" in res.detail and "left of the timeout" in res.detail

    # with a lower cap, the capped wait fits in the deadline: waited for, then the image
    monkeypatch.setattr(http_transfer, "_RETRY_AFTER_CAP", 1.0)
    url = server.base + "/busy/3600/b"
    res = download_images([url], tmp_path, DownloadSettings(timeout=10, retries=2, backoff=0.01), progress=False)[url]
    assert res.status == "downloaded"
    first, second = server.times["/busy/3600/b"]
    assert 1.0 <= second - first < 3.0, second - first


# ---------------------------------------------------------------------------------------------
# deadlines


def test_timeout_bounds_the_whole_transfer(server, blackhole, tmp_path):
    """A server that trickles one byte a second, its body or its headers, is given up after
    ``timeout`` seconds, retries included; so is one that never answers, or never connects."""
    urls = [server.base + p for p in ("/trickle-body", "/trickle-headers", "/hang")] + [blackhole]
    settings = DownloadSettings(timeout=2, retries=3, backoff=0.01)
    start = time.perf_counter()
    res = download_images(urls, tmp_path, settings, progress=False)
    elapsed = time.perf_counter() - start
    assert 1.9 <= elapsed < 10, elapsed
    for u in urls:
        assert res[u].reason == "timeout" and "timeout of 2 s" in res[u].detail, res[u]
    assert server.snapshot() == Counter({"/trickle-body": 1, "/trickle-headers": 1, "/hang": 1})  # no time to retry
    assert not list(tmp_path.iterdir())


def test_timeout_through_the_command_line(server, tmp_path, capsys):
    from experiments.cli import main

    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"image\tAU1\n{server.base}/trickle-body\t1\n{server.base}/img/a.jpg\t0\n")
    start = time.perf_counter()
    main(["download", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--aus", "[1]",
          "--settings.timeout", "2", "--progress", "false"])
    assert time.perf_counter() - start < 10
    assert "1 downloaded" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "download_report.json").read_text())
    assert saved["failed"] == {"timeout": 1} and saved["failures"][0]["url"].endswith("/trickle-body")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_decoding(server, tmp_path):
    from PIL import Image as PILImage

    before = (PILImage.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    url = server.base + "/img/a.jpg"  # 64x64 = 4096 pixels
    res = download_images([url], tmp_path, DownloadSettings(max_pixels=3000, timeout=2), progress=False)
    assert res[url].reason == "too_many_pixels" and "64x64" in res[url].detail
    assert not list(tmp_path.iterdir())
    res = download_images([url], tmp_path, DownloadSettings(max_pixels=4096, timeout=2), progress=False)
    assert res[url].status == "downloaded"
    assert (PILImage.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before  # globals restored


def test_stale_parts_are_removed(server, tmp_path):
    url = server.base + "/img/b.png"
    name = local_name(url)
    stale = tmp_path / f"{name}.part-0123abcd"
    stale.write_bytes(b"\x89PNG half")
    other = tmp_path / "notes.part-of-something.txt"
    other.write_text("not ours")
    res = download_images([url], tmp_path, DownloadSettings(timeout=2), progress=False)
    assert res[url].status == "downloaded"
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, other.name])


# ---------------------------------------------------------------------------------------------
# killed mid-download

_CHILD = """
import sys
from datamodules.download.downloader import DownloadSettings, download_images
download_images(sys.argv[2:], sys.argv[1], DownloadSettings(workers=4, timeout=5, retries=0), progress=False)
"""


@pytest.mark.slow
def test_sigkill_leaves_only_complete_files_and_resumes(server, tmp_path):
    urls = [f"{server.base}/chunked/{i}.jpg" for i in range(CHUNKED_IMAGES)]
    served = {local_name(u): body for u, body in zip(urls, chunked_images())}
    assert min(map(len, served.values())) > 150_000
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), *urls], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            finals = [p for p in out.glob("*.jpg")] if out.is_dir() else []
            if len(finals) >= 6 or child.poll() is not None:
                break
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()

    complete = {p.name for p in out.glob("*.jpg")}
    parts = [p.name for p in out.iterdir() if ".part-" in p.name]
    assert 6 <= len(complete) < CHUNKED_IMAGES, (len(complete), "killed too late: slow the route down")
    for name in complete:  # a final name means a complete, verified image
        assert (out / name).read_bytes() == served[name]
        assert _decodes(out / name)
    assert all(p.split(".part-")[0] in served for p in parts)

    before = server.snapshot()
    res = download_images(urls, out, DownloadSettings(workers=4, timeout=5, retries=0), progress=False)
    asked = server.snapshot() - before
    assert all(r.ok for r in res.values())
    for u in urls:
        name = local_name(u)
        path = u[len(server.base):]
        if name in complete:
            assert res[u].status == "present" and asked[path] == 0, path
        else:
            assert res[u].status == "downloaded" and asked[path] == 1, path

    clean = tmp_path / "clean"
    download_images(urls, clean, DownloadSettings(workers=8, timeout=5), progress=False)
    resumed = {p.name: p.read_bytes() for p in out.iterdir()}
    assert resumed == {p.name: p.read_bytes() for p in clean.iterdir()}
    assert set(resumed) == set(served) and not any(".part-" in n for n in resumed)


def _default_sigint() -> None:
    """A child started from a background job inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt: give it the default disposition a terminal's Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# download_manifests as the CLI calls it, without the CLI's imports (torch, Lightning)
_INTERRUPTIBLE = """
import sys
from datamodules.download.downloader import DownloadInterrupted, DownloadSettings, download_manifests
try:
    download_manifests([sys.argv[1]], sys.argv[2], DownloadSettings(workers=5, timeout=60), aus=(1,), progress=False)
except DownloadInterrupted as e:
    print(e.report.summary(), flush=True)
    raise SystemExit(130)
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["au-detect", "python"])
def test_ctrl_c_stops_at_once_and_keeps_what_was_learned(server, blackhole, tmp_path, command):
    """SIGINT while transfers trickle, hang, connect to a host that never answers or wait for a
    worker: the download stops within seconds (not at the 60 s deadline), leaves no partial
    file, writes the report of what finished, and the next run builds on it."""
    base = server.base
    finished = ["/404", "/img/a.jpg", "/img/b.png", "/html"]
    stuck = ["/trickle-body/1", "/trickle-body/2", "/trickle-headers", "/hang"]
    queued = [f"/chunked/{i}.jpg" for i in range(8)]
    manifest = tmp_path / "m.tsv"
    manifest.write_text("image\tAU1\n" + "".join(f"{base}{p}\t1\n" for p in finished + stuck)
                        + f"{blackhole}\t1\n" + "".join(f"{base}{p}\t1\n" for p in queued))
    out = tmp_path / "out"
    if command == "au-detect":
        args = [str(Path(sys.executable).with_name("au-detect")), "download", "--manifest", str(manifest),
                "--out", str(out), "--aus", "[1]", "--settings.workers", "5", "--settings.timeout", "60",
                "--progress", "false"]
    else:
        args = [sys.executable, "-c", _INTERRUPTIBLE, str(manifest), str(out)]
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in child.stdout))
    reader.start()
    try:
        deadline = time.monotonic() + 120  # the command's imports take a while on a busy machine
        while time.monotonic() < deadline and child.poll() is None:
            if all(server.snapshot()[p] for p in finished + stuck):
                break
            time.sleep(0.05)
        time.sleep(1.5)  # the trickles are into their bytes, the blackhole connecting, the finished ones written
        assert child.poll() is None, child.communicate()
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
        exited = time.monotonic() - sent
    finally:
        child.kill()
        reader.join()
        stderr = child.stderr.read()
    assert child.returncode == 130, stderr
    stopped = [t for t, line in lines if line.startswith("interrupted:")]
    assert stopped and stopped[0] - sent < 5, (stopped, sent)  # cut, cancelled, report written
    # and the process ends: at once without torch loaded; the CLI's interpreter takes seconds more
    # to tear down what it imported (garbage collection at exit), which is not the download's doing
    assert exited < (5 if command == "python" else 30), exited

    images = out / "images"
    assert not [p.name for p in images.iterdir() if ".part-" in p.name]
    assert sorted(p.name for p in images.iterdir()) == sorted(local_name(base + p) for p in finished[1:3])
    assert (images / local_name(base + "/img/a.jpg")).read_bytes() == good_images()["a.jpg"][0]
    counts = server.snapshot()
    assert all(counts[p] == 0 for p in queued)  # cancelled before they started

    saved = json.loads((out / "download_report.json").read_text())
    assert saved["failed"] == {"http_404": 1, "not_an_image": 1}
    assert saved["downloaded"] == 2 and saved["unfinished"] == len(stuck + queued) + 1
    assert not (out / "m.local.tsv").exists()
    assert "interrupted: 13 images not finished" in "".join(line for _, line in lines)

    # the next run: what finished is not asked again, the rest is
    before = server.snapshot()
    report = download_manifests([manifest], out, DownloadSettings(workers=4, timeout=3, retries=0), aus=(1,),
                                progress=False)
    asked = server.snapshot() - before
    assert all(asked[p] == 0 for p in finished) and all(asked[p] == 1 for p in stuck + queued)
    assert report.present == 2 and report.downloaded == len(queued) and report.remembered == 2
    assert report.failed == {"http_404": 1, "not_an_image": 1, "timeout": len(stuck) + 1}


# ---------------------------------------------------------------------------------------------
# names and schemes


def test_local_name_is_stable_and_distinct():
    # stable across runs and machines: pinned values (a change breaks every resumed download)
    assert local_name("http://example.com/faces/0001.PNG") == "ee0d7f98165f491a720e.png"
    assert local_name("http://example.com/photo.php?id=3") == "fa938889beb72c4aca26.jpg"
    assert local_name("https://a.org/x/y.jpeg?size=large#frag").endswith(".jpeg")
    assert local_name("https://a.org/x/y.webp").endswith(".webp")
    assert local_name("https://a.org/x/y.tiff").endswith(".jpg")
    assert local_name("https://a.org/x/y") == local_name("https://a.org/x/y")
    urls = [f"http://host{i % 7}.example/img/{i}.jpg" for i in range(2000)] + ["http://a/b.jpg", "http://a/b.jpg?"]
    names = [local_name(u) for u in urls]
    assert len(set(names)) == len(urls)
    assert all(re.fullmatch(r"[0-9a-f]{20}\.(jpg|jpeg|png|bmp|gif|webp)", n) for n in names)


def test_unsupported_schemes_never_reach_the_network(server, tmp_path, monkeypatch):
    opened = []

    def refuse(self, address, *a, **kw):
        opened.append(address)
        raise AssertionError("no connection may be opened")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    port = server.server_address[1]
    urls = ["file:///etc/hosts", f"ftp://127.0.0.1:{port}/img/a.jpg", "/etc/passwd", "images/a.jpg",
            "javascript:alert(1)", f"gopher://127.0.0.1:{port}/", "data:image/png;base64,iVBORw0KGgo="]
    res = download_images(urls, tmp_path, DownloadSettings(timeout=1), progress=False)
    assert {u: r.reason for u, r in res.items()} == {u: "unsupported_scheme" for u in urls}
    assert all(r.attempts == 0 and r.path is None for r in res.values())
    assert opened == [] and sum(server.snapshot().values()) == 0
    assert not list(tmp_path.iterdir())


def test_report_json_roundtrip(tmp_path):
    report = DownloadReport(downloaded=1, present=2, failed={"http_404": 1},
                            failures=[{"url": "http://x/1", "reason": "http_404", "detail": "HTTP 404",
                                       "attempts": 1, "rows": [("m.tsv", 3)]}],
                            rows_dropped=1, seconds=0.5)
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["failures"][0]["rows"] == [["m.tsv", 3]] and data["failed"] == {"http_404": 1}
    assert "http_404 1" in report.summary() and "1 downloaded" in report.summary()


def test_settings_are_validated():
    with pytest.raises(ValueError):
        DownloadSettings(workers=0)
    with pytest.raises(ValueError):
        DownloadSettings(timeout=0)
