"""Download throughput: ``download_images`` with 1 worker and with the default worker count,
optionally side by side with another implementation of the module (an earlier commit's).

A local server (a separate process, so it does not share the downloader's GIL) on 127.0.0.1
serves N JPEGs of about 100 KB over HTTP/1.1 keep-alive, as real servers do. Each request waits
a simulated latency (a remote host's round trip), and each new connection a simulated setup
time (TCP and TLS handshakes: round trips that a reused connection does not pay again). So the
numbers show how well the workers hide latency, what connection reuse saves, and the cost of
verifying every image (full decode). Runs alternate between implementations (in alternating
order) and worker counts, each into a fresh temporary folder, and the table gives medians over
the repeats: on a shared machine, compare the ratios more than the absolute figures.

    python benchmarks/download_throughput.py [--images 200] [--latency-ms 20] [--connect-ms 30]
        [--repeats 5] [--baseline OLD_DOWNLOAD_PY]

``--baseline`` takes a copy of another version of ``datamodules/download/downloader.py``, e.g.
``git show <commit>:datamodules/download/downloader.py > /tmp/old_download.py``; it is imported as a
module of the ``datamodules`` package and run with the same settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datamodules.download.downloader as current  # noqa: E402


def make_jpegs(n: int, distinct: int = 16) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(min(n, distinct)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (220, 220, 3), dtype=np.uint8)).save(buf, "JPEG", quality=92, subsampling=0)
        pool.append(buf.getvalue())
    return [pool[i % len(pool)] for i in range(n)]


def serve(n: int, latency: float, setup: float) -> None:
    """The server process: prints its port, serves /img/<i>.jpg until stdin closes."""
    images = make_jpegs(n)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless the client asks to close

        def log_message(self, *args) -> None:
            pass

        def handle(self) -> None:  # once per connection
            time.sleep(setup)
            super().handle()

        def do_GET(self) -> None:
            time.sleep(latency)
            try:
                body = images[int(self.path.removeprefix("/img/").removesuffix(".jpg"))]
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    srv = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(srv.server_address[1], sum(map(len, images)), flush=True)
    sys.stdin.read()  # until the parent closes it
    srv.shutdown()


def load_baseline(path: str) -> ModuleType:
    """Another version of datamodules/download/downloader.py, as the module ``datamodules._baseline_download``."""
    name = "datamodules._baseline_download"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(impl: ModuleType, urls: list[str], workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = impl.download_images(urls, tmp, impl.DownloadSettings(workers=workers, timeout=10), progress=False)
        seconds = time.perf_counter() - start
        failed = [r for r in res.values() if r.status != "downloaded"]
        if failed:
            raise RuntimeError(f"{impl.__name__}: {len(failed)} downloads failed, e.g. {failed[0]}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per request")
    parser.add_argument("--connect-ms", type=float, default=30.0, help="per new connection (handshakes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=current.DownloadSettings().workers,
                        help="the many-worker setting")
    parser.add_argument("--baseline", help="another download.py to compare with (e.g. from git show)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.images, args.latency_ms / 1000, args.connect_ms / 1000)
        return

    impls = {"current": current}
    if args.baseline:
        impls = {"baseline": load_baseline(args.baseline), **impls}
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--images", str(args.images), "--latency-ms", str(args.latency_ms),
         "--connect-ms", str(args.connect_ms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port, total_bytes = map(int, server.stdout.readline().split())
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.images)]
        settings = [1, args.workers]
        times: dict[tuple[str, int], list[float]] = {(name, w): [] for name in impls for w in settings}
        for impl in impls.values():
            run(impl, urls[:8], args.workers)  # warm-up (imports, PIL plugins), not measured
        for repeat in range(args.repeats):
            order = list(impls) if repeat % 2 == 0 else list(reversed(impls))  # neither always runs first
            for w in settings:
                for name in order:
                    times[(name, w)].append(run(impls[name], urls, w))
    finally:
        server.stdin.close()
        server.wait(timeout=10)

    mb = total_bytes / 1e6
    print(f"{args.images} JPEGs, {mb / args.images * 1000:.0f} KB each on average, {args.latency_ms:g} ms simulated "
          f"latency per request, {args.connect_ms:g} ms per new connection, median of {args.repeats} runs "
          f"(local server on 127.0.0.1)\n")
    print("| implementation | workers | images/s | MB/s | speed-up vs 1 worker | runs (s) |")
    print("|----------------|--------:|---------:|-----:|---------------------:|----------|")
    median = {key: statistics.median(t) for key, t in times.items()}
    for name in impls:
        for w in settings:
            t = median[(name, w)]
            runs = " ".join(f"{x:.2f}" for x in times[(name, w)])
            print(f"| {name} | {w} | {args.images / t:.1f} | {mb / t:.2f} | {median[(name, 1)] / t:.2f}x | {runs} |")
    if args.baseline:
        print("\n| workers | throughput current / baseline (medians) |")
        print("|--------:|---------------------------------------:|")
        for w in settings:
            print(f"| {w} | {median[('baseline', w)] / median[('current', w)]:.2f}x |")


if __name__ == "__main__":
    main()
