"""Download throughput: ``download_images`` with 1 worker against the default worker count.

A local server (a separate process, so it does not share the downloader's GIL) on 127.0.0.1
serves N JPEGs of about 100 KB, each after a simulated per-request latency (a remote host's
round trips), so the numbers show how well the workers hide latency, plus the cost of verifying
every image (full decode). The runs alternate between worker counts, each into a fresh temporary
folder, and the table gives the median over the repeats.

    python benchmarks/download_throughput.py [--images 200] [--latency-ms 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.download import DownloadSettings, download_images  # noqa: E402


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


def serve(n: int, latency: float) -> None:
    """The server process: prints its port, serves /img/<i>.jpg until stdin closes."""
    images = make_jpegs(n)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

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


def run(urls: list[str], workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = download_images(urls, tmp, DownloadSettings(workers=workers, timeout=10), progress=False)
        seconds = time.perf_counter() - start
        failed = [r for r in res.values() if r.status != "downloaded"]
        if failed:
            raise RuntimeError(f"{len(failed)} downloads failed, e.g. {failed[0]}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=DownloadSettings().workers, help="the many-worker setting")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.images, args.latency_ms / 1000)
        return

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--images", str(args.images), "--latency-ms", str(args.latency_ms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port, total_bytes = map(int, server.stdout.readline().split())
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.images)]
        settings = [1, args.workers]
        times: dict[int, list[float]] = {w: [] for w in settings}
        run(urls[:8], args.workers)  # warm-up (imports, PIL plugins), not measured
        for _ in range(args.repeats):
            for w in settings:
                times[w].append(run(urls, w))
    finally:
        server.stdin.close()
        server.wait(timeout=10)

    mb = total_bytes / 1e6
    print(f"{args.images} JPEGs, {mb / args.images * 1000:.0f} KB each on average, {args.latency_ms:g} ms simulated "
          f"latency per request, median of {args.repeats} runs (local server on 127.0.0.1)\n")
    print("| workers | images/s | MB/s | speed-up vs 1 worker |")
    print("|--------:|---------:|-----:|---------------------:|")
    base = statistics.median(times[1])
    for w in settings:
        t = statistics.median(times[w])
        print(f"| {w} | {args.images / t:.1f} | {mb / t:.2f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
