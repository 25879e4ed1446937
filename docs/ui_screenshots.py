"""Screenshots of the MLflow UI, as a user sees a fit and a sweep: run pages in headless Chromium.

    python docs/ui_screenshots.py --tracking_uri sqlite:///mlflow.db --run <fit run id> \
        --sweep <sweep parent run id> --crossval <crossval parent run id> --out docs

starts ``mlflow server`` on the store (loopback, a free port) and writes ``mlflow_runs.png`` (the
fit's experiment as its runs list opens from the address the main job prints: the pipeline's stages
under their parent, the compared figures as columns), ``mlflow_run.png`` (the fit's page: its
model card as the description, dataset inputs, tags), ``mlflow_run_system_metrics.png`` (its CPU and memory
curves), ``mlflow_sweep.png`` (the sweep's parent run, its trials as child runs) and, when the parent holds them,
``mlflow_sweep_<plot>.png`` (Optuna's plots as the artifact viewer shows them),
``mlflow_crossval.png`` (a cross-validation's parent run: the field's table as its description, the
folds as child runs) and ``mlflow_crossval_table.png`` (the table's picture in the artifact viewer). Needs a Chromium
(``apt install chromium``); the page is given time to render its scripts before the capture.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tracking_uri: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", tracking_uri, "--workers", "1"],
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server on {tracking_uri} exited with {proc.returncode}")
            time.sleep(1)
    proc.kill()
    raise SystemExit("mlflow server did not answer in 120 s")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt install chromium (or put google-chrome on PATH)")


def screenshot(url: str, out: Path, size: tuple[int, int] = (1600, 1200), wait_ms: int = 20000) -> None:
    """One page, rendered by headless Chromium with ``wait_ms`` of its scripts' time."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                 f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                                 f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                                capture_output=True, text=True, timeout=180)
    if not out.is_file():
        raise SystemExit(f"no screenshot of {url}: {result.stderr[-1000:]}")
    print(f"{out}  <- {url}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking_uri", required=True)
    parser.add_argument("--run", help="a fit's run id")
    parser.add_argument("--sweep", help="a sweep's parent run id")
    parser.add_argument("--crossval", help="a cross-validation's parent run id")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    from mlflow import MlflowClient

    from experiments.tracking import TrackingSettings

    client = MlflowClient(args.tracking_uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args.tracking_uri, port)
    base = f"http://127.0.0.1:{port}/#/experiments"
    try:
        if args.run:
            exp = client.get_run(args.run).info.experiment_id
            ui = TrackingSettings(tracking_uri=args.tracking_uri).ui_url(exp, port=port)
            screenshot(ui, out / "mlflow_runs.png", (1800, 900))
            screenshot(f"{base}/{exp}/runs/{args.run}?workflowType=machine_learning", out / "mlflow_run.png",
                       (1600, 1500))
            screenshot(f"{base}/{exp}/runs/{args.run}/system-metrics", out / "mlflow_run_system_metrics.png")
        if args.sweep:
            exp = client.get_run(args.sweep).info.experiment_id
            screenshot(f"{base}/{exp}/runs/{args.sweep}", out / "mlflow_sweep.png", (1600, 1500))
            plots = [a.path for a in client.list_artifacts(args.sweep, "plots") if a.path.endswith(".png")]
            for path in plots:
                name = Path(path).stem
                screenshot(f"{base}/{exp}/runs/{args.sweep}/artifacts/{path}", out / f"mlflow_sweep_{name}.png")
        if args.crossval:
            exp = client.get_run(args.crossval).info.experiment_id
            screenshot(f"{base}/{exp}/runs/{args.crossval}", out / "mlflow_crossval.png", (1600, 1500))
            screenshot(f"{base}/{exp}/runs/{args.crossval}/artifacts/crossval_table.png",
                       out / "mlflow_crossval_table.png", (1600, 1000))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
