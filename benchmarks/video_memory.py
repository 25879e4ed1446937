"""Peak memory of ``au-detect predict`` against a video's length: the same SynthAU clip looped
into a 1-minute and a 30-minute video, each predicted in a process of its own (people, smoothed
signals, events, per-person summaries and AU-curve pictures on, as by default), its peak resident
memory (``ru_maxrss``) and the peak of Python's own allocations while predicting (``tracemalloc``,
from after the model is loaded) reported side by side with their ratio. What a run holds beyond the current batch is bounded by design (rows
held half a smoothing window, a curve of at most 2,000 points per person, the tracker's people):
the ratio should be near 1.

    python benchmarks/video_memory.py --model runs/demo/.../best.ckpt [--every 3] [--minutes 1 30]

Frames are taken with ``--every`` (skipped frames are only demuxed) so that 30 minutes run in a
few minutes on a CPU; what a run holds is per taken frame, so this does not flatter the measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthau.video import VideoSettings, clip_names, render_videos  # noqa: E402

CHILD = """
import json, resource, sys, time, tracemalloc
sys.path.insert(0, {root!r})
tracemalloc.start()
import experiments.predict as command
whole, timed = command.run, {{}}


def run(*args, **kwargs):  # the prediction itself: loading the model is the same for any video
    tracemalloc.reset_peak()
    timed["rss_before_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        return whole(*args, **kwargs)
    finally:
        timed["seconds"] = time.perf_counter() - start
        timed["peak_python_mb"] = tracemalloc.get_traced_memory()[1] / 2**20


command.run = run
command.predict({model!r}, [{video!r}], out={out!r}, every={every}, device="cpu")
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **timed}}))
"""


def looped(source: Path, out: Path, minutes: float) -> Path:
    """``source``'s frames repeated into an MJPG video of ``minutes`` (kept when already there)."""
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
    total = round(minutes * 60 * fps)
    if out.is_file() and cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT) == total:
        return out
    h, w = cv2.imdecode(frames[0], cv2.IMREAD_COLOR).shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for i in range(total):
        writer.write(cv2.imdecode(frames[i % len(frames)], cv2.IMREAD_COLOR))
    writer.release()
    return out


def measure(model: str, video: Path, every: int, out: Path) -> dict:
    """Predict on ``video`` in a fresh process; its peak memory and time."""
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), model=model, video=str(video), out=str(out),
                        every=every)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"predict on {video} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    with open(out) as f:
        result["rows"] = sum(1 for _ in f) - 1
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint, MLflow model or predictor folder")
    parser.add_argument("--root", default="data/synthau_video_long")
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 30.0])
    args = parser.parse_args(argv)
    root = Path(args.root)
    render_videos(root, VideoSettings(clips=1, people=(3, 3), seconds=20.0, fps=5.0, width=320, height=240, seed=7))
    source = root / clip_names(0)[0]
    results = {}
    for minutes in args.minutes:
        video = looped(source, root / f"looped_{minutes:g}min.avi", minutes)
        results[minutes] = measure(args.model, video, args.every, root / f"looped_{minutes:g}min.csv")
        r = results[minutes]
        print(f"{minutes:g} min: {r['rows']} rows, peak RSS {r['peak_rss_mb']:.0f} MB, peak Python heap "
              f"{r['peak_python_mb']:.1f} MB, {r['seconds']:.0f} s", flush=True)
    first, last = results[args.minutes[0]], results[args.minutes[-1]]
    print(f"\n| video | rows | peak RSS (MB) | peak Python heap (MB) | predict s |\n|---|---|---|---|---|")
    for minutes, r in results.items():
        print(f"| {minutes:g} min | {r['rows']} | {r['peak_rss_mb']:.0f} | {r['peak_python_mb']:.1f} | {r['seconds']:.0f} |")
    print(f"\n{args.minutes[-1]:g} min vs {args.minutes[0]:g} min: peak RSS "
          f"{last['peak_rss_mb'] / first['peak_rss_mb']:.3f}x, peak Python heap "
          f"{last['peak_python_mb'] / first['peak_python_mb']:.3f}x")
    return results


if __name__ == "__main__":
    main()
