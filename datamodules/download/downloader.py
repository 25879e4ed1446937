"""Fetch the images of EmotioNet-form manifests: concurrent, resumable, verified, reported.

EmotioNet is distributed as manifests of image URLs, and years later many of them are dead,
redirect to a "photo not available" page, hang, or serve something that is not an image. This
module downloads what can be downloaded and says exactly what could not:

* HTTP is urllib3's, in :mod:`datamodules.download.http_transfer`: one connection pool per run
  (connections to a host are reused), its ``Retry`` for retries and redirects. Only
  ``http``/``https`` URLs are fetched; every redirect hop is checked the same way (a redirect
  to ``file://`` is refused), loops are caught and hops are counted against ``max_redirects``.
* ``timeout`` is a deadline for each file's whole transfer and its verification: connecting,
  every redirect, every retry and its wait, every read of the body, then decoding the image. A
  server that sends one byte a second (headers or body) is cut off when the deadline passes; an
  image whose decoding outlasts it is a ``timeout`` failure (the decoder, C code, cannot be
  stopped: it finishes in a thread of its own while the run goes on, and its file is not kept).
  Ctrl-C cuts every transfer at once (a connection still being opened is left to its timeout,
  not waited for), leaves no partial file, and the report keeps what the run learned.
* Transient failures (timeouts, connection errors, a transfer cut short, HTTP 408, 429 and 5xx)
  are retried with exponential backoff while the deadline allows; permanent ones (other HTTP
  4xx, unsupported schemes, too large, not an image...) are not. The permanent ones are also
  remembered: they are listed in ``download_report.json`` and the next run does not request
  those URLs again (``retry_failed=True``, ``au-detect download --retry_failed``, asks again).
* A file counts as downloaded only once it is complete and verified: size limits on the declared
  ``Content-Length`` and on the bytes actually streamed, the body compared with the declared
  length, content sniffed (an HTML page served as ``image/jpeg`` is not an image), then the
  project's image decoder (:func:`datamodules.io.images.verify_image`: format allowlist, pixel
  count and JPEG scans checked from the headers before decoding, full decode). It is streamed to
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
``timeout``                no complete response within ``timeout`` seconds (retries included),
                           or an image whose verification did not end within them
``connection``             refused, reset, DNS failure, broken HTTP..., after the retries
``ssl``                    TLS failure (e.g. an expired or invalid certificate); not retried
``too_large`` *            declared or streamed size over ``max_bytes``
``truncated``              fewer bytes than the declared ``Content-Length`` (after the
                           retries), or an image file that ends early
``empty`` *                a body of 0 bytes
``not_an_image`` *         HTML, text or anything else the image decoder refuses
``too_many_pixels`` *      width x height over ``max_pixels`` (checked before decoding)
``too_costly`` *           an image declaring far more decoding work than its pixels (a JPEG of
                           more than :data:`~datamodules.io.images.MAX_JPEG_SCANS` scans)
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
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from datamodules.io import files
from datamodules.download.http_transfer import TRANSIENT_STATUS, Failure, Fetched, Session, Stopped
from datamodules.io.images import TOO_COSTLY, TOO_LARGE, ImageInfo, InputError, verify_image
from datamodules.io.manifest import EMOTIONET_AUS, read_manifest, read_rows, write_manifest

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
REPORT_NAME = "download_report.json"
# Remembered by the report, not requested again; besides these, every http_4xx but 408 and 429.
PERMANENT_REASONS = frozenset({"unsupported_scheme", "invalid_url", "too_many_redirects", "too_large",
                               "empty", "not_an_image", "too_many_pixels", "too_costly"})

# local_name's suffixes are frozen: names on disk from earlier runs depend on them, so they must
# not follow the decoder's allowlist (images.IMAGE_SUFFIXES, which now takes TIFF too).
_NAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_PART = re.compile(r"^[0-9a-f]{20}\.[a-z]+\.part-[0-9a-f]+$")
_HTML_PREFIXES = (b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<!--", b"<script", b"<svg")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_REMEMBERED = " [remembered from "  # how a remembered failure's detail starts its note
_INTERRUPTED = "interrupted"  # internal status: a transfer cut by Ctrl-C is not a result
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


def is_permanent(reason: str) -> bool:
    """Whether a failure reason is one the next run need not ask again (see the module table)."""
    if reason in PERMANENT_REASONS:
        return True
    code = reason.removeprefix("http_")
    return code.isdigit() and 400 <= int(code) < 500 and int(code) not in TRANSIENT_STATUS


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


def _verify_by(deadline: float, path: Path, url: str, settings: DownloadSettings) -> ImageInfo:
    """``verify_image``, waited for until ``deadline`` (``time.monotonic``); raises ``Failure``.

    The decoder runs in a daemon thread of its own because a decode in C cannot be interrupted:
    past the deadline this worker reports a timeout and goes on, while that thread finishes (or
    dies with the process) holding only its open file, which is unlinked by then. What bounds
    the decoder's work is verify_image's own checks (pixels, JPEG scans, first frame only); this
    bounds how long the run waits for it.
    """
    done: queue.Queue[ImageInfo | Exception] = queue.Queue(1)

    def work() -> None:
        try:
            done.put(verify_image(path, settings.max_pixels, name=url))
        except Exception as e:  # noqa: BLE001 - handed to the waiting worker, which reports it
            done.put(e)

    threading.Thread(target=work, name=f"verify {path.name}", daemon=True).start()
    try:
        outcome = done.get(timeout=max(deadline - time.monotonic(), 0.0))
    except queue.Empty:
        raise Failure("timeout", f"{url}: verifying the image did not end within the deadline of "
                                 f"{settings.timeout:g} s (timeout, transfer included)") from None
    if isinstance(outcome, InputError):
        reason = ("too_many_pixels" if outcome.status == TOO_LARGE else "too_costly" if outcome.status == TOO_COSTLY
                  else "truncated" if outcome.truncated else "not_an_image")
        raise Failure(reason, str(outcome))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _verify(path: Path, size: int, url: str, settings: DownloadSettings, deadline: float | None = None) -> str:
    """Check a complete download with the project's image decoder, by ``deadline`` (default:
    ``timeout`` from now); returns a description of the image or raises ``Failure``."""
    if size == 0:
        raise Failure("empty", f"{url}: the server sent 0 bytes")
    with open(path, "rb") as f:
        head = f.read(512)
    problem = _sniff(head)
    if problem:
        preview = head[:60].decode("utf-8", "replace").strip().replace("\n", " ")
        raise Failure("not_an_image", f"{url}: {problem} (starts with {preview!r})")
    info = _verify_by(time.monotonic() + settings.timeout if deadline is None else deadline, path, url, settings)
    return f"{info.format} {info.width}x{info.height} {info.mode}"


# ---------------------------------------------------------------------------------------------
# one URL, then many


def _download_one(url: str, out_dir: Path, session: Session, settings: DownloadSettings) -> DownloadResult:
    """The result for one URL; its status is ``interrupted`` when Ctrl-C cut it before the end."""
    final = out_dir / local_name(url)
    if final.is_file():
        return DownloadResult(url, "present", path=final)
    part = final.with_name(f"{final.name}.part-{secrets.token_hex(6)}")
    deadline = time.monotonic() + settings.timeout  # the transfer keeps its own; this one bounds the verification
    try:
        fetched = session.fetch(url, part)
    except Stopped:
        return DownloadResult(url, _INTERRUPTED)
    except Failure as f:
        return _failed(url, f, f.attempts)
    try:
        return _keep(url, part, final, fetched, settings, deadline)
    finally:
        part.unlink(missing_ok=True)


def _keep(url: str, part: Path, final: Path, fetched: Fetched, settings: DownloadSettings,
          deadline: float | None = None) -> DownloadResult:
    """Verify what was fetched into ``part`` by ``deadline``, then give it its final name."""
    try:
        what = _verify(part, fetched.size, url, settings, deadline)
        os.replace(part, final)
    except Failure as f:
        return _failed(url, f, fetched.attempts)
    except Exception as e:  # a bug or the local disk: report it against the URL, keep going
        return _failed(url, Failure("error", f"{url}: {type(e).__name__}: {e}"), fetched.attempts)
    via = "" if fetched.url == url else f" via {fetched.url}"
    return DownloadResult(url, "downloaded", path=final, detail=f"{what}, {fetched.size} bytes{via}",
                          attempts=fetched.attempts, bytes=fetched.size)


def _failed(url: str, failure: Failure, attempts: int) -> DownloadResult:
    detail = failure.detail + (f" (after {attempts} attempts)" if attempts > 1 else "")
    return DownloadResult(url, "failed", reason=failure.reason, detail=detail, attempts=attempts)


class _Workers:
    """``settings.workers`` threads downloading a queue of URLs, their results as they come.

    Daemon threads, unlike ThreadPoolExecutor's: Ctrl-C cuts every transfer at once, but a
    thread still opening a connection (a host that never answers, a slow DNS) cannot be cut, and
    it is left to its connect timeout rather than waited for, here or at the interpreter's exit.
    It has no file open then, and, cut off, never writes one.
    """

    def __init__(self, urls: Sequence[str], out_dir: Path, session: Session, settings: DownloadSettings):
        self._jobs: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[DownloadResult | None] = queue.SimpleQueue()
        for url in urls:
            self._jobs.put(url)
        self._running = min(settings.workers, len(urls))
        for i in range(self._running):
            threading.Thread(target=self._work, args=(out_dir, session, settings), name=f"download_{i}",
                             daemon=True).start()

    def _work(self, out_dir: Path, session: Session, settings: DownloadSettings) -> None:
        try:
            while not session.stopped:
                try:
                    url = self._jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._done.put(_download_one(url, out_dir, session, settings))
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
    session = Session(settings)
    workers = _Workers([u for u in unique if u not in results], out, session, settings)
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
