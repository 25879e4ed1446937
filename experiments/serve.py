"""``au-detect serve``: ``mlflow models serve`` of a logged model, with limits a public endpoint needs.

    au-detect serve --model models:/au-detector@champion --port 5001 --workers 2

It runs MLflow's own scoring server (the same ``/invocations`` and ``/ping``, the same request
format) and sets what ``mlflow models serve`` leaves at values made for a laptop:

* ``--workers`` processes, so one long request does not hold up the others;
* ``--timeout``: a request not answered in that many seconds gets HTTP 504 (MLflow's
  ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``); each image's decoding is bounded by the model's
  ``decode_seconds`` (a ``too_costly`` row), so a request's worker is free again soon after;
* connections that do not send their headers within ``--header_timeout`` seconds, and idle
  keep-alive connections after ``--keep_alive`` seconds, are closed; past ``--max_connections``
  a worker closes new connections at once
  (:class:`LimitedH11Protocol`).

uvicorn closes a keep-alive connection that stays idle after a response, but a connection that
never completes its first request's headers (opened and left silent, or sending a byte now and
then: slowloris) is held forever; enough of them exhaust the process's file descriptors and
nobody is served, ``/ping`` included. :class:`LimitedH11Protocol` is uvicorn's HTTP/1.1 protocol
with a header deadline and a connection cap. uvicorn takes it by name from the environment, so
plain ``mlflow models serve`` (which starts ``uvicorn ... app``) gets it too, from a Python
environment where this project is installed::

    UVICORN_HTTP=experiments.serve:LimitedH11Protocol mlflow models serve -m ... -w 2 -t 60

Per-client limits (connections or requests per address, body size before it is read) need a
proxy in front: see the serving guide.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import sys
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from experiments.tracking import use_for_model_uri

HEADER_TIMEOUT_ENV = "AU_DETECT_HEADER_TIMEOUT"
MAX_CONNECTIONS_ENV = "AU_DETECT_MAX_CONNECTIONS"
PROTOCOL = f"{__name__}:LimitedH11Protocol"  # imported by name in each uvicorn worker
HEADER_TIMEOUT = 10.0  # seconds: a phone on a poor network sends its headers in well under this


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (systems often start services at
    1024); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):  # a container may refuse: keep what there is
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _setting(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"{name}={value!r}: not a number") from None


OPEN_FILES = raise_open_files_limit()


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and a cap on open connections."""

    header_timeout = _setting(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT)
    max_connections = int(_setting(MAX_CONNECTIONS_ENV, OPEN_FILES * 3 // 4))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.close()  # before a byte is read: the descriptor comes back at once
            return
        self.start_header_deadline()

    def start_header_deadline(self) -> None:
        self.stop_header_deadline()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.headers_overdue)

    def stop_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def headers_overdue(self) -> None:
        self.header_deadline = None
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
            if not self.transport.is_closing():
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # headers complete: a request runs
            self.stop_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.start_header_deadline()  # the next request on this connection has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_deadline()
        super().connection_lost(exc)


def serve_environment(workers: int, request_timeout: int, header_timeout: float = HEADER_TIMEOUT,
                      keep_alive: int = 5, max_connections: int | None = None) -> dict[str, str]:
    """Environment for ``mlflow models serve`` that gives its uvicorn these limits (uvicorn
    reads ``UVICORN_*`` settings from the environment; MLflow passes its environment on)."""
    env = {"UVICORN_HTTP": PROTOCOL, "UVICORN_TIMEOUT_KEEP_ALIVE": str(keep_alive),
           HEADER_TIMEOUT_ENV: str(header_timeout), "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(request_timeout),
           "UVICORN_WORKERS": str(workers)}
    if max_connections is not None:
        env[MAX_CONNECTIONS_ENV] = str(max_connections)
    return env


def serve_command(model: str, host: str, port: int, workers: int, timeout: int) -> list[str]:
    """The ``mlflow models serve`` command line ``au-detect serve`` runs."""
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return [mlflow_bin, "models", "serve", "-m", model, "--env-manager", "local", "-h", host, "-p", str(port),
            "-w", str(workers), "-t", str(timeout)]


def serve(model: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 2, timeout: int = 60,
          header_timeout: float = 10.0, keep_alive: int = 5, max_connections: int | None = None,
          mlflow: str = "mlflow.yaml") -> None:
    """Serve a logged model over HTTP (MLflow's scoring server) with worker and connection limits.

    Args:
        model: an MLflow model URI: ``runs:/<id>/model``, ``models:/<name>/<version>``,
            ``models:/<name>@champion``, or a local model folder.
        host: address to listen on (``0.0.0.0``: every interface; put a proxy in front).
        port: port to listen on.
        workers: server processes (each loads the model: memory times workers).
        timeout: seconds a request may take before it is answered with HTTP 504.
        header_timeout: seconds a connection has to send a request's headers before it is closed.
        keep_alive: seconds an idle keep-alive connection is kept.
        max_connections: open connections per worker past which new ones are closed at once
            (default: 3/4 of the open-files limit).
        mlflow: MLflow settings file, for MLflow model URIs (MLFLOW_TRACKING_URI wins if set).
    """
    for name, value in (("workers", workers), ("timeout", timeout), ("header_timeout", header_timeout),
                        ("keep_alive", keep_alive), ("max_connections", max_connections or 1)):
        if value <= 0:
            raise ValueError(f"--{name} {value}: must be positive")
    use_for_model_uri(model, mlflow)
    env = {**os.environ, **serve_environment(workers, timeout, header_timeout, keep_alive, max_connections)}
    import mlflow as mlflow_module

    env.setdefault("MLFLOW_TRACKING_URI", mlflow_module.get_tracking_uri())
    # uvicorn is started from PATH by MLflow: the one beside this interpreter, as in an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = serve_command(model, host, port, workers, timeout)
    print(f"Serving {model} on http://{host}:{port}/invocations ({workers} workers, {timeout} s per request, "
          f"headers within {header_timeout:g} s)", flush=True)
    os.execve(command[0], command, env)  # the server takes this process's place: signals reach it directly
