"""``au-detect serve`` under load it did not ask for: connections that never send their headers
(held open past the open-files limit, or trickled a byte at a time), and a request whose image
is slow to decode beside a normal one."""

from __future__ import annotations

import base64
import io
import json
import resource
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from experiments.serve import serve_command, serve_environment

from .training_helpers import log_untrained_model, served_model

SPEC = {"aus": [1, 2, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
OPEN_FILES = 256  # the server's nofile limit in these tests: a service started with a low one
HEADER_TIMEOUT = 2.0
AU_DETECT = str(Path(sys.executable).with_name("au-detect"))


def _low_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def _ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``au-detect serve`` of a small logged detector (random weights), 2 workers, under a
    256 open-files limit, with a 2 s header deadline."""
    tmp = tmp_path_factory.mktemp("serve_limits")
    uri, model = log_untrained_model(tmp, "serve_limits", SPEC)

    def serve(port: int) -> list[str]:
        return [AU_DETECT, "serve", "--model", model, "--port", str(port), "--workers", "2", "--timeout", "30",
                "--header_timeout", str(HEADER_TIMEOUT), "--max_connections", "96"]

    with served_model(model, uri, tmp, serve, preexec_fn=_low_open_files) as (url, proc):
        yield {"port": urllib.parse.urlsplit(url).port, "proc": proc}


def test_serve_sets_the_limits_for_mlflow_models_serve():
    """What ``au-detect serve`` hands ``mlflow models serve``: workers and request timeout on its
    command line, the protocol and timeouts in uvicorn's environment settings."""
    command = serve_command("models:/au-detector@champion", "127.0.0.1", 5001, 3, 20)
    assert command[1:4] == ["models", "serve", "-m"] and command[command.index("-w") + 1] == "3"
    assert command[command.index("-t") + 1] == "20"
    env = serve_environment(3, 20, header_timeout=4, keep_alive=5, max_connections=100)
    assert env["UVICORN_HTTP"] == "experiments.serve:LimitedH11Protocol"
    assert env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] == "20" and env["AU_DETECT_HEADER_TIMEOUT"] == "4"
    assert env["AU_DETECT_MAX_CONNECTIONS"] == "100" and env["UVICORN_TIMEOUT_KEEP_ALIVE"] == "5"


@pytest.mark.slow
def test_half_open_connections_past_the_open_files_limit_are_closed(server):
    """More silent and trickling connections than the server has file descriptors: each is closed
    within the header deadline (trickled bytes do not extend it), and /ping is answered again
    while the client still holds its ends open (uvicorn alone holds them forever)."""
    port = server["port"]
    silent, trickling = [], []
    for i in range(2 * OPEN_FILES + 100):  # past both workers' limits
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        (trickling if i % 10 == 0 else silent).append(s)
        if i % 10 == 0:
            s.send(b"POST /invocations HTTP/1.1\r\n")
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    answered = None
    while time.monotonic() - opened < HEADER_TIMEOUT + 8 and (len(closed_at) < len(silent) + len(trickling)
                                                                or answered is None):
        for s in silent + trickling:
            if s.fileno() in closed_at:
                continue
            try:
                if s.recv(1024) == b"":
                    closed_at[s.fileno()] = time.monotonic() - opened
            except BlockingIOError:
                if s in trickling:
                    try:
                        s.send(b"X")  # a header byte now and then: the deadline stands
                    except OSError:
                        closed_at[s.fileno()] = time.monotonic() - opened
            except OSError:
                closed_at[s.fileno()] = time.monotonic() - opened
        if answered is None and _ping(port, 0.5):
            answered = time.monotonic() - opened
        time.sleep(0.2)
    for s in silent + trickling:
        s.close()
    assert len(closed_at) == len(silent) + len(trickling), f"{len(closed_at)} of {len(silent) + len(trickling)} closed"
    assert max(closed_at.values()) < HEADER_TIMEOUT + 4, max(closed_at.values())
    assert answered is not None and answered < HEADER_TIMEOUT + 4, answered
    assert _ping(port)


def _post(port: int, images: list[bytes], results: dict, key: str) -> None:
    body = json.dumps({"dataframe_records": [{"image": base64.b64encode(b).decode()} for b in images]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            results[key] = (r.status, json.loads(r.read())["predictions"], time.monotonic() - start)
    except urllib.error.HTTPError as e:
        results[key] = (e.code, e.read().decode(), time.monotonic() - start)


@pytest.mark.slow
def test_a_scan_bomb_request_does_not_hold_up_a_normal_one(server, synthau):
    """A progressive JPEG of thousands of scans and a normal face photo, posted at once: the bomb
    gets its refusal row, the photo its answer, both within seconds."""
    from PIL import Image

    from tests.fuzz_inputs import scan_bomb

    photo = next((synthau / "images").rglob("*.jpg")).read_bytes()
    plain = io.BytesIO()
    Image.new("RGB", (7000, 7000), (90, 120, 150)).save(plain, "JPEG", progressive=True)
    bomb = scan_bomb(plain.getvalue(), 3000)  # 49 MP, thousands of scans: minutes to decode
    _post(server["port"], [photo], {}, "warm")  # both workers' first request loads nothing more
    results: dict = {}
    threads = [threading.Thread(target=_post, args=(server["port"], [bomb], results, "bomb")),
               threading.Thread(target=_post, args=(server["port"], [photo], results, "normal"))]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for t in threads:
        t.join(90)
    status, rows, seconds = results["normal"]
    assert status == 200 and rows[0]["status"] in ("ok", "no_face") and seconds < 3, results["normal"]
    status, rows, seconds = results["bomb"]
    assert status == 200 and rows[0]["status"] == "too_costly" and seconds < 3, results["bomb"]
