"""``au-detect predict`` as one process against the same command over ranks (``--trainer.devices N``,
Lightning's predict loop, shares joined in input order), on a folder of SynthAU photos and on a
long clip, alternated over repeats in one run (the machine is shared: medians and their ratio).
Each time is the whole command as a user starts it: processes, model loading, prediction, the
join; the joined rows are checked against the one process's (largest probability difference).

    python benchmarks/predict_ranks.py --model runs/demo/.../best.ckpt [--devices 2] [--images 240]

On CPUs each rank runs ``cores / ranks`` threads (Lightning's setting), so on one machine ranks
share the same cores that one process's threads would use: what ranks buy there is the decoding,
detection and Python work that one process does not spread over its threads. On GPUs each rank
has a device of its own (``benchmarks/gpu_check.py``'s predict row says what one GPU does).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def largest_difference(a: Path, b: Path) -> float:
    import pandas as pd

    x, y = pd.read_csv(a), pd.read_csv(b)
    probs = [c for c in x.columns if c.endswith("_prob")]
    if len(x) != len(y) or list(x["source"]) != list(y["source"]):
        return float("inf")
    return float(np.nanmax(np.abs(x[probs].to_numpy(float) - y[probs].to_numpy(float)), initial=0.0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint, MLflow model or predictor folder")
    parser.add_argument("--synthau", default="data/synthau", help="SynthAU root (its images/ folder)")
    parser.add_argument("--clip", default="data/synthau_video_long/looped_1min.avi", help="the long clip")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="predict_ranks_"))
    folder = work / "photos"
    folder.mkdir()
    for p in sorted((Path(args.synthau) / "images").rglob("*.jpg"))[:args.images]:
        shutil.copy(p, folder / p.name)
    workloads = {f"{len(list(folder.iterdir()))} photos": [str(folder)], Path(args.clip).name: [args.clip]}
    base = [sys.executable, "-m", "experiments.cli", "predict", "--model", args.model, "--batch_frames", "32"]
    ranks = ["--trainer.accelerator", "cpu", "--trainer.devices", str(args.devices), "--share_images", "32"]
    rows = {}
    try:
        for name, inputs in workloads.items():
            times: dict[str, list[float]] = {"one": [], "ranks": []}
            for _ in range(args.repeats):
                times["one"].append(timed([*base, "--input", *inputs, "--out", str(work / "one.csv"),
                                           "--device", "cpu"]))
                times["ranks"].append(timed([*base, "--input", *inputs, "--out", str(work / "ranks.csv"), *ranks]))
            one, many = statistics.median(times["one"]), statistics.median(times["ranks"])
            rows[name] = {"one_s": one, "ranks_s": many, "ratio": one / many,
                          "max_abs_prob": largest_difference(work / "one.csv", work / "ranks.csv")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.repeats} repeats alternated, medians of the whole command; {args.devices} CPU ranks vs one process\n")
    print(f"| input | one process s | {args.devices} ranks s | ratio | largest probability difference |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['one_s']:.1f} | {r['ranks_s']:.1f} | {r['ratio']:.2f}x | {r['max_abs_prob']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
