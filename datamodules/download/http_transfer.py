"""Fetch a URL into a file under a deadline, over urllib3, cuttable from another thread.

A :class:`Session` is one run's HTTP: a urllib3 ``PoolManager`` shared by the threads that call
``Session.fetch(url, part)`` at once (connections to a host are reused), and a watchdog thread.

* Only ``http``/``https`` URLs are fetched; every redirect hop is checked the same way, loops are
  caught and hops are counted against ``max_redirects``.
* ``timeout`` is a deadline for the whole transfer: connecting, every redirect, every retry and
  its wait, every read of the body. Socket timeouts (the time left) bound each read; the
  watchdog shuts the socket of a transfer whose deadline passes, which bounds a server that
  stretches headers or body over many reads.
* Transient failures are retried with exponential backoff plus jitter (or the server's
  ``Retry-After``, capped) while the deadline allows.
* The body is streamed into ``part`` under ``max_bytes`` and checked against its
  ``Content-Length``.
* ``Session.interrupt()`` (Ctrl-C) cuts every transfer in flight; their ``fetch`` raises
  :class:`Stopped`.

A failed fetch raises :class:`Failure` and leaves no ``part`` file. Its reasons
(``unsupported_scheme``, ``invalid_url``, ``too_many_redirects``, ``http_<code>``, ``timeout``,
``connection``, ``ssl``, ``too_large``, ``truncated``, ``error``) are documented with the
downloader's report, in the table of :mod:`datamodules.download.downloader`.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path
from typing import NamedTuple, Protocol
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

SCHEMES = ("http", "https")
# Retried (urllib3's status_forcelist); every other 4xx is permanent.
TRANSIENT_STATUS = frozenset({408, 429, *range(500, 600)})

_CHUNK = 64 * 1024
_RETRY_AFTER_CAP = 30.0
_STOPPED = "stopped by Ctrl-C"


class TransferSettings(Protocol):
    """What a session reads of its settings (``download.DownloadSettings`` documents them);
    read-only, so that a frozen dataclass has them."""

    @property
    def workers(self) -> int: ...  # connections kept per host
    @property
    def timeout(self) -> float: ...  # each transfer's deadline, in seconds
    @property
    def retries(self) -> int: ...
    @property
    def backoff(self) -> float: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def max_redirects(self) -> int: ...
    @property
    def user_agent(self) -> str: ...


class Failure(Exception):
    """Why a URL failed: ``reason`` (a key of the downloader's table), ``detail`` for people;
    ``transient``: another attempt may succeed; ``attempts``: the request chains tried (0: the
    URL was never opened)."""

    def __init__(self, reason: str, detail: str, transient: bool = False, attempts: int = 0):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient, self.attempts = reason, detail, transient, attempts


class Stopped(Exception):
    """The session was stopped (Ctrl-C) before the transfer ended: not a result for the URL."""


class Fetched(NamedTuple):
    """A body received whole: its size, the URL it came from (after redirects), the request
    chains it took (1 plus the retries)."""

    size: int
    url: str
    attempts: int


def _check_scheme(url: str, what: str = "URL") -> None:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise Failure("invalid_url", f"{what} {url!r}: {e}") from None
    if parts.scheme.lower() not in SCHEMES:
        shown = url if len(url) <= 200 else url[:200] + "..."
        raise Failure("unsupported_scheme", f"{what} {shown!r}: only http and https are fetched")


# ---------------------------------------------------------------------------------------------
# one transfer: its deadline, and the connection that the deadline or Ctrl-C may cut


class _Transfer:
    """One URL's requests, from the first connection to the end of its body: the deadline they
    share, the connection in use (so that the deadline or Ctrl-C can cut it) and what to report."""

    def __init__(self, url: str, settings: TransferSettings, stop: threading.Event):
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


# The transfer a thread is on: urllib3 opens connections deep inside urlopen, and this is how a
# connection learns which transfer it serves.
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


class _TransferRetry(urllib3.Retry):
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
    def start(cls, transfer: _Transfer) -> _TransferRetry:
        s = transfer.settings
        retry = cls(total=None, redirect=s.max_redirects, status_forcelist=TRANSIENT_STATUS,
                    backoff_factor=s.backoff, raise_on_status=False, retry_after_max=_RETRY_AFTER_CAP)
        retry.transfer = transfer
        return retry

    def new(self, **kw) -> _TransferRetry:
        retry = super().new(**kw)
        retry.transfer = self.transfer
        return retry

    def get_backoff_time(self) -> float:
        failures = sum(1 for _ in takewhile(lambda h: h.redirect_location is None, reversed(self.history)))
        return self.backoff_factor * 2 ** (failures - 1) * (1 + 0.25 * random.random()) if failures else 0.0

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if self.transfer.stop.is_set():
            raise Stopped(_STOPPED)
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
            raise Stopped(_STOPPED)

    def _wait(self, retry: _TransferRetry, response, reason: Exception) -> float:
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

    def _redirect(self, method, url, response, _pool) -> _TransferRetry:
        target = urljoin(url, response.get_redirect_location())
        try:
            _check_scheme(target, what=f"redirect from {url} to")
        except Failure as f:
            raise MaxRetryError(_pool, url, f) from None
        chain = [h.url for h in takewhile(lambda h: h.redirect_location is not None, reversed(self.history))]
        if target == url or target in chain:
            loop = Failure("too_many_redirects", f"redirect loop at {target} after {len(chain) + 1} hop(s)")
            raise MaxRetryError(_pool, url, loop)
        try:
            retry = super().increment(method, url, response=response, _pool=_pool)
        except MaxRetryError:
            limit = Failure("too_many_redirects",
                            f"more than {self.transfer.settings.max_redirects} redirects (last: {url} -> {target})")
            raise MaxRetryError(_pool, url, limit) from None
        self.transfer.where = target
        return retry

    def again(self, failure: Failure) -> _TransferRetry:
        """After a transfer that broke off once its response had begun: count it, wait, start over
        from the original URL with a fresh redirect budget. Raises MaxRetryError when out of
        attempts or time."""
        retry = self.increment("GET", self.transfer.url, error=failure)
        retry.sleep()
        self.transfer.where = self.transfer.url
        return retry.new(redirect=self.transfer.settings.max_redirects)


class _Urllib3Chatter(logging.Filter):
    """urllib3 logs each retry (WARNING) and redirect (INFO); the caller reports them per URL, and
    a run of a million URLs would bury the log in them. Only records logged during a transfer are
    dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(_current, "transfer", None) is None


_CHATTER = _Urllib3Chatter()
_CHATTY_LOGGERS = ("urllib3.connectionpool", "urllib3.poolmanager")


# ---------------------------------------------------------------------------------------------
# the session: many transfers at once, their deadlines, Ctrl-C


class Session:
    """One run's HTTP: the pool manager (a pool of ``workers`` connections per host), the
    transfers in flight, and a watchdog thread that cuts each one at its deadline. Socket
    timeouts (the time left) bound each read; the watchdog bounds what a server stretches over
    many reads (headers sent a byte at a time). ``close()`` when done."""

    def __init__(self, settings: TransferSettings):
        self._settings = settings
        self._stop = threading.Event()
        self._http = urllib3.PoolManager(
            num_pools=4 * settings.workers,  # hosts whose connections are kept, most recently used
            maxsize=settings.workers,
            headers={"User-Agent": settings.user_agent, "Accept": "image/*, */*;q=0.5",
                     "Accept-Encoding": "identity"},
        )
        self._http.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._active: set[_Transfer] = set()
        self._cond = threading.Condition()
        self._wakeup: float | None = None  # the deadline the watchdog sleeps until (None: no transfer)
        self._closed = False
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).addFilter(_CHATTER)
        self._watchdog = threading.Thread(target=self._cut_expired, name="download-deadlines", daemon=True)
        self._watchdog.start()

    @property
    def stopped(self) -> bool:
        """Whether ``interrupt()`` was called: no transfer starts any more."""
        return self._stop.is_set()

    def fetch(self, url: str, part: Path) -> Fetched:
        """GET ``url`` into the file ``part``, following redirects and retrying transient failures
        within the deadline. Raises :class:`Failure` (and leaves no ``part``) or :class:`Stopped`."""
        _check_scheme(url)
        if self.stopped:
            raise Stopped(_STOPPED)
        with self._transfer(url) as t:
            return _retried(self._http, part, t)

    def interrupt(self) -> None:
        """Ctrl-C: no new request, no more waiting, every transfer in flight cut."""
        self._stop.set()
        with self._cond:
            for t in self._active:
                t.cut()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._watchdog.join()
        self._http.clear()
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).removeFilter(_CHATTER)

    @contextmanager
    def _transfer(self, url: str) -> Iterator[_Transfer]:
        t = _Transfer(url, self._settings, self._stop)
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

    def _cut_expired(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for t in [t for t in self._active if t.deadline <= now]:
                    t.cut()
                    self._active.discard(t)
                self._wakeup = min((t.deadline for t in self._active), default=None)
                self._cond.wait(None if self._wakeup is None else self._wakeup - now)


# ---------------------------------------------------------------------------------------------
# attempts, and what their failures mean


def _retried(http: urllib3.PoolManager, part: Path, t: _Transfer) -> Fetched:
    """Attempt after attempt while a failure is transient and the retries and the deadline allow."""
    retry = _TransferRetry.start(t)
    while True:
        try:
            size, retry = _fetch(http, part, t, retry)
            return Fetched(size, t.where, t.attempts)
        except Stopped:
            part.unlink(missing_ok=True)
            raise
        except Exception as e:  # a Failure, or a bug or the local disk: reported against the URL
            part.unlink(missing_ok=True)
            failure = e if isinstance(e, Failure) else Failure("error", f"{t.url}: {type(e).__name__}: {e}")
        if not failure.transient:
            break
        try:
            retry = retry.again(failure)
        except MaxRetryError:
            break
    raise Failure(failure.reason, failure.detail + t.gave_up, failure.transient, t.attempts)


def _network_failure(e: BaseException, t: _Transfer, transient: bool) -> Failure | Stopped:
    """What an exception raised while talking to a server means for the report.

    ``transient``: whether this run may try again (not after urllib3 has done the retrying)."""
    if t.stop.is_set():
        return Stopped(_STOPPED)
    if isinstance(e, MaxRetryError) and e.reason is not None:
        e = e.reason
    if isinstance(e, Failure):
        return e
    where = t.where
    if isinstance(e, NameResolutionError):
        return Failure("connection", f"{where}: host not found ({e})", transient)
    if isinstance(e, NewConnectionError):
        return Failure("connection", f"{where}: cannot connect ({e})", transient)
    if t.time_left() <= 0 or isinstance(e, (Urllib3TimeoutError, TimeoutError)):
        return Failure("timeout", f"{where}: no complete response within the timeout of {t.settings.timeout:g} s",
                       transient)
    if isinstance(e, (Urllib3SSLError, ssl.SSLError)):
        return Failure("ssl", f"{where}: {e}")
    if isinstance(e, (LocationValueError, http.client.InvalidURL, UnicodeError)):
        return Failure("invalid_url", f"{where}: {e}")
    if _caused_by(e, http.client.IncompleteRead):
        return Failure("truncated", f"{where}: the transfer ended early ({e})", transient)
    if isinstance(e, (HTTPError, OSError, http.client.HTTPException)):
        return Failure("connection", f"{where}: {type(e).__name__}: {e}", transient)
    return Failure("error", f"{where}: {type(e).__name__}: {e}")


def _caused_by(e: BaseException | None, kind: type) -> bool:
    for _ in range(8):  # urllib3 wraps: ProtocolError(msg, IncompleteRead) from IncompleteRead
        if e is None:
            return False
        if isinstance(e, kind) or any(isinstance(a, kind) for a in e.args):
            return True
        e = e.__cause__ or e.__context__
    return False


# ---------------------------------------------------------------------------------------------
# one attempt: the request, then the body


def _fetch(http: urllib3.PoolManager, part: Path, t: _Transfer,
           retry: _TransferRetry) -> tuple[int, _TransferRetry]:
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
            raise Failure(f"http_{status}", f"{t.where}: HTTP {status} {resp.reason}")
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
        raise Failure("too_large", f"{t.where}: declared Content-Length {declared} > max_bytes {max_bytes}")
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
                raise Failure("too_large", f"{t.where}: body exceeds max_bytes {max_bytes}"
                              + ("" if declared is None else f" (declared {declared})"))
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return size


def _read_before_deadline(resp: urllib3.BaseHTTPResponse, t: _Transfer, n: int) -> bytes:
    """Up to ``n`` bytes of the body. A full ``read`` (fewer calls than ``read1``'s partial ones)
    is safe: each socket read waits at most the time left, and the watchdog cuts a server that
    trickles within that."""
    left = t.time_left()
    if left <= 0:
        raise TimeoutError("deadline passed between reads")
    if t.sock is not None and t.sock.fileno() != -1:  # -1: closed once the whole body was read
        t.sock.settimeout(left)
    return resp.read(n, decode_content=False)
