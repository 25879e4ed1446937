"""Tracking that never holds up training: a fit's writes to its MLflow run go through a spool.

MLflow's client calls are synchronous. Against an ``http://`` server that is slow, hung or down,
each one blocks in HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``_BACKOFF_FACTOR``,
``_BACKOFF_JITTER``, ``_TIMEOUT``: minutes by default) and then raises, which ends the fit.
MLflow's asynchronous logging only moves that wait into a queue in memory, which drops a batch
once its retries fail and keeps nothing past the process. Here instead (:class:`SpooledMLFlowLogger`):

* the training thread only puts the call into a queue in memory (a metric point keeps the time it
  was logged at; files are copied first, figures rendered);
* a writer thread commits each call to the run's spool folder,
  ``<trainer.default_root_dir>/mlflow_spool/<run id>/``, as a record written whole or not at all:
  its files go into a folder that is renamed into place, then its JSON is written atomically,
  which commits it (anything of a record without its JSON is left over from a kill and removed);
* a sender thread sends the records in order (consecutive metric, param and tag records merged into
  one ``log_batch``) and journals what the server acknowledged before deleting it. While the
  server cannot be reached the records pile up on disk; the sender tries again with a quick probe
  of the server first, every few seconds at most.

Sending again is idempotent: records that were being sent when a call failed or the process died
are *in doubt*, and the metric points of theirs that the run already holds are left out (MLflow
keeps every point it is sent, so a point sent twice could show twice). Params sent again with the
same value, tags and artifacts are idempotent as they are. A record the server refuses for good
(HTTP 4xx: a param changed, the run deleted; or five failures while the server answers) moves to
``rejected/`` with the error, so it does not hold up the rest.

The logged model needs the server: its predictor is saved into its record and logged when the
sender reaches it (:func:`log_predictor`). At the end of a fit the logger waits for the spool to
empty while the server shows signs of life; once it has shown none for ``flush_timeout`` seconds
the fit ends anyway and says what is kept where. ``au-detect sync-tracking --spool <folder>``
sends it later; so does resuming the run (same folder, its old records go first).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from datamodules.io.files import sync, write_text

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow_spool"
PROBE_TIMEOUT = 3.0  # seconds a look at the server may take
MAX_BACKOFF = 2.0  # seconds between tries while the server is away: it is seen back that soon
STRIKES = 5  # failures of one record, while the server answers, before it is set aside
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # one log_batch request, as MLflow allows


class SpoolError(Exception):
    """A record that cannot be sent as it is (damaged, or of an unknown kind)."""


class TrackingServerUnreachable(ConnectionError):
    """The tracking server does not answer where it must: when a fit starts (finding or creating its run)."""


def reachable(tracking_uri: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether an ``http(s)://`` tracking server answers at all (its ``/health``; any answer below
    500 counts), within ``timeout`` seconds instead of MLflow's retries. Other stores count as reachable."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except urllib.error.URLError as e:  # a TLS handshake MLflow's own settings may accept is an answer
        return isinstance(e.reason, ssl.SSLError)
    except (OSError, ValueError):  # refused, timed out, reset, no route
        return False


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- the folder ---------------------------------------------------------------------------------
class Spool:
    """One run's spool folder: ``spool.json`` (where it goes), ``records/`` (``<seq>.json``, and
    ``<seq>/`` with the record's files), ``journal.json`` (the last record acknowledged, the last
    one sent), ``rejected/``, ``staging/`` (files of calls not yet committed) and ``.lock``
    (held by whoever sends)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.records = self.folder / "records"
        self.rejected = self.folder / "rejected"
        self.staging = self.folder / "staging"
        self.lock_fd: int | None = None

    @classmethod
    def create(cls, folder: str | os.PathLike, tracking_uri: str, run_id: str) -> "Spool":
        """The spool a fit writes (an earlier process's records stay, to go first)."""
        spool = cls(folder)
        spool.records.mkdir(parents=True, exist_ok=True)
        write_text(spool.folder / "spool.json", json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}),
                   only_if_changed=True)
        spool.clean()
        return spool

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Spool":
        spool = cls(folder)
        if not (spool.folder / "spool.json").is_file():
            raise FileNotFoundError(f"{folder}: not a tracking spool (no spool.json)")
        return spool

    @property
    def info(self) -> dict[str, str]:
        return json.loads((self.folder / "spool.json").read_text())

    def journal(self) -> dict[str, int]:
        path = self.folder / "journal.json"
        return json.loads(path.read_text()) if path.is_file() else {"acked": 0, "sending": 0}

    def seqs(self) -> list[int]:
        """The committed records, oldest first (acknowledged ones included until deleted)."""
        if not self.records.is_dir():
            return []
        return sorted(int(p.stem) for p in self.records.glob("*.json") if p.stem.isdigit())

    def pending(self) -> list[int]:
        acked = self.journal()["acked"]
        return [s for s in self.seqs() if s > acked]

    def clean(self) -> None:
        """Drop what a kill left half-written (never committed) and what was acknowledged but not deleted."""
        shutil.rmtree(self.staging, ignore_errors=True)
        acked = self.journal()["acked"]
        for path in list(self.records.iterdir()) if self.records.is_dir() else []:
            stem = path.name.split(".")[0]
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # an atomic write's temporary file
            elif path.is_dir() and (not stem.isdigit() or not (self.records / f"{path.name}.json").is_file()
                                    or int(stem) <= acked):
                shutil.rmtree(path, ignore_errors=True)
            elif path.suffix == ".json" and stem.isdigit() and int(stem) <= acked:
                path.unlink(missing_ok=True)

    def next_seq(self) -> int:
        names = [int(p.name.split(".")[0]) for p in self.records.iterdir() if p.name.split(".")[0].isdigit()]
        journal = self.journal()
        return max([0, journal["acked"], journal["sending"], *names]) + 1

    def stage(self) -> Path:
        """A new folder for a call's files, renamed into the record when it is committed."""
        folder = self.staging / secrets.token_hex(8)
        folder.mkdir(parents=True)
        return folder

    def append(self, seq: int, record: dict, payload: Path | None) -> None:
        name = f"{seq:012d}"
        if payload is not None:
            os.replace(payload, self.records / name)
        write_text(self.records / f"{name}.json", json.dumps(record))  # the commit

    def read(self, seq: int) -> tuple[dict, Path | None]:
        name = f"{seq:012d}"
        try:
            record = json.loads((self.records / f"{name}.json").read_text())
        except (OSError, ValueError) as e:
            raise SpoolError(f"record {name} of {self.folder}: {e}") from e
        payload = self.records / name
        return record, payload if payload.is_dir() else None

    def begin(self, seq: int) -> None:
        """Records up to ``seq`` are about to be sent: from now on they are in doubt until acknowledged."""
        journal = self.journal()
        if seq > journal["sending"]:
            write_text(self.folder / "journal.json", json.dumps({**journal, "sending": seq}))

    def ack(self, seqs: list[int]) -> None:
        journal = self.journal()
        write_text(self.folder / "journal.json",
                   json.dumps({"acked": max(seqs), "sending": max(journal["sending"], max(seqs))}))
        for seq in seqs:
            (self.records / f"{seq:012d}.json").unlink(missing_ok=True)
            shutil.rmtree(self.records / f"{seq:012d}", ignore_errors=True)

    def reject(self, seq: int, error: str) -> None:
        """Set a record aside with the reason, out of the way of the ones after it."""
        self.rejected.mkdir(parents=True, exist_ok=True)
        name = f"{seq:012d}"
        for path in (self.records / f"{name}.json", self.records / name):
            if path.exists():
                os.replace(path, self.rejected / path.name)
        write_text(self.rejected / f"{name}.error.txt", error)
        self.ack([seq])

    def rejected_count(self) -> int:
        return len(list(self.rejected.glob("*.error.txt"))) if self.rejected.is_dir() else 0

    def lock(self, wait: bool = True) -> bool:
        """Become the one sender of this spool (another process's sync, or an earlier logger of this
        process, may hold it); False when ``wait`` is off and someone does."""
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.lock_fd = fd
        return True

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def remove_if_empty(self) -> bool:
        """Remove the folder once nothing is left in it to send or to look at."""
        if self.seqs() or self.rejected_count() or not self.lock(wait=False):
            return False
        try:
            if self.seqs():
                return False
            shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self.unlock()
        try:
            self.folder.parent.rmdir()  # the mlflow_spool folder too, when no other run has one there
        except OSError:
            pass
        return True


# -- what records hold -------------------------------------------------------------------------
def describe(records: Iterable[tuple[dict, Path | None]]) -> dict[str, Any]:
    """What unsent records amount to: counts, and whether the model and the run's end are among them."""
    out = {"records": 0, "metric_points": 0, "params": 0, "tags": 0, "artifact_files": 0, "datasets": 0,
           "model": False, "end": None}
    for record, payload in records:
        out["records"] += 1
        op = record.get("op")
        if op == "log_batch":
            out["metric_points"] += len(record["metrics"])
            out["params"] += len(record["params"])
            out["tags"] += len(record["tags"])
        elif op == "log_artifacts" and payload is not None:
            out["artifact_files"] += sum(1 for p in payload.rglob("*") if p.is_file())
        elif op == "log_inputs":
            out["datasets"] += len(record["datasets"])
        elif op == "log_model":
            out["model"] = True
        elif op == "set_terminated":
            out["end"] = record["status"]
    return out


def summary_text(counts: dict[str, Any]) -> str:
    parts = [f"{counts['metric_points']} metric points", f"{counts['params']} params", f"{counts['tags']} tags",
             f"{counts['artifact_files']} artifact files"]
    parts += [f"{counts['datasets']} dataset inputs"] if counts.get("datasets") else []
    parts += ["the model"] if counts["model"] else []
    parts += [f"the run's end ({counts['end']})"] if counts["end"] else []
    return f"{counts['records']} records: " + ", ".join(parts)


def _refused(error: BaseException) -> bool:
    """The server answered and said no (HTTP 4xx other than timeouts and rate limits): sending the
    same record again cannot succeed."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, SpoolError):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
    else:
        status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _unanswered(error: BaseException) -> bool:
    """The request got no answer (refused, reset, timed out): the server is away or slow, it did not say no."""
    import requests

    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _point(key: str, value: float, timestamp: int, step: int) -> tuple:
    """A metric point as MLflow identifies it (NaN equal to NaN)."""
    return (key, "nan" if math.isnan(value) else float(value), int(timestamp), int(step))


# -- the threads -------------------------------------------------------------------------------
class SpoolSender:
    """The writer and sender threads of one spool (see the module's docstring).

    ``put`` is all the training thread does. ``close`` waits for everything to be sent while the
    server shows signs of life, and gives up after ``flush_timeout`` seconds without any.
    """

    def __init__(self, spool: Spool, client, flush_timeout: float = 60.0, write: bool = True, probe=None):
        self.spool, self.client, self.flush_timeout = spool, client, flush_timeout
        self.tracking_uri = client.tracking_uri
        self.probe = probe or (lambda: reachable(self.tracking_uri))  # does the server answer at all?
        self.cond = threading.Condition()
        self.queue: deque[tuple[dict, Path | None]] = deque()  # calls not yet on disk
        # committed records not yet sent: (seq, record, payload); seq None: kept in memory only
        # (the disk refused it), record None: left by an earlier process, read when sent
        self.committed: deque[tuple[int | None, dict | None, Path | None]] = deque()
        self.leftover = 0
        if write:
            self.next = spool.next_seq()
            for seq in spool.pending():
                self.committed.append((seq, None, None))
            self.leftover = len(self.committed)
        else:  # sync-tracking: only sends what is there
            self.committed.extend((seq, None, None) for seq in spool.pending())
        self.closing = self.abandoned = False
        self.writer_done = not write
        self.wake = threading.Event()
        self.sent_records = 0
        self.last_ack = time.monotonic()
        self.down_since: float | None = None
        self.outage_seconds = 0.0
        self.outages = 0
        self.last_error = ""
        self.strikes = 0
        self.warned = False  # said that sending fails while the server answers (once until a success)
        self.merge_from: int | None = None  # no merging up to this seq: a merged batch was refused
        self.quiet = False  # given up on: the process may be ending, say nothing more
        self.threads = [threading.Thread(target=self._send_loop, name="mlflow-spool-sender", daemon=True)]
        if write:
            self.threads.append(threading.Thread(target=self._write_loop, name="mlflow-spool-writer", daemon=True))

    def start(self) -> "SpoolSender":
        if self.leftover:
            log.info("MLflow: %d records an earlier process kept in %s are sent first", self.leftover,
                     self.spool.folder)
        for thread in self.threads:
            thread.start()
        return self

    @property
    def closed(self) -> bool:
        return self.closing

    # -- the training thread's side ---------------------------------------------------------------
    def put(self, record: dict, payload: Path | None = None) -> None:
        with self.cond:
            if self.closing:
                raise RuntimeError(f"MLflow spool {self.spool.folder} is closed")
            self.queue.append((record, payload))
            self.cond.notify_all()

    # -- writer ---------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    self.writer_done = True
                    self.cond.notify_all()
                    return
                calls = list(self.queue)
                self.queue.clear()
            for record, payload in _merged(calls):
                seq: int | None = self.next
                self.next += 1
                try:
                    self.spool.append(seq, record, payload)
                except OSError as e:  # a full disk costs the record its safety, not the fit
                    if not self.quiet:
                        log.error("MLflow spool %s: could not write a record (%s); it is kept in memory only",
                                  self.spool.folder, e)
                    if payload is not None and not payload.exists():  # moved before the commit failed
                        payload = self.spool.records / f"{seq:012d}"
                    seq = None
                with self.cond:
                    self.committed.append((seq, record, payload if seq is None else None))
                    self.cond.notify_all()

    # -- sender ---------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        self.spool.lock()
        try:
            acked = self.spool.journal()["acked"]  # another sender may have sent some while we waited
            with self.cond:
                self.committed = deque(c for c in self.committed if c[0] is None or c[0] > acked)
            backoff = 0.5
            while True:
                with self.cond:
                    while not self.committed and not self.abandoned and not (self.closing and self.writer_done):
                        self.cond.wait()
                    if self.abandoned or not self.committed:
                        return
                    head = [self.committed[i] for i in range(min(len(self.committed), 256))]
                if self.down_since is not None and not self.probe():
                    self.wake.wait(backoff)
                    backoff = min(2 * backoff, MAX_BACKOFF)
                    continue
                group, tried = None, time.monotonic()
                try:
                    group = self._group(head)
                    self._deliver(group)
                    done = len(group)
                except Exception as e:  # noqa: BLE001 - anything may fail in a call to a server; sorted out below
                    done = self._failed(group or head[:1], e, tried)
                    if not done:
                        self.wake.wait(backoff)
                        backoff = min(2 * backoff, MAX_BACKOFF)
                        continue
                backoff = 0.5
                with self.cond:
                    for _ in range(done):
                        self.committed.popleft()
                    self.sent_records += done
                    self.last_ack = time.monotonic()
                    self.cond.notify_all()
        finally:
            self.spool.unlock()

    def _record(self, item: tuple) -> tuple[dict, Path | None]:
        seq, record, payload = item
        if seq is None:  # kept in memory only
            return record, payload
        if record is None:  # left by an earlier process
            return self.spool.read(seq)
        folder = self.spool.records / f"{seq:012d}"
        return record, folder if folder.is_dir() else None

    def _group(self, head: list) -> list[tuple[int | None, dict, Path | None]]:
        """The first record, with the log_batch records after it that go in the same request."""
        first, payload = self._record(head[0])
        group = [(head[0][0], first, payload)]
        seq = head[0][0]
        if first["op"] != "log_batch" or (self.merge_from is not None and seq is not None and seq <= self.merge_from):
            return group
        sizes = [len(first[k]) for k in ("metrics", "params", "tags")]
        for item in head[1:]:
            try:
                record, _ = self._record(item)
            except SpoolError:  # damaged: set aside when its turn comes, alone
                break
            if record["op"] != "log_batch" or record["run_id"] != first["run_id"]:
                break
            sizes = [n + len(record[k]) for n, k in zip(sizes, ("metrics", "params", "tags"))]
            if sizes[0] > MAX_METRICS or sizes[1] > MAX_PARAMS or sizes[2] > MAX_TAGS:
                break
            group.append((item[0], record, None))
        return group

    def _deliver(self, group: list) -> None:
        """Journal, send, journal: records are in doubt from before the request until acknowledged."""
        seqs = [s for s, _, _ in group if s is not None]
        in_doubt = bool(seqs) and seqs[0] <= self.spool.journal()["sending"]
        if seqs:
            self.spool.begin(seqs[-1])
        self._apply(group, in_doubt)
        if seqs:
            self.spool.ack(seqs)
        self.strikes = 0
        self.warned = False
        if self.down_since is not None:
            self._back()

    def _apply(self, group: list, in_doubt: bool) -> None:
        _, first, payload = group[0]
        run_id, op = first["run_id"], first["op"]
        if op == "log_batch":
            from mlflow.entities import Metric, Param, RunTag

            metrics = [Metric(k, v, ts, step) for _, r, _ in group for k, v, ts, step in r["metrics"]]
            params = [Param(k, v) for _, r, _ in group for k, v in r["params"]]
            tags = [RunTag(k, v) for _, r, _ in group for k, v in r["tags"]]
            if in_doubt and metrics:
                metrics = self._not_yet_logged(run_id, metrics)
            if metrics or params or tags:
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        elif op == "log_artifacts":
            if payload is None:
                raise SpoolError(f"artifact record of {self.spool.folder} without its files")
            self.client.log_artifacts(run_id, str(payload), first.get("artifact_path"))
        elif op == "log_inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            inputs = [DatasetInput(Dataset(**d["dataset"]), [InputTag(k, v) for k, v in d["tags"]])
                      for d in first["datasets"]]
            self.client.log_inputs(run_id, datasets=inputs)
        elif op == "set_terminated":
            self.client.set_terminated(run_id, first["status"], first["end_time"])
        elif op == "log_model":
            if payload is None:
                raise SpoolError(f"model record of {self.spool.folder} without its predictor")
            from lightning_modules.serving.pyfunc import log_saved_predictor

            log_saved_predictor(payload / "predictor", self.client, run_id, name=first["name"],
                                registered_model_name=first.get("registered_model_name"), onnx=first.get("onnx", False))
        else:
            raise SpoolError(f"record of unknown kind {op!r} in {self.spool.folder}")

    def _not_yet_logged(self, run_id: str, metrics: list) -> list:
        """The points the run does not hold yet (after a send whose answer never came)."""
        held = set()
        for key in {m.key for m in metrics}:
            held |= {_point(m.key, m.value, m.timestamp, m.step) for m in self.client.get_metric_history(run_id, key)}
        return [m for m in metrics if _point(m.key, m.value, m.timestamp, m.step) not in held]

    def _failed(self, group: list, error: Exception, tried: float) -> int:
        """After a failed send (begun at ``tried``): how many records were set aside (0: try again later)."""
        text = f"{type(error).__name__}: {error}"
        answers, unanswered = self.probe(), _unanswered(error)
        self.strikes += answers and not unanswered  # a slow server is waited for, not counted against
        if _refused(error) or self.strikes >= STRIKES:
            self.strikes = 0
            if len(group) > 1:  # any of a merged batch may be the one: send them one by one to find it
                self.merge_from = max(s for s, _, _ in group if s is not None)
                return 0
            seq = group[0][0]
            if not self.quiet:
                log.warning("MLflow: a record could not be sent (%s); it is set aside in %s", text[:500],
                            self.spool.rejected)
            if seq is not None:
                self.spool.reject(seq, text)
            return 1
        self.last_error = text
        if not answers and self.down_since is None:
            self.down_since = tried
            self.outages += 1
            if not self.quiet:
                log.warning("MLflow: the tracking server at %s does not answer (%s). Training goes on; what it "
                            "logs is kept in %s and sent when the server is back.", self.tracking_uri, text[:300],
                            self.spool.folder)
        elif answers and not self.warned and not self.quiet:
            log.warning("MLflow: sending to %s failed (%s); trying again, training goes on", self.tracking_uri,
                        text[:300])
            self.warned = True
        return 0

    def _back(self) -> None:
        seconds = time.monotonic() - self.down_since
        self.outage_seconds += seconds
        self.down_since = None
        if not self.quiet:
            with self.cond:
                left = len(self.committed)
            log.warning("MLflow: the tracking server at %s answers again after %.0f s; sending the %d records kept "
                        "meanwhile", self.tracking_uri, seconds, left)

    # -- the end ----------------------------------------------------------------------------------------
    def left(self) -> list[tuple[dict, Path | None]]:
        """The records not sent, as (record, payload)."""
        with self.cond:
            items = list(self.committed) + [(None, r, p) for r, p in self.queue]
        out = []
        for item in items:
            try:
                out.append(self._record(item))
            except SpoolError:
                continue
        return out

    def close(self) -> bool:
        """Stop taking calls and wait until all are sent: True. False when the server has shown no
        sign of life (an acknowledged record, or an answer to a probe) for ``flush_timeout`` seconds;
        what is unsent stays in the spool."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.wake.set()  # no back-off now: try at once, then as the loop says
        self.wake = threading.Event()
        life = time.monotonic()
        last_probe = 0.0
        while True:
            with self.cond:
                if self.writer_done and not self.committed:
                    break
                self.cond.wait(0.25)
                life = max(life, self.last_ack)
            now = time.monotonic()
            if now - life > 2 and now - last_probe > 2:
                last_probe = now
                if self.probe():
                    life = time.monotonic()
            if time.monotonic() - life > self.flush_timeout:
                with self.cond:
                    if self.writer_done and not self.committed:
                        break
                    self.abandoned = True
                    self.quiet = True
                    self.cond.notify_all()
                self.wake.set()
                for thread in self.threads:
                    thread.join(timeout=1.0)
                return False
        for thread in self.threads:
            thread.join()
        if self.down_since is not None:
            self.outage_seconds += time.monotonic() - self.down_since
        return True


def _merged(calls: list[tuple[dict, Path | None]]) -> list[tuple[dict, Path | None]]:
    """Consecutive calls that only log metric points to a run, as one record (within one request's
    limits). Params and tags keep records of their own: one the server refuses is set aside alone."""
    out: list[tuple[dict, Path | None]] = []

    def points_only(record: dict | None) -> bool:
        return record is not None and record["op"] == "log_batch" and not record["params"] and not record["tags"]

    for record, payload in calls:
        last = out[-1][0] if out else None
        if (points_only(record) and points_only(last) and last["run_id"] == record["run_id"]
                and len(last["metrics"]) + len(record["metrics"]) <= MAX_METRICS):
            last["metrics"] = last["metrics"] + record["metrics"]
        else:
            out.append((dict(record), payload))
    return out


# -- the client the fit sees ---------------------------------------------------------------------
class SpooledClient:
    """An ``MlflowClient`` whose writes (the calls this project makes) go into the spool; anything
    else, reads included, goes to the server directly."""

    def __init__(self, open_sender, client):
        self.open_sender, self.client = open_sender, client  # open_sender(): a running SpoolSender
        self.current: SpoolSender | None = None

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    @property
    def sender(self) -> SpoolSender:
        """The running sender; a new one after the last was closed (a fit's end), on the first write."""
        if self.current is None or self.current.closed:
            self.current = self.open_sender()
        return self.current

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), synchronous=None) -> None:
        self.sender.put({"op": "log_batch", "run_id": run_id,
                         "metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step or 0)] for m in metrics],
                         "params": [[p.key, str(p.value)] for p in params],
                         "tags": [[t.key, str(t.value)] for t in tags]})

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None, step: int | None = None,
                   synchronous=None, **kwargs) -> None:
        from mlflow.entities import Metric

        self.log_batch(run_id, metrics=[Metric(key, float(value), timestamp or _now_ms(), step or 0)])

    def log_param(self, run_id: str, key: str, value: Any, synchronous=None) -> Any:
        from mlflow.entities import Param

        self.log_batch(run_id, params=[Param(key, str(value))])
        return value

    def set_tag(self, run_id: str, key: str, value: Any, synchronous=None) -> None:
        from mlflow.entities import RunTag

        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_inputs(self, run_id: str, datasets=None, models=None) -> None:
        if models:
            raise NotImplementedError("the tracking spool logs dataset inputs only")
        self.sender.put({"op": "log_inputs", "run_id": run_id, "datasets": [
            {"dataset": {k: getattr(d.dataset, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")},
             "tags": [[t.key, t.value] for t in d.tags]} for d in datasets or ()]})

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        # the time the run ended, not the time the record reaches the server
        self.sender.put({"op": "set_terminated", "run_id": run_id, "status": status or "FINISHED",
                         "end_time": end_time or _now_ms()})

    def _artifacts(self, run_id: str, folder: Path, artifact_path: str | None) -> None:
        for path in folder.rglob("*"):
            if path.is_file():
                sync(path)  # on the disk before the record that names it is committed
        self.sender.put({"op": "log_artifacts", "run_id": run_id, "artifact_path": artifact_path}, folder)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        folder, source = self.sender.spool.stage(), Path(local_path)
        if source.is_dir():
            shutil.copytree(source, folder / source.name)
        else:
            shutil.copy2(source, folder / source.name)
        self._artifacts(run_id, folder, artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        folder = self.sender.spool.stage()
        shutil.copytree(local_dir, folder, dirs_exist_ok=True)
        self._artifacts(run_id, folder, artifact_path)

    def _file(self, artifact_file: str) -> tuple[Path, Path]:
        folder = self.sender.spool.stage()
        path = folder / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return folder, path

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        folder, path = self._file(artifact_file)
        path.write_text(text, encoding="utf-8")
        self._artifacts(run_id, folder, None)

    def log_dict(self, run_id: str, dictionary: dict, artifact_file: str) -> None:
        folder, path = self._file(artifact_file)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(dictionary))
        else:
            path.write_text(json.dumps(dictionary, indent=2, default=str))
        self._artifacts(run_id, folder, None)

    def log_figure(self, run_id: str, figure, artifact_file: str, *, save_kwargs: dict | None = None) -> None:
        folder, path = self._file(artifact_file)
        figure.savefig(path, **(save_kwargs or {}))  # rendered now: the caller closes the figure
        self._artifacts(run_id, folder, None)

    def log_predictor(self, run_id: str, predictor, name: str = "model", registered_model_name: str | None = None,
                      onnx: bool = False) -> None:
        folder = self.sender.spool.stage()
        predictor.save(folder / "predictor")
        for path in (folder / "predictor").rglob("*"):
            if path.is_file():
                sync(path)
        self.sender.put({"op": "log_model", "run_id": run_id, "name": name,
                         "registered_model_name": registered_model_name, "onnx": onnx}, folder)


def log_predictor(client, run_id: str, predictor, name: str = "model", registered_model_name: str | None = None,
                  onnx: bool = False) -> None:
    """Log a predictor as the run's pyfunc model: through the spool for a spooled client (the
    predictor is saved with the record and logged when the sender reaches it), at once otherwise."""
    if isinstance(client, SpooledClient):
        client.log_predictor(run_id, predictor, name, registered_model_name, onnx)
    else:
        from lightning_modules.serving.pyfunc import log_model_to_run

        log_model_to_run(predictor, client, run_id, name=name, registered_model_name=registered_model_name, onnx=onnx)


# -- the logger --------------------------------------------------------------------------------------
class SpooledMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` whose writes go through a spool (see the module's docstring).

    The run is found or created when first used, at the start of the fit: the server must answer
    then. From then on nothing the fit logs waits for it. ``finalize`` (the end of the fit) waits
    while the server makes progress, then says what is kept where.

    Args:
        spool_root: the spool folders' parent; each run's is ``<spool_root>/<run id>``.
        flush_timeout: seconds the end of a fit waits for a server that shows no sign of life.
        log_hyperparams: log what Lightning hands every logger at the start of a fit (the module's
            and DataModule's hyperparameters, flattened: about a hundred params). ``False`` where the
            run's params come from its config instead (the CLI's ``MLflowSaveConfig``).
        *args, **kwargs: ``MLFlowLogger``'s.
    """

    def __init__(self, *args, spool_root: str | os.PathLike = SPOOL_DIR, flush_timeout: float = 60.0,
                 log_hyperparams: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.spool_root = Path(spool_root)
        self.flush_timeout = flush_timeout
        self.hyperparams = log_hyperparams
        self.spooled: SpooledClient | None = None
        self.ended: str | None = None  # the status the last finalize set

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        if self.hyperparams:
            super().log_hyperparams(params)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["spooled"] = None  # its threads stay with the process that started them
        return state

    @property
    @rank_zero_experiment
    def experiment(self):
        if self.spooled is None:
            client = super().experiment  # finds or creates the run: the server must answer now
            self.spooled = SpooledClient(self.open_sender, client)
        return self.spooled

    def open_sender(self) -> SpoolSender:
        spool = Spool.create(self.spool_root / self._run_id, self._tracking_uri, self._run_id)
        return SpoolSender(spool, self._mlflow_client, self.flush_timeout).start()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized or self.spooled is None:
            return
        status = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(status, status)
        if status == "FAILED" and self.ended == "KILLED":
            return  # stopped by a signal (callbacks.preemption): Lightning's "failed" that follows is not news
        self.ended = status
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        self.spooled.set_terminated(self._run_id, status)
        sender = self.spooled.sender
        if sender.close():
            if sender.outages:
                print(f"MLflow: the tracking server at {self._tracking_uri} did not answer for "
                      f"{sender.outage_seconds:.0f} s of this job ({sender.outages} outage(s)); training did not "
                      f"wait, and everything kept meanwhile has been sent to run {self._run_id}.", flush=True)
            sender.spool.remove_if_empty()
        else:
            folder = sender.spool.folder.resolve()
            message = (f"MLflow tracking is behind: the tracking server at {self._tracking_uri} has not answered for "
                       f"{self.flush_timeout:.0f} s, so run {self._run_id} is incomplete there "
                       f"(last error: {sender.last_error[:200] or 'none'}).\n"
                       f"  Kept in {folder}: {summary_text(describe(sender.left()))}.\n"
                       f"  Send them once the server is back:  au-detect sync-tracking --spool {folder}\n"
                       f"  (resuming this run with --ckpt_path sends them first, too)")
            print(message, flush=True)
        if sender.spool.rejected_count():
            print(f"MLflow: {sender.spool.rejected_count()} records the server refused are in {sender.spool.rejected} "
                  f"(the reason beside each)", flush=True)


# -- sending a spool later ------------------------------------------------------------------------
def send_spool(folder: str | os.PathLike, tracking_uri: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Send one run's spool (what ``au-detect sync-tracking`` does for each). Returns what was
    sent and what is left, with ``busy`` when another process is sending it right now."""
    from mlflow import MlflowClient

    spool = Spool.open(folder)
    info = spool.info
    uri = tracking_uri or info["tracking_uri"]
    result = {"run_id": info["run_id"], "tracking_uri": uri, "folder": str(spool.folder), "busy": False}
    if not spool.lock(wait=False):
        return {**result, "busy": True, "sent": 0, "left": describe([]), "rejected": spool.rejected_count()}
    spool.unlock()  # the sender takes it again
    sender = SpoolSender(spool, MlflowClient(uri), flush_timeout=timeout, write=False)
    pending = len(sender.committed)
    if pending and not reachable(uri, timeout=min(timeout, 10.0)):
        sender.down_since = time.monotonic()  # probe before each try, not MLflow's retries
        sender.last_error = "no answer to a probe"
    sender.start()
    done = sender.close()
    left = describe(sender.left()) if not done else describe([])
    if done:
        spool.remove_if_empty()
    return {**result, "sent": sender.sent_records, "pending": pending, "left": left, "error": sender.last_error,
            "rejected": spool.rejected_count()}


def spool_folders(path: str | os.PathLike) -> list[Path]:
    """A run's spool folder, or every run's in a ``mlflow_spool`` folder."""
    path = Path(path)
    if (path / "spool.json").is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if (p / "spool.json").is_file())
    raise FileNotFoundError(f"{path}: no tracking spool there (a fit names it when it ends with tracking behind)")
