"""Fetch the images of EmotioNet-form manifests: concurrent, resumable, verified, reported.

EmotioNet is distributed as manifests of image URLs, and years later many of them are dead,
redirect to a "photo not available" page, hang, or serve something that is not an image. This
module downloads what can be downloaded and says exactly what could not:

* HTTP is urllib3's: one connection pool per run (connections to a host are reused), its
  ``Retry`` for retries and redirects. Only ``http``/``https`` URLs are fetched; every redirect
  hop is checked the same way (a redirect to ``file://`` is refused), loops are caught and hops
  are counted against ``max_redirects``.
* ``timeout`` is a deadline for each file's whole transfer: connecting, every redirect, every
  retry and its wait, every read of the body. A server that sends one byte a second (headers or
  body) is cut off when the deadline passes. Ctrl-C cuts every transfer at once (a connection
  still being opened is left to its timeout, not waited for), leaves no partial file, and the
  report keeps what the run learned.
* Transient failures (timeouts, connection errors, a transfer cut short, HTTP 408, 429 and 5xx)
  are retried with exponential backoff while the deadline allows; permanent ones (other HTTP
  4xx, unsupported schemes, too large, not an image...) are not. The permanent ones are also
  remembered: they are listed in ``download_report.json`` and the next run does not request
  those URLs again (``retry_failed=True``, ``au-detect download --retry_failed``, asks again).
* A file counts as downloaded only once it is complete and verified: size limits on the declared
  ``Content-Length`` and on the bytes actually streamed, the body compared with the declared
  length, content sniffed (an HTML page served as ``image/jpeg`` is not an image), then the
  project's image decoder (:func:`datamodules.images.verify_image`: format allowlist, pixel
  count checked from the header before decoding, full decode). It is streamed to
  ``<final>.part-<random>`` in the same folder and ``os.replace``-d onto its final name only
  then, so a final name on disk always means a complete image, even if the process is killed at
  any moment. A second run counts such files as ``present`` without any request, so an
  interrupted download resumes where it stopped.

Failure reasons (``DownloadResult.reason``, the keys of ``DownloadReport.failed``); the ones
marked * are permanent, remembered in the report and not requested again by the next run:

=========================  ==============================================================
``unsupported_scheme`` *   not an http/https URL (``file://``, ``ftp://``, a local path...),
                           or a redirect to one; never opened
``invalid_url`` *          an http(s) URL that cannot be requested (no host, bad port...)
``too_many_redirects`` *   a redirect loop, or more than ``max_redirects`` hops
``http_<code>``            an HTTP error status: 4xx at once (* all but 408 and 429); 408,
                           429 and 5xx after the retries
``timeout``                no complete response within ``timeout`` seconds (retries included)
``connection``             refused, reset, DNS failure, broken HTTP..., after the retries
``ssl``                    TLS failure (e.g. an expired or invalid certificate); not retried
``too_large`` *            declared or streamed size over ``max_bytes``
``truncated``              fewer bytes than the declared ``Content-Length`` (after the
                           retries), or an image file that ends early
``empty`` *                a body of 0 bytes
``not_an_image`` *         HTML, text or anything else the image decoder refuses
``too_many_pixels`` *      width x height over ``max_pixels`` (checked before decoding)
``error``                  anything unexpected (a bug, a full disk...); the detail says what
=========================  ==============================================================

Typical use::

    report = download_manifests(["emotionet/train.tsv"], "data/emotionet")
    print(report.summary())
    manifest = read_manifest("data/emotionet/train.local.tsv")

or ``au-detect download --manifest emotionet/train.tsv --out data/emotionet``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import takewhile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    HTTPError,
    InvalidHeader,
    LocationValueError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ResponseError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from .images import TOO_LARGE, InputError, verify_image
from . import files
from .manifest import EMOTIONET_AUS, read_manifest, read_rows, write_manifest

log = logging.getLogger(__name__)

SCHEMES = ("http", "https")
IMAGES_DIR = "images"
REPORT_NAME = "download_report.json"
# Retried (urllib3's status_forcelist); every other 4xx is permanent.
TRANSIENT_STATUS = frozenset({408, 429, *range(500, 600)})
# Remembered by the report, not requested again; besides these, every http_4xx but 408 and 429.
PERMANENT_REASONS = frozenset({"unsupported_scheme", "invalid_url", "too_many_redirects", "too_large",
                               "empty", "not_an_image", "too_many_pixels"})

# local_name's suffixes are frozen: names on disk from earlier runs depend on them, so they must
# not follow the decoder's allowlist (images.IMAGE_SUFFIXES, which now takes TIFF too).
_NAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_CHUNK = 64 * 1024
_PART = re.compile(r"^[0-9a-f]{20}\.[a-z]+\.part-[0-9a-f]+$")
_HTML_PREFIXES = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--", b"<script", b"<svg")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_RETRY_AFTER_CAP = 30.0
_REMEMBERED = " [remembered from "  # how a remembered failure's detail starts its note
_INTERRUPTED = "interrupted"  # internal: a transfer cut by Ctrl-C is not a result
_GRACE_SECONDS = 3.0  # after Ctrl-C, for the workers to finish what cannot be cut (a verification)


@dataclass(frozen=True)
class DownloadSettings:
    """How to download.

    ``timeout`` is the deadline of each file's whole transfer, in seconds: connecting, the
    redirects, the retries and their waits, and every read of the body must all fit in it (a
    server that trickles bytes is cut off, one that keeps sending fast is bounded by
    ``max_bytes``). The default, 30 s, leaves room for the backoff of three retries (3.5 s) and
    a few MB over a slow link; it was 15 s when it bounded each read alone. ``retries`` are extra
    attempts for transient failures only, the n-th after ``backoff * 2**(n-1)`` seconds plus up
    to 25 % jitter (or the server's ``Retry-After``, up to 30 s, when it is longer), and only
    when that wait ends before the deadline. ``workers`` transfers run at once; the connection
    pool keeps as many connections per host.
    """

    workers: int = 16
    timeout: float = 30.0
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
    path when it is one of ``.jpg .jpeg .png .bmp .gif .webp`` (lower-cased), else ``.jpg``.
    The name depends on the exact URL string only, which is what makes a download resumable.

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
    return digest + (ext if ext in _NAME_SUFFIXES else ".jpg")


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one URL. ``status`` is ``downloaded``, ``present`` or ``failed``;
    ``path`` is the image file (None when failed), ``reason`` the failure reason (None unless
    failed), ``detail`` a human-readable explanation, ``attempts`` the request chains tried
    (0 for ``present``, for URLs never opened and for failures ``remembered`` from the
    previous report)."""

    url: str
    status: str
    path: Path | None = None
    reason: str | None = None
    detail: str = ""
    attempts: int = 0
    bytes: int = 0
    remembered: bool = False

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class DownloadReport:
    """The outcome of ``download_manifests``; counts are of distinct URLs, except the rows.

    ``failures`` lists every failed URL with its reason, detail and the manifest rows that
    referenced it (``(manifest file, line)`` pairs); ``rows_dropped`` counts those rows, which
    are left out of the local manifests. ``local_manifests`` maps each input manifest to the
    local one written (None when none of its rows survived). ``remembered`` counts the failures
    taken from the previous report without a request; ``unfinished`` the URLs an interrupted run
    did not finish (no local manifest is written then).
    """

    downloaded: int
    present: int
    failed: dict[str, int]
    failures: list[dict]
    rows_dropped: int
    seconds: float
    rows_kept: int = 0
    local_manifests: dict[str, str | None] = field(default_factory=dict)
    remembered: int = 0
    unfinished: int = 0

    @property
    def urls(self) -> int:
        return self.downloaded + self.present + sum(self.failed.values()) + self.unfinished

    def summary(self) -> str:
        lines = [
            f"{self.urls} distinct images: {self.downloaded} downloaded, {self.present} already present, "
            f"{sum(self.failed.values())} failed ({self.seconds:.1f} s)"
        ]
        if self.failed:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.failed.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"failed by reason: {reasons}")
        if self.remembered:
            lines.append(f"{self.remembered} permanent failures remembered from the previous report, not requested "
                         "again (--retry_failed asks again)")
        if self.unfinished:
            lines.append(f"interrupted: {self.unfinished} images not finished, no local manifest written; "
                         "run again to resume")
            return "\n".join(lines)
        lines.append(
            f"manifest rows: {self.rows_kept} kept, {self.rows_dropped} dropped (image not available)"
        )
        for src, dst in self.local_manifests.items():
            lines.append(f"  {src} -> {dst if dst is not None else '(no rows left, not written)'}")
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike) -> None:
        data = asdict(self)
        data["failures"] = [{**f, "rows": [list(r) for r in f["rows"]]} for f in self.failures]
        files.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a download. ``results`` holds the URLs that finished before (the others
    were cut or never started); ``download_manifests`` sets ``report`` once it has saved it."""

    def __init__(self, results: dict[str, DownloadResult]):
        super().__init__(f"download interrupted after {len(results)} images")
        self.results = results
        self.report: DownloadReport | None = None


class _Failure(Exception):
    """Why a URL failed; ``transient``: another attempt in this run may succeed."""

    def __init__(self, reason: str, detail: str, transient: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient = reason, detail, transient


def _check_scheme(url: str, what: str = "URL") -> None:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise _Failure("invalid_url", f"{what} {url!r}: {e}") from None
    if parts.scheme.lower() not in SCHEMES:
        shown = url if len(url) <= 200 else url[:200] + "..."
        raise _Failure("unsupported_scheme", f"{what} {shown!r}: only http and https are fetched")


def is_permanent(reason: str) -> bool:
    """Whether a failure reason is one the next run need not ask again (see the module table)."""
    if reason in PERMANENT_REASONS:
        return True
    code = reason.removeprefix("http_")
    return code.isdigit() and 400 <= int(code) < 500 and int(code) not in TRANSIENT_STATUS


# ---------------------------------------------------------------------------------------------
# HTTP: urllib3 with a deadline per file and a way to cut a transfer from another thread


class _Transfer:
    """One URL's requests, from the first connection to the end of its body: the deadline they
    share, the connection in use (so that the deadline or Ctrl-C can cut it) and what to report."""

    def __init__(self, url: str, settings: DownloadSettings, stop: threading.Event):
        self.url = self.where = url  # where: the URL of the request in flight (after redirects)
        self.settings, self.stop = settings, stop
        self.deadline = time.monotonic() + settings.timeout
        self.conn: _Watched | None = None  # the connection of the request in flight...
        self.sock: socket.socket | None = None  # ...and its socket, which a response may hold alone
        self.cut_off = False  # by the deadline or Ctrl-C: what arrived proves nothing
        self.attempts = 1  # request chains: the first, then one per retry granted
        self.gave_up = ""  # why the retries stopped before their count did

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def socket_timeout(self) -> float:
        return max(self.time_left(), 0.01)  # 0 would make the socket non-blocking

    def cut(self) -> None:
        """Shut the socket of the request in flight: a read blocked on it returns at once.

        What ``HTTPResponse.shutdown()`` does, but also before the response exists (headers a
        server trickles). Only while this transfer still owns the connection: once released to
        the pool it may serve another.
        """
        self.cut_off = True
        conn, sock = self.conn, self.sock
        if conn is not None and conn.transfer is self and sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: TLS state untouched
            except OSError:
                pass


# The transfer a worker thread is on: urllib3 opens connections deep inside urlopen, and this
# is how a connection learns which transfer it serves.
_current = threading.local()


class _Watched:
    """Mixed into urllib3's connections: each request registers the connection with its transfer.

    (A TLS handshake runs before that and is bounded by the socket timeout alone.)"""

    transfer: _Transfer | None = None

    def request(self, *args, **kwargs):
        transfer = getattr(_current, "transfer", None)
        self.transfer = transfer
        if transfer is None:
            return super().request(*args, **kwargs)
        transfer.conn, transfer.sock = self, None
        try:
            return super().request(*args, **kwargs)
        finally:
            # Kept by the transfer: http.client takes the socket off a connection that is to
            # close after its response (HTTP/1.0, "Connection: close") while the body is read.
            transfer.sock = self.sock


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _TimeLeft(urllib3.Timeout):
    """The time left to the transfer's deadline, whenever urllib3 asks: when it connects and when
    it waits for the headers of each request, redirects and retries included."""

    def __init__(self, transfer: _Transfer):
        super().__init__()
        self._transfer = transfer

    def clone(self) -> _TimeLeft:
        return _TimeLeft(self._transfer)

    @property
    def connect_timeout(self) -> float:  # type: ignore[override]
        return self._transfer.socket_timeout()

    @property
    def read_timeout(self) -> float:  # type: ignore[override]
        return self._transfer.socket_timeout()


class _DownloadRetry(urllib3.Retry):
    """urllib3's retry and redirect state for one file, held to its transfer's deadline and to Ctrl-C.

    Where it differs from urllib3's: ``settings.retries`` bounds the failed attempts of every
    kind together (redirects are counted apart, against ``max_redirects``); the n-th retry waits
    ``backoff * 2**(n-1)`` s plus up to 25 % (urllib3 retries the first time at once, which an
    overloaded server does not need), or the server's ``Retry-After`` (capped) when longer; no
    retry starts that would wait past the deadline; a redirect must stay http(s) and must not go
    back to a URL of its chain; an SSL failure is not retried.
    """

    transfer: _Transfer
    delay: float = 0.0  # the wait before the next request, set by increment

    @classmethod
    def start(cls, transfer: _Transfer) -> _DownloadRetry:
        s = transfer.settings
        retry = cls(total=None, redirect=s.max_redirects, status_forcelist=TRANSIENT_STATUS,
                    backoff_factor=s.backoff, raise_on_status=False, retry_after_max=_RETRY_AFTER_CAP)
        retry.transfer = transfer
        return retry

    def new(self, **kw) -> _DownloadRetry:
        retry = super().new(**kw)
        retry.transfer = self.transfer
        return retry

    def get_backoff_time(self) -> float:
        failures = sum(1 for _ in takewhile(lambda h: h.redirect_location is None, reversed(self.history)))
        return self.backoff_factor * 2 ** (failures - 1) * (1 + 0.25 * random.random()) if failures else 0.0

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if self.transfer.stop.is_set():
            raise _Failure(_INTERRUPTED, "stopped by Ctrl-C")
        if error is None and response is not None and response.get_redirect_location():
            return self._redirect(method, url, response, _pool)
        if isinstance(error, Urllib3SSLError):
            raise MaxRetryError(_pool, url, error)
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        reason = error or ResponseError(f"HTTP {getattr(response, 'status', '?')}")
        if sum(h.redirect_location is None for h in retry.history) > self.transfer.settings.retries:
            raise MaxRetryError(_pool, url, reason)
        retry.delay = self._wait(retry, response, reason)
        self.transfer.attempts += 1
        return retry

    def sleep(self, response=None) -> None:
        if self.transfer.stop.wait(self.delay):
            raise _Failure(_INTERRUPTED, "stopped by Ctrl-C")

    def _wait(self, retry: _DownloadRetry, response, reason: Exception) -> float:
        """The wait before the next attempt; raises MaxRetryError (for ``reason``) when it would
        outlast the deadline."""
        try:
            asked = self.get_retry_after(response) if response is not None else None
        except InvalidHeader:
            asked = None
        delay = max(retry.get_backoff_time(), asked or 0.0)
        left = self.transfer.time_left()
        if delay >= left:
            if left > 0:  # else the failure is a timeout, which says it all
                why = (f"the server asked to retry after {asked:g} s (Retry-After, capped at {_RETRY_AFTER_CAP:g} s)"
                       if asked and asked >= delay else f"the next retry would wait {delay:.2f} s")
                self.transfer.gave_up = f"; not retried: {why}, {left:.1f} s were left of the timeout"
            raise MaxRetryError(None, self.transfer.where, reason)
        return delay

    def _redirect(self, method, url, response, _pool) -> _DownloadRetry:
        target = urljoin(url, response.get_redirect_location())
        try:
            _check_scheme(target, what=f"redirect from {url} to")
        except _Failure as f:
            raise MaxRetryError(_pool, url, f) from None
        chain = [h.url for h in takewhile(lambda h: h.redirect_location is not None, reversed(self.history))]
        if target == url or target in chain:
            loop = _Failure("too_many_redirects", f"redirect loop at {target} after {len(chain) + 1} hop(s)")
            raise MaxRetryError(_pool, url, loop)
        try:
            retry = super().increment(method, url, response=response, _pool=_pool)
        except MaxRetryError:
            limit = _Failure("too_many_redirects",
                             f"more than {self.transfer.settings.max_redirects} redirects (last: {url} -> {target})")
            raise MaxRetryError(_pool, url, limit) from None
        self.transfer.where = target
        return retry

    def again(self, failure: _Failure) -> _DownloadRetry:
        """After a transfer that broke off once its response had begun: count it, wait, start over
        from the original URL with a fresh redirect budget. Raises MaxRetryError when out of
        attempts or time."""
        retry = self.increment("GET", self.transfer.url, error=failure)
        retry.sleep()
        self.transfer.where = self.transfer.url
        return retry.new(redirect=self.transfer.settings.max_redirects)


class _Urllib3Chatter(logging.Filter):
    """urllib3 logs each retry (WARNING) and redirect (INFO); the report has them per URL, and a
    run of a million URLs would bury the log in them. Only download workers' records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.threadName.startswith("download")


_CHATTER = _Urllib3Chatter()
_CHATTY_LOGGERS = ("urllib3.connectionpool", "urllib3.poolmanager")


class _Session:
    """One download run's HTTP: the pool manager (a pool of ``workers`` connections per host), the
    transfers in flight, and a watchdog thread that cuts each one at its deadline. Socket timeouts
    (the time left) bound each read; the watchdog bounds what a server stretches over many reads
    (headers sent a byte at a time)."""

    def __init__(self, settings: DownloadSettings):
        self.settings = settings
        self.stop = threading.Event()
        self.http = urllib3.PoolManager(
            num_pools=4 * settings.workers,  # hosts whose connections are kept, most recently used
            maxsize=settings.workers,
            headers={"User-Agent": settings.user_agent, "Accept": "image/*, */*;q=0.5",
                     "Accept-Encoding": "identity"},
        )
        self.http.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._active: set[_Transfer] = set()
        self._cond = threading.Condition()
        self._wakeup: float | None = None  # the deadline the watchdog sleeps until (None: no transfer)
        self._closed = False
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).addFilter(_CHATTER)
        self._watchdog = threading.Thread(target=self._cut_expired, name="download-deadlines", daemon=True)
        self._watchdog.start()

    @contextmanager
    def transfer(self, url: str) -> Iterator[_Transfer]:
        t = _Transfer(url, self.settings, self.stop)
        with self._cond:
            self._active.add(t)
            if self._wakeup is None or t.deadline < self._wakeup:  # rarely: deadlines come in order
                self._cond.notify()
        _current.transfer = t
        try:
            yield t
        finally:
            _current.transfer = None
            with self._cond:
                self._active.discard(t)

    def interrupt(self) -> None:
        """Ctrl-C: no new request, no more waiting, every transfer in flight cut."""
        self.stop.set()
        with self._cond:
            for t in self._active:
                t.cut()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._watchdog.join()
        self.http.clear()
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).removeFilter(_CHATTER)

    def _cut_expired(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for t in [t for t in self._active if t.deadline <= now]:
                    t.cut()
                    self._active.discard(t)
                self._wakeup = min((t.deadline for t in self._active), default=None)
                self._cond.wait(None if self._wakeup is None else self._wakeup - now)


def _network_failure(e: BaseException, t: _Transfer, transient: bool) -> _Failure:
    """What an exception raised while talking to a server means for the report.

    ``transient``: whether this run may try again (not after urllib3 has done the retrying)."""
    if t.stop.is_set():
        return _Failure(_INTERRUPTED, "stopped by Ctrl-C")
    if isinstance(e, MaxRetryError) and e.reason is not None:
        e = e.reason
    if isinstance(e, _Failure):
        return e
    where = t.where
    if isinstance(e, NameResolutionError):
        return _Failure("connection", f"{where}: host not found ({e})", transient)
    if isinstance(e, NewConnectionError):
        return _Failure("connection", f"{where}: cannot connect ({e})", transient)
    if t.time_left() <= 0 or isinstance(e, (Urllib3TimeoutError, TimeoutError)):
        return _Failure("timeout", f"{where}: no complete response within the timeout of {t.settings.timeout:g} s",
                        transient)
    if isinstance(e, (Urllib3SSLError, ssl.SSLError)):
        return _Failure("ssl", f"{where}: {e}")
    if isinstance(e, (LocationValueError, http.client.InvalidURL, UnicodeError)):
        return _Failure("invalid_url", f"{where}: {e}")
    if _caused_by(e, http.client.IncompleteRead):
        return _Failure("truncated", f"{where}: the transfer ended early ({e})", transient)
    if isinstance(e, (HTTPError, OSError, http.client.HTTPException)):
        return _Failure("connection", f"{where}: {type(e).__name__}: {e}", transient)
    return _Failure("error", f"{where}: {type(e).__name__}: {e}")


def _caused_by(e: BaseException | None, kind: type) -> bool:
    for _ in range(8):  # urllib3 wraps: ProtocolError(msg, IncompleteRead) from IncompleteRead
        if e is None:
            return False
        if isinstance(e, kind) or any(isinstance(a, kind) for a in e.args):
            return True
        e = e.__cause__ or e.__context__
    return False


def _fetch(http: urllib3.PoolManager, part: Path, t: _Transfer, retry: _DownloadRetry) -> tuple[int, _DownloadRetry]:
    """One attempt: the request (urllib3 follows the redirects and retries what fails before a
    response arrives), then the body streamed into ``part``. Returns (bytes, the retry state)."""
    try:
        resp = http.urlopen("GET", t.url, retries=retry, timeout=_TimeLeft(t), preload_content=False,
                            decode_content=False)
    except Exception as e:
        raise _network_failure(e, t, transient=False) from None
    try:
        _not_cut_off(t)
        status = resp.status
        if not 200 <= status < 300:
            raise _Failure(f"http_{status}", f"{t.where}: HTTP {status} {resp.reason}")
        size = _receive(resp, part, t)
        _not_cut_off(t)
        return size, resp.retries or retry
    finally:
        _release(resp, t)
        t.conn = t.sock = None


def _not_cut_off(t: _Transfer) -> None:
    """Nothing that arrived on a connection cut by the deadline or Ctrl-C is judged: http.client
    even takes a status line cut after "HTTP/1.1 200" for a whole, empty response."""
    if t.cut_off:
        raise _network_failure(TimeoutError("cut off"), t, transient=True)


def _release(resp: urllib3.BaseHTTPResponse, t: _Transfer) -> None:
    """Give the connection back to the pool: after a short error page read to its end it serves
    the next request to the host; after a body left unread it is closed (and reopened when used)."""
    if not resp.isclosed() and resp.length_remaining is not None and resp.length_remaining <= _CHUNK \
            and t.time_left() > 0:
        resp.drain_conn()
    if not resp.isclosed():
        resp.close()
    resp.release_conn()


def _receive(resp: urllib3.BaseHTTPResponse, part: Path, t: _Transfer) -> int:
    """Stream the body into ``part`` under ``max_bytes`` and the deadline; returns its size.

    A body shorter than its ``Content-Length`` raises (urllib3 enforces the length)."""
    max_bytes = t.settings.max_bytes
    declared = resp.length_remaining
    if declared is not None and declared > max_bytes:
        raise _Failure("too_large", f"{t.where}: declared Content-Length {declared} > max_bytes {max_bytes}")
    size = 0
    with open(part, "wb") as f:
        while True:
            try:
                chunk = _read_before_deadline(resp, t, min(_CHUNK, max_bytes + 1 - size))
            except Exception as e:
                raise _network_failure(e, t, transient=True) from None
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise _Failure("too_large", f"{t.where}: body exceeds max_bytes {max_bytes}"
                               + ("" if declared is None else f" (declared {declared})"))
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return size


def _read_before_deadline(resp: urllib3.BaseHTTPResponse, t: _Transfer, n: int) -> bytes:
    left = t.time_left()
    if left <= 0:
        raise TimeoutError("deadline passed between reads")
    if t.sock is not None and t.sock.fileno() != -1:  # -1: closed once the whole body was read
        t.sock.settimeout(left)
    return resp.read1(n, decode_content=False)


# ---------------------------------------------------------------------------------------------
# verification


def _sniff(head: bytes) -> str | None:
    """A reason not to bother the decoder: the content is an HTML page or text (whatever
    Content-Type said)."""
    if any(head.startswith(m) for m in _IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(_HTML_PREFIXES):
        return "an HTML/XML page, not an image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary; the decoder decides
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text, not an image"
    return None


def _verify(path: Path, size: int, url: str, settings: DownloadSettings) -> str:
    """Check a complete download with the project's image decoder; returns a description of
    the image or raises ``_Failure``."""
    if size == 0:
        raise _Failure("empty", f"{url}: the server sent 0 bytes")
    with open(path, "rb") as f:
        head = f.read(512)
    problem = _sniff(head)
    if problem:
        preview = head[:60].decode("utf-8", "replace").strip().replace("\n", " ")
        raise _Failure("not_an_image", f"{url}: {problem} (starts with {preview!r})")
    try:
        info = verify_image(path, settings.max_pixels, name=url)
    except InputError as e:
        reason = "too_many_pixels" if e.status == TOO_LARGE else "truncated" if e.truncated else "not_an_image"
        raise _Failure(reason, str(e)) from None
    return f"{info.format} {info.width}x{info.height} {info.mode}"


# ---------------------------------------------------------------------------------------------
# one URL, then many


def _download_one(url: str, out_dir: Path, session: _Session) -> DownloadResult:
    """The result for one URL; its status is ``interrupted`` when Ctrl-C cut it before the end."""
    final = out_dir / local_name(url)
    if final.is_file():
        return DownloadResult(url, "present", path=final)
    try:
        _check_scheme(url)
    except _Failure as f:
        return DownloadResult(url, "failed", reason=f.reason, detail=f.detail)
    if session.stop.is_set():
        return DownloadResult(url, _INTERRUPTED)
    with session.transfer(url) as t:
        return _attempts(url, final, t, session.http)


def _attempts(url: str, final: Path, t: _Transfer, http: urllib3.PoolManager) -> DownloadResult:
    retry = _DownloadRetry.start(t)
    while True:
        part = final.with_name(f"{final.name}.part-{secrets.token_hex(6)}")
        try:
            size, retry = _fetch(http, part, t, retry)
            what = _verify(part, size, url, t.settings)
            os.replace(part, final)
            via = "" if t.where == url else f" via {t.where}"
            return DownloadResult(url, "downloaded", path=final, detail=f"{what}, {size} bytes{via}",
                                  attempts=t.attempts, bytes=size)
        except _Failure as f:
            failure = f
        except Exception as e:  # a bug or the local disk: report it against the URL, keep going
            failure = _Failure("error", f"{url}: {type(e).__name__}: {e}")
        finally:
            part.unlink(missing_ok=True)
        if failure.reason == _INTERRUPTED:
            return DownloadResult(url, _INTERRUPTED)
        if not failure.transient:
            break
        try:
            retry = retry.again(failure)
        except MaxRetryError:
            break
        except _Failure:  # Ctrl-C during the wait
            return DownloadResult(url, _INTERRUPTED)
    detail = failure.detail + t.gave_up + (f" (after {t.attempts} attempts)" if t.attempts > 1 else "")
    return DownloadResult(url, "failed", reason=failure.reason, detail=detail, attempts=t.attempts)


class _Workers:
    """``settings.workers`` threads downloading a queue of URLs, their results as they come.

    Daemon threads, unlike ThreadPoolExecutor's: Ctrl-C cuts every transfer at once, but a
    thread still opening a connection (a host that never answers, a slow DNS) cannot be cut, and
    it is left to its connect timeout rather than waited for, here or at the interpreter's exit.
    It has no file open then, and, cut off, never writes one.
    """

    def __init__(self, urls: Sequence[str], out_dir: Path, session: _Session):
        self._jobs: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[DownloadResult | None] = queue.SimpleQueue()
        for url in urls:
            self._jobs.put(url)
        self._running = min(session.settings.workers, len(urls))
        for i in range(self._running):
            threading.Thread(target=self._work, args=(out_dir, session), name=f"download_{i}", daemon=True).start()

    def _work(self, out_dir: Path, session: _Session) -> None:
        try:
            while not session.stop.is_set():
                try:
                    url = self._jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._done.put(_download_one(url, out_dir, session))
                except Exception as e:  # a bug: the URL's result, not the run's end
                    self._done.put(DownloadResult(url, "failed", reason="error", detail=f"{type(e).__name__}: {e}"))
        finally:
            self._done.put(None)  # this thread is done

    def results(self, timeout: float | None = None) -> Iterator[DownloadResult]:
        """The results of the URLs finished, until every thread is done or ``timeout`` s passed;
        the queued URLs are left when the session stops."""
        end = None if timeout is None else time.monotonic() + timeout
        while self._running:
            try:
                r = self._done.get(timeout=None if end is None else max(end - time.monotonic(), 0))
            except queue.Empty:
                return
            if r is None:
                self._running -= 1
            elif r.status != _INTERRUPTED:
                yield r


def remembered_failures(report: str | os.PathLike) -> dict[str, DownloadResult]:
    """The permanent failures listed by an earlier ``download_report.json``, as the results to
    give their URLs without a request. A missing report remembers nothing; an unreadable one
    too, with a warning."""
    report = Path(report)
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        failures = data["failures"]
        if not isinstance(failures, list):
            raise TypeError(f"'failures' is a {type(failures).__name__}, not a list")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: cannot read the failures of the previous run (%s); every failed URL is asked again",
                    report, e)
        return {}
    remembered = {}
    for f in failures:
        url, reason = (f.get("url"), f.get("reason")) if isinstance(f, dict) else (None, None)
        if isinstance(url, str) and isinstance(reason, str) and is_permanent(reason):
            first = str(f.get("detail", "")).partition(_REMEMBERED)[0]  # not a note on a note
            note = f"{_REMEMBERED}{report}, not requested again; --retry_failed (retry_failed=True) asks again]"
            remembered[url] = DownloadResult(url, "failed", reason=reason, detail=first + note, remembered=True)
    return remembered


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
    previous_report: str | os.PathLike | None = None,
    retry_failed: bool = False,
) -> dict[str, DownloadResult]:
    """Download every distinct URL into ``out_dir/<local_name(url)>``; one result per URL.

    Files already under their final name are ``present`` (no request is made); stale ``.part``
    files of an interrupted run are deleted first. The permanent failures listed by
    ``previous_report`` (a ``download_report.json``) are failed again without a request, unless
    ``retry_failed``. Results keep the order of first appearance. Ctrl-C cuts the running
    transfers, cancels the queued ones and raises :class:`DownloadInterrupted` with the results
    of the URLs that finished; no partial file is left behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_parts(out)
    if stale:
        log.info("removed %d partial file(s) of an interrupted download in %s", stale, out)
    unique = list(dict.fromkeys(urls))
    remembered = {} if retry_failed or previous_report is None else remembered_failures(previous_report)
    # Remembered failures are settled here, not by the workers, so an interrupted run keeps them.
    results = {u: remembered[u] for u in unique if u in remembered and not (out / local_name(u)).is_file()}
    bar = _progress_bar(len(unique), progress)
    if bar is not None:
        bar.update(len(results))
    start = time.perf_counter()
    session = _Session(settings)
    workers = _Workers([u for u in unique if u not in results], out, session)
    failed = sum(r.status == "failed" for r in results.values())
    try:
        for r in workers.results():
            results[r.url] = r
            if r.status == "failed":
                failed += 1
                log.debug("failed %s: %s (%s)", r.url, r.reason, r.detail)
            if bar is not None:
                bar.update(1)
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
    except BaseException as e:
        session.interrupt()
        if isinstance(e, KeyboardInterrupt):
            results.update((r.url, r) for r in workers.results(timeout=_GRACE_SECONDS))
            raise DownloadInterrupted({u: results[u] for u in unique if u in results}) from None
        raise
    finally:
        session.close()
        if bar is not None:
            bar.close()
    counts = Counter(r.status for r in results.values())
    log.info("%d URLs in %.1f s: %d downloaded, %d present, %d failed (%d remembered)", len(unique),
             time.perf_counter() - start, counts["downloaded"], counts["present"], counts["failed"], len(remembered))
    return {u: results[u] for u in unique}


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
    retry_failed: bool = False,
) -> DownloadReport:
    """Download the images of EmotioNet-form manifests and write local manifests for them.

    Each manifest is read with ``read_manifest(path, aus=aus)`` (so a malformed one fails before
    anything is fetched); every distinct URL of all of them is downloaded once into
    ``out_dir/images/``. Then, per input ``<name>.<ext>``, ``out_dir/<name>.local.tsv`` is written:
    the same header and cells, tab-separated, the image URL replaced by ``images/<local_name>``
    (relative to the local manifest's folder, so the folder can be moved), and the rows whose
    image is not available dropped (logged at WARNING, counted in the report). A manifest with no
    row left gets no local manifest (and a stale one is removed). The report is also written to
    ``out_dir/download_report.json``, and read back by the next run: the URLs whose failure was
    permanent there are not requested again unless ``retry_failed``. On Ctrl-C the report of
    what finished is written (local manifests are not) before :class:`DownloadInterrupted`
    propagates, with the report as its ``report``.
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
    try:
        results = download_images(list(rows_of), out / IMAGES_DIR, settings, progress=progress,
                                  previous_report=out / REPORT_NAME, retry_failed=retry_failed)
    except DownloadInterrupted as e:
        e.report = _report(e.results, rows_of, start, unfinished=len(rows_of) - len(e.results))
        e.report.to_json(out / REPORT_NAME)
        log.warning("interrupted: %d of %d images not finished; what was learned is in %s", e.report.unfinished,
                    len(rows_of), out / REPORT_NAME)
        raise

    rows_kept = 0
    local_manifests: dict[str, str | None] = {}
    for m, name in zip(parsed, names):
        kept, dropped, why = _write_local_manifest(m.path, m.images, m.lines.tolist(), results, out / name, has_header)
        rows_kept += kept
        local_manifests[str(m.path)] = str(out / name) if kept else None
        if dropped:
            reasons = ", ".join(f"{r} {n}" for r, n in why.most_common())
            log.warning("%s: %d of %d rows dropped, their image is not available (%s); details in %s",
                        m.path, dropped, len(m), reasons, out / REPORT_NAME)
        if not kept:
            log.warning("%s: no row has an available image; no local manifest written", m.path)

    report = _report(results, rows_of, start, rows_kept=rows_kept, local_manifests=local_manifests)
    report.to_json(out / REPORT_NAME)
    return report


def _report(results: Mapping[str, DownloadResult], rows_of: Mapping[str, list[tuple[str, int]]], start: float,
            **extra) -> DownloadReport:
    failures = [
        {"url": r.url, "reason": r.reason, "detail": r.detail, "attempts": r.attempts, "rows": rows_of[r.url]}
        for r in results.values() if r.status == "failed"
    ]
    status = Counter(r.status for r in results.values())
    return DownloadReport(
        downloaded=status["downloaded"],
        present=status["present"],
        failed=dict(sorted(Counter(f["reason"] for f in failures).items())),
        failures=failures,
        rows_dropped=sum(len(f["rows"]) for f in failures),
        seconds=round(time.perf_counter() - start, 3),
        remembered=sum(r.remembered for r in results.values()),
        **extra,
    )


def _write_local_manifest(
    path: Path, images: list[str], lines: list[int], results: dict[str, DownloadResult], dest: Path, has_header: bool
) -> tuple[int, int, Counter]:
    """Copy ``path`` row by row into ``dest`` (TSV) with local image paths; drop unavailable rows."""
    wanted = dict(zip(lines, images))
    rows = read_rows(path)
    header = next(rows)[1] if has_header else None
    out_rows: list[list[str]] = []
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
        write_manifest(dest, header, out_rows)
    elif dest.exists():
        dest.unlink()
    return kept, dropped, why
