"""Alignment over the ranks of a torchrun job against one process, on the same SynthAU split.

Baseline: ``au-detect align`` in one process (torch's default threads, all cores). Ours: the same
command under ``torchrun --nproc_per_node R --no-python`` (torchrun gives each rank one thread),
every rank aligning its share into the one cache. Both are timed as a user sees them: wall
time of the command, start-up included, into a fresh cache folder; they alternate over the
repeats and the table gives medians of images/s and the ratio; a second table leaves the start-up
out (the alignment's own time, from each cache's report). The last column checks that
the caches agree: the largest pixel difference of the two runs' crops (thread counts move
MTCNN's float results by a grey level at most).

    python benchmarks/distributed_alignment.py [--scenes 400] [--ranks 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import alternate, print_table  # noqa: E402
from datamodules.alignment.crop_cache import AlignedSplit  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def align(manifest: Path, cache: Path, ranks: int, crop: int) -> float:
    """Wall seconds of ``au-detect align`` with ``ranks`` processes (1: no torchrun)."""
    command = [str(BIN / "au-detect"), "align", "--manifests", f"[{manifest}]", "--cache_dir", str(cache),
               "--alignment.crop_size", str(crop)]
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "--no-python", *command]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synthau(tmp / "synthau", SynthAUSettings(num_images=args.scenes, seed=5, val_fraction=0.0,
                                                          test_fraction=0.0))
        manifest = tmp / "synthau" / "train.tsv"
        images = sum(1 for _ in manifest.open()) - 1
        runs = iter(range(10**6))

        def variant(ranks: int):
            def run():
                cache = tmp / f"cache-{ranks}-{next(runs)}"
                seconds = align(manifest, cache, ranks, args.crop)
                (folder,) = list(cache.iterdir())
                return images / seconds, folder
            return run

        results = alternate({"au-detect align, 1 process": variant(1),
                             f"torchrun, {args.ranks} ranks": variant(args.ranks)}, args.repeats)
        # The alignment alone, start-up left out: the report's seconds (from the shares handed out
        # to the last rank's journal line).
        phase = {name: [(AlignedSplit.open(folder).report["images_per_second"], "") for _, folder in rs]
                 for name, rs in results.items()}
        one, many = (AlignedSplit.open(rs[0][1]) for rs in results.values())
        diff = int(np.abs(one.crops.astype(int) - many.crops.astype(int)).max())
        same = (one.report["samples"] == many.report["samples"] and one.report["skipped_rows"]
                == many.report["skipped_rows"])
        table = {name: [(speed, diff) for speed, _ in rs] for name, rs in results.items()}
        print(f"{images} SynthAU scenes at {args.crop} px, wall time of the command (start-up included), "
              f"medians of {args.repeats}:\n")
        print_table(table, "images/s", "max crop diff", "d")
        print("\nthe alignment alone (report.json's images_per_second: no start-up):\n")
        print_table(phase, "images/s", "-", "s")
        print(f"\nreport records and skipped rows equal: {same}")
        print(json.dumps({name: [round(r[0], 2) for r in rs] for name, rs in results.items()}))
        print(json.dumps({name: [round(r[0], 2) for r in rs] for name, rs in phase.items()}))


if __name__ == "__main__":
    main()
