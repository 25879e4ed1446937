"""Fetch the images of EmotioNet-form manifests: concurrent, resumable, verified, reported.

EmotioNet is distributed as manifests of image URLs, and years later many of them are dead,
redirect to a "photo not available" page, hang, or serve something that is not an image. This
module downloads what can be downloaded and says exactly what could not:

* Only ``http``/``https`` URLs are fetched; every redirect hop is checked the same way (a
  redirect to ``file://`` is refused) and counted against ``max_redirects``. Redirects are
  followed here, with ``http.client``, so the limit and the scheme check are real.
* Transient failures (timeouts, connection errors, a transfer cut short, HTTP 5xx and 429) are
  retried with exponential backoff; permanent ones (HTTP 4xx, unsupported schemes, too large,
  not an image...) are not.
* A file counts as downloaded only once it is complete and verified: size limits on the declared
  ``Content-Length`` and on the bytes actually streamed, the body compared with the declared
  length, content sniffed (an HTML page served as ``image/jpeg`` is not an image), the pixel
  count checked from the header before decoding (decompression bombs), and the image fully
  decoded by PIL. It is streamed to ``<final>.part-<random>`` in the same folder and
  ``os.replace``-d onto its final name only then, so a final name on disk always means a complete
  image, even if the process is killed at any moment. A second run counts such files as
  ``present`` without any request, so an interrupted download resumes where it stopped.

Failure reasons (``DownloadResult.reason``, the keys of ``DownloadReport.failed``):

=======================  =================================================================
``unsupported_scheme``   not an http/https URL (``file://``, ``ftp://``, a local path...), or a
                         redirect to one; never opened
``invalid_url``          an http(s) URL that cannot be requested (no host, bad port...)
``too_many_redirects``   a redirect loop, or more than ``max_redirects`` hops
``http_<code>``          an HTTP error status: 4xx at once, 5xx and 429 after the retries
``timeout``              no connection or no data within ``timeout`` seconds, after the retries
``connection``           refused, reset, DNS failure, broken HTTP..., after the retries
``ssl``                  TLS failure (e.g. an expired or invalid certificate); not retried
``too_large``            declared or streamed size over ``max_bytes``
``truncated``            fewer bytes than the declared ``Content-Length`` (after the retries),
                         or an image file that ends early
``empty``                a body of 0 bytes
``not_an_image``         HTML, text or anything else PIL cannot decode as an image
``too_many_pixels``      width x height over ``max_pixels`` (checked before decoding)
``error``                anything unexpected (a bug, a full disk...); the detail says what
=======================  =================================================================

Typical use::

    report = download_manifests(["emotionet/train.tsv"], "data/emotionet")
    print(report.summary())
    manifest = read_manifest("data/emotionet/train.local.tsv")

or ``au-detect download --manifest emotionet/train.tsv --out data/emotionet``.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from .manifest import EMOTIONET_AUS, _delimiter, _rows, read_manifest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
# PIL plugins an image may be decoded with; nothing exotic (EPS would run Ghostscript).
PIL_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # JPEG includes MPO (camera JPEGs)
IMAGES_DIR = "images"
REPORT_NAME = "download_report.json"

_CHUNK = 64 * 1024
_PART = re.compile(r"^[0-9a-f]{20}\.[a-z]+\.part-[0-9a-f]+$")
_HTML_PREFIXES = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--", b"<script", b"<svg")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_RETRY_AFTER_CAP = 30.0


@dataclass(frozen=True)
class DownloadSettings:
    """How to download.

    ``timeout`` applies to the connection and to each read (a server that keeps sending is
    bounded by ``max_bytes``); ``retries`` are extra attempts for transient failures only, the
    n-th after ``backoff * 2**(n-1)`` seconds plus up to 25 % jitter (or the server's
    ``Retry-After``, up to 30 s, when it is longer).
    """

    workers: int = 16
    timeout: float = 15.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 20_000_000
    max_pixels: int = 50_000_000
    max_redirects: int = 5
    user_agent: str = "au-detect-downloader/0.1"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.retries < 0 or self.max_redirects < 0 or self.backoff < 0:
            raise ValueError("retries, max_redirects and backoff must not be negative")
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("max_bytes and max_pixels must be positive")


def local_name(url: str) -> str:
    """The file name a URL is stored under: stable across runs, machines and Python versions.

    The first 20 hex digits of the SHA-1 of the URL (as UTF-8) plus the extension of the URL's
    path when it is a known image extension (lower-cased), else ``.jpg``. The name depends on
    the exact URL string only, which is what makes a download resumable.

    >>> local_name("http://example.com/faces/0001.PNG")
    'ee0d7f98165f491a720e.png'
    >>> local_name("http://example.com/photo.php?id=3")
    'fa938889beb72c4aca26.jpg'
    """
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:20]
    try:
        ext = os.path.splitext(urlsplit(url).path)[1].lower()
    except ValueError:
        ext = ""
    return digest + (ext if ext in IMAGE_EXTENSIONS else ".jpg")


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one URL. ``status`` is ``downloaded``, ``present`` or ``failed``;
    ``path`` is the image file (None when failed), ``reason`` the failure reason (None unless
    failed), ``detail`` a human-readable explanation, ``attempts`` the requests chains tried
    (0 for ``present`` and for URLs never opened)."""

    url: str
    status: str
    path: Path | None = None
    reason: str | None = None
    detail: str = ""
    attempts: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class DownloadReport:
    """The outcome of ``download_manifests``; counts are of distinct URLs, except the rows.

    ``failures`` lists every failed URL with its reason, detail and the manifest rows that
    referenced it (``(manifest file, line)`` pairs); ``rows_dropped`` counts those rows, which
    are left out of the local manifests. ``local_manifests`` maps each input manifest to the
    local one written (None when none of its rows survived).
    """

    downloaded: int
    present: int
    failed: dict[str, int]
    failures: list[dict]
    rows_dropped: int
    seconds: float
    rows_kept: int = 0
    local_manifests: dict[str, str | None] = field(default_factory=dict)

    @property
    def urls(self) -> int:
        return self.downloaded + self.present + sum(self.failed.values())

    def summary(self) -> str:
        lines = [
            f"{self.urls} distinct images: {self.downloaded} downloaded, {self.present} already present, "
            f"{sum(self.failed.values())} failed ({self.seconds:.1f} s)"
        ]
        if self.failed:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.failed.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"failed by reason: {reasons}")
        lines.append(
            f"manifest rows: {self.rows_kept} kept, {self.rows_dropped} dropped (image not available)"
        )
        for src, dst in self.local_manifests.items():
            lines.append(f"  {src} -> {dst if dst is not None else '(no rows left, not written)'}")
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike) -> None:
        data = asdict(self)
        data["failures"] = [{**f, "rows": [list(r) for r in f["rows"]]} for f in self.failures]
        _write_atomic(Path(path), json.dumps(data, indent=2, sort_keys=True) + "\n")


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient, self.retry_after = reason, detail, transient, retry_after


def _check_scheme(url: str, what: str = "URL") -> None:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise _Failure("invalid_url", f"{what} {url!r}: {e}") from None
    if parts.scheme.lower() not in SCHEMES:
        shown = url if len(url) <= 200 else url[:200] + "..."
        raise _Failure("unsupported_scheme", f"{what} {shown!r}: only http and https are fetched")


def _request_target(parts) -> str:
    """Path and query as sent on the request line: non-ASCII and spaces percent-encoded, existing
    escapes kept, the fragment dropped."""
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return quote(target, safe="/?&=%:@!$'()*+,;~-._[]")


def _connect(url: str, settings: DownloadSettings) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    host = parts.hostname
    try:
        port = parts.port
    except ValueError as e:
        raise _Failure("invalid_url", f"{url!r}: {e}") from None
    if not host:
        raise _Failure("invalid_url", f"{url!r}: no host")
    if parts.scheme.lower() == "https":
        return http.client.HTTPSConnection(host, port, timeout=settings.timeout, context=_ssl_context())
    return http.client.HTTPConnection(host, port, timeout=settings.timeout)


_SSL_CONTEXT: ssl.SSLContext | None = None
_SSL_LOCK = threading.Lock()


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            _SSL_CONTEXT = ssl.create_default_context()
        return _SSL_CONTEXT


def _network_failure(e: BaseException, during: str) -> _Failure:
    """Classify an exception raised while talking to a server."""
    if isinstance(e, _Failure):
        return e
    if isinstance(e, (socket.timeout, TimeoutError)):
        return _Failure("timeout", f"no data within the timeout {during}", transient=True)
    if isinstance(e, ssl.SSLError):
        return _Failure("ssl", f"{during}: {e}")
    if isinstance(e, http.client.InvalidURL) or isinstance(e, UnicodeError):
        return _Failure("invalid_url", f"{during}: {e}")
    if isinstance(e, http.client.IncompleteRead):
        return _Failure("truncated", f"{during}: {e!r}", transient=True)
    if isinstance(e, socket.gaierror):
        return _Failure("connection", f"{during}: host not found ({e})", transient=True)
    if isinstance(e, (OSError, http.client.HTTPException)):
        return _Failure("connection", f"{during}: {type(e).__name__}: {e}", transient=True)
    return _Failure("error", f"{during}: {type(e).__name__}: {e}")


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    value = resp.getheader("Retry-After")
    try:
        return min(max(float(value), 0.0), _RETRY_AFTER_CAP) if value else None
    except ValueError:
        return None


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.getheader("Content-Length")
    if value is None or resp.getheader("Transfer-Encoding"):
        return None
    try:
        n = int(value.split(",")[0].strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def _fetch_once(url: str, part: Path, settings: DownloadSettings) -> tuple[int, int | None, str]:
    """One request chain: follow redirects, stream the body into ``part``.

    Returns (bytes written, declared length, final URL); raises ``_Failure``.
    """
    current, seen, hops = url, {url}, 0
    while True:
        conn = _connect(current, settings)
        try:
            try:
                conn.request("GET", _request_target(urlsplit(current)), headers={
                    "User-Agent": settings.user_agent,
                    "Accept": "image/*, */*;q=0.5",
                    "Accept-Encoding": "identity",
                    "Connection": "close",
                })
                resp = conn.getresponse()
            except Exception as e:
                raise _network_failure(e, f"requesting {current}") from None

            status = resp.status
            if status in REDIRECTS and resp.getheader("Location"):
                target = urljoin(current, resp.getheader("Location").strip())
                _check_scheme(target, what=f"redirect from {current} to")
                hops += 1
                if target in seen:
                    raise _Failure("too_many_redirects", f"redirect loop at {target} after {hops} hop(s)")
                if hops > settings.max_redirects:
                    raise _Failure("too_many_redirects", f"more than {settings.max_redirects} redirects (last: {target})")
                seen.add(target)
                current = target
                continue
            if status == 429 or status >= 500:
                raise _Failure(f"http_{status}", f"{current}: HTTP {status} {resp.reason}",
                               transient=True, retry_after=_retry_after(resp))
            if not 200 <= status < 300:
                raise _Failure(f"http_{status}", f"{current}: HTTP {status} {resp.reason}")

            declared = _content_length(resp)
            if declared is not None and declared > settings.max_bytes:
                raise _Failure("too_large", f"declared Content-Length {declared} > max_bytes {settings.max_bytes}")
            size = 0
            with open(part, "wb") as f:
                while True:
                    try:
                        chunk = resp.read(min(_CHUNK, settings.max_bytes + 1 - size))
                    except Exception as e:
                        raise _network_failure(e, f"reading {current} after {size} bytes") from None
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > settings.max_bytes:
                        raise _Failure("too_large", f"body exceeds max_bytes {settings.max_bytes}"
                                       + ("" if declared is None else f" (declared {declared})"))
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if declared is not None and size < declared:
                raise _Failure("truncated", f"received {size} of {declared} declared bytes", transient=True)
            return size, declared, current
        finally:
            conn.close()


def _sniff(head: bytes) -> str | None:
    """A reason not to bother PIL: the content is an HTML page or text (whatever Content-Type said)."""
    if any(head.startswith(m) for m in _IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(_HTML_PREFIXES):
        return "an HTML/XML page, not an image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary; PIL decides
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text, not an image"
    return None


def _verify(path: Path, size: int, settings: DownloadSettings) -> str:
    """Check a complete download; returns a description of the image or raises ``_Failure``.

    Needs ``_pil_limits`` around it (strict truncation, ``MAX_IMAGE_PIXELS``).
    """
    from PIL import Image, UnidentifiedImageError

    if size == 0:
        raise _Failure("empty", "the server sent 0 bytes")
    with open(path, "rb") as f:
        head = f.read(512)
    problem = _sniff(head)
    if problem:
        preview = head[:60].decode("utf-8", "replace").strip().replace("\n", " ")
        raise _Failure("not_an_image", f"{problem} (starts with {preview!r})")
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            w, h = im.size  # from the header: checked before anything is decoded
            if w * h > settings.max_pixels:
                raise _Failure("too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {settings.max_pixels}")
            if w < 1 or h < 1:
                raise _Failure("not_an_image", f"image of size {w}x{h}")
            im.load()
            return f"{im.format} {w}x{h} {im.mode}"
    except _Failure:
        raise
    except Image.DecompressionBombError as e:
        raise _Failure("too_many_pixels", f"over max_pixels {settings.max_pixels} ({e})") from None
    except UnidentifiedImageError:
        raise _Failure("not_an_image", f"not a decodable {'/'.join(PIL_FORMATS)} image") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error...
        message = f"{type(e).__name__}: {e}"
        if isinstance(e, EOFError) or "truncat" in message.lower():
            raise _Failure("truncated", f"the image data ends early ({message})") from None
        raise _Failure("not_an_image", f"cannot decode the image ({message})") from None


_PIL_LOCK = threading.Lock()


@contextmanager
def _pil_limits(max_pixels: int) -> Iterator[None]:
    """Strict PIL while downloads run: no truncated images, ``MAX_IMAGE_PIXELS = max_pixels``.

    These are process globals; they are set once around the whole download (not per image,
    which would race between the worker threads) and restored after.
    """
    from PIL import Image, ImageFile

    with _PIL_LOCK:
        before = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        with _PIL_LOCK:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = before


def _download_one(url: str, out_dir: Path, settings: DownloadSettings, stop: threading.Event) -> DownloadResult:
    final = out_dir / local_name(url)
    if final.is_file():
        return DownloadResult(url, "present", path=final)
    try:
        _check_scheme(url)
    except _Failure as f:
        return DownloadResult(url, "failed", reason=f.reason, detail=f.detail)

    attempt, failure = 0, None
    while attempt <= settings.retries and not stop.is_set():
        if attempt:
            delay = settings.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            if failure is not None and failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
            if stop.wait(delay):
                break
        attempt += 1
        part = final.with_name(f"{final.name}.part-{secrets.token_hex(6)}")
        try:
            size, declared, final_url = _fetch_once(url, part, settings)
            what = _verify(part, size, settings)
            os.replace(part, final)
            via = "" if final_url == url else f" via {final_url}"
            return DownloadResult(url, "downloaded", path=final, detail=f"{what}, {size} bytes{via}",
                                  attempts=attempt, bytes=size)
        except _Failure as f:
            failure = f
        except Exception as e:  # a bug or the local disk: report it against the URL, keep going
            failure = _Failure("error", f"{type(e).__name__}: {e}")
        finally:
            try:
                part.unlink()
            except FileNotFoundError:
                pass
        if not failure.transient:
            break
    if failure is None:
        return DownloadResult(url, "failed", reason="error", detail="interrupted before the first attempt")
    detail = failure.detail + (f" (after {attempt} attempts)" if failure.transient and attempt > 1 else "")
    return DownloadResult(url, "failed", reason=failure.reason, detail=detail, attempts=attempt)


def remove_stale_parts(out_dir: str | os.PathLike) -> int:
    """Delete ``*.part-*`` files a killed run left behind (only names this module makes)."""
    n = 0
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    for p in out_dir.iterdir():
        if _PART.match(p.name) and p.is_file():
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
    return n


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="download", dynamic_ncols=True)


def download_images(
    urls: Iterable[str],
    out_dir: str | os.PathLike,
    settings: DownloadSettings = DownloadSettings(),
    progress: bool = True,
) -> dict[str, DownloadResult]:
    """Download every distinct URL into ``out_dir/<local_name(url)>``; one result per URL.

    Files already under their final name are ``present`` (no request is made); stale ``.part``
    files of an interrupted run are deleted first. Results keep the order of first appearance.
    Ctrl-C cancels the queued downloads and lets the running ones stop at their next step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_parts(out)
    if stale:
        log.info("removed %d partial file(s) of an interrupted download in %s", stale, out)
    unique = list(dict.fromkeys(urls))
    results: dict[str, DownloadResult] = {}
    stop = threading.Event()
    bar = _progress_bar(len(unique), progress)
    start = time.perf_counter()
    try:
        with _pil_limits(settings.max_pixels), ThreadPoolExecutor(settings.workers, thread_name_prefix="download") as pool:
            futures = {pool.submit(_download_one, u, out, settings, stop): u for u in unique}
            try:
                failed = 0
                for fut in as_completed(futures):
                    r = fut.result()
                    results[r.url] = r
                    if r.status == "failed":
                        failed += 1
                        log.debug("failed %s: %s (%s)", r.url, r.reason, r.detail)
                    if bar is not None:
                        bar.update(1)
                        if failed:
                            bar.set_postfix(failed=failed, refresh=False)
            except BaseException:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        if bar is not None:
            bar.close()
    counts = Counter(r.status for r in results.values())
    log.info("%d URLs in %.1f s: %d downloaded, %d present, %d failed", len(unique), time.perf_counter() - start,
             counts["downloaded"], counts["present"], counts["failed"])
    return {u: results[u] for u in unique}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def local_manifest_path(manifest: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Where ``download_manifests`` writes the local-path version of ``manifest``."""
    return Path(out_dir) / f"{Path(manifest).stem}.local.tsv"


def download_manifests(
    manifests: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: DownloadSettings = DownloadSettings(),
    aus: Sequence[int] = EMOTIONET_AUS,
    progress: bool = True,
    has_header: bool = True,
) -> DownloadReport:
    """Download the images of EmotioNet-form manifests and write local manifests for them.

    Each manifest is read with ``read_manifest(path, aus=aus)`` (so a malformed one fails before
    anything is fetched); every distinct URL of all of them is downloaded once into
    ``out_dir/images/``. Then, per input ``<name>.<ext>``, ``out_dir/<name>.local.tsv`` is written:
    the same header and cells, tab-separated, the image URL replaced by ``images/<local_name>``
    (relative to the local manifest's folder, so the folder can be moved), and the rows whose
    image is not available dropped (logged at WARNING, counted in the report). A manifest with no
    row left gets no local manifest (and a stale one is removed). The report is also written to
    ``out_dir/download_report.json``.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    paths = [Path(p) for p in manifests]
    names = [local_manifest_path(p, out_dir).name for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"manifests would write the same local manifest(s) {clashes}: give them distinct names")

    parsed = [read_manifest(p, aus=aus, has_header=has_header) for p in paths]
    rows_of: dict[str, list[tuple[str, int]]] = {}
    for m in parsed:
        for ref, line in zip(m.images, m.lines.tolist()):
            rows_of.setdefault(ref, []).append((str(m.path), int(line)))

    out.mkdir(parents=True, exist_ok=True)
    results = download_images(list(rows_of), out / IMAGES_DIR, settings, progress=progress)

    rows_dropped = rows_kept = 0
    local_manifests: dict[str, str | None] = {}
    for m, name in zip(parsed, names):
        kept, dropped, why = _write_local_manifest(m.path, m.images, m.lines.tolist(), results, out / name, has_header)
        rows_kept += kept
        rows_dropped += dropped
        local_manifests[str(m.path)] = str(out / name) if kept else None
        if dropped:
            reasons = ", ".join(f"{r} {n}" for r, n in why.most_common())
            log.warning("%s: %d of %d rows dropped, their image is not available (%s); details in %s",
                        m.path, dropped, len(m), reasons, out / REPORT_NAME)
        if not kept:
            log.warning("%s: no row has an available image; no local manifest written", m.path)

    failures = [
        {"url": r.url, "reason": r.reason, "detail": r.detail, "attempts": r.attempts, "rows": rows_of[r.url]}
        for r in results.values() if r.status == "failed"
    ]
    status = Counter(r.status for r in results.values())
    report = DownloadReport(
        downloaded=status["downloaded"],
        present=status["present"],
        failed=dict(sorted(Counter(f["reason"] for f in failures).items())),
        failures=failures,
        rows_dropped=rows_dropped,
        seconds=round(time.perf_counter() - start, 3),
        rows_kept=rows_kept,
        local_manifests=local_manifests,
    )
    report.to_json(out / REPORT_NAME)
    return report


def _write_local_manifest(
    path: Path, images: list[str], lines: list[int], results: dict[str, DownloadResult], dest: Path, has_header: bool
) -> tuple[int, int, Counter]:
    """Copy ``path`` row by row into ``dest`` (TSV) with local image paths; drop unavailable rows."""
    wanted = dict(zip(lines, images))
    rows = _rows(path, _delimiter(path))
    out_rows: list[list[str]] = []
    if has_header:
        out_rows.append(next(rows)[1])
    kept, dropped, why = 0, 0, Counter()
    for line, row in rows:
        ref = wanted.get(line)
        if ref is None:
            continue
        r = results[ref]
        if r.status == "failed":
            dropped += 1
            why[r.reason] += 1
            continue
        row = list(row)
        row[0] = f"{IMAGES_DIR}/{local_name(ref)}"
        out_rows.append(row)
        kept += 1
    if kept != len(images) - dropped:
        raise RuntimeError(f"{path}: re-reading found {kept + dropped} rows, read_manifest found {len(images)}")
    if kept:
        buf = io.StringIO()
        csv.writer(buf, delimiter="\t", lineterminator="\n").writerows(out_rows)
        _write_atomic(dest, buf.getvalue())
    elif dest.exists():
        dest.unlink()
    return kept, dropped, why
