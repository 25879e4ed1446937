"""Alignment throughput: the project's batched, downscaled MTCNN pipeline against the plain loop.

Baseline: facenet-pytorch's per-image ``MTCNN.detect`` on each full-size scene (decode included),
as a user would write it. Ours: ``align_manifest`` end to end (decode in turn or in a thread ahead, detect on a
downscaled copy in batches, warp, write the cache). Both run on the same SynthAU scenes in the
same process, alternating, and the table gives medians over the repeats and the ratio.
Detection rate counts a scene when the chosen face overlaps the labelled face's true box.

    python benchmarks/alignment_throughput.py [--scenes 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import alternate, print_table  # noqa: E402
from datamodules.alignment.align import AlignmentSettings, box_iou  # noqa: E402
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest  # noqa: E402
from datamodules.io.manifest import read_manifest  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402


def baseline(paths: list[str], truth: list[list[float]]) -> tuple[float, float]:
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, device="cpu")
    hits = 0
    start = time.perf_counter()
    for path, gt in zip(paths, truth):
        boxes, _, _ = mtcnn.detect(Image.open(path).convert("RGB"), landmarks=True)
        if boxes is not None:
            largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            hits += box_iou(largest, gt) > 0.4
    return len(paths) / (time.perf_counter() - start), hits / len(paths)


def ours(manifest, truth: list[list[float]], settings: AlignmentSettings, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        split = AlignedSplit.open(align_manifest(manifest, cache, settings, workers=workers))
        rate = len(manifest) / (time.perf_counter() - start)
        by_line = {int(l): i for i, l in enumerate(manifest.lines)}
        hits = sum(r["status"] == "face" and box_iou(r["box"], truth[by_line[r["line"]]]) > 0.4
                   for r in split.report["samples"])
    return rate, hits / len(manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthau"
        generate_synthau(root, SynthAUSettings(num_images=args.scenes, seed=123, val_fraction=0, test_fraction=0))
        manifest = read_manifest(root / "train.tsv")
        rows = {json.loads(l)["image"]: json.loads(l) for l in (root / "faces.jsonl").read_text().splitlines()}
        truth = [rows[ref]["faces"][0]["box"] for ref in manifest.images]
        paths = [manifest.resolve(i) for i in range(len(manifest))]
        variants = {
            "MTCNN.detect per image, full size (baseline)": lambda: baseline(paths, truth),
            "align_manifest, defaults (320 copy, min face 24, batch 32)": lambda: ours(
                manifest, truth, AlignmentSettings(), 0),
            "  same, with 1 decoding thread ahead": lambda: ours(manifest, truth, AlignmentSettings(), 1),
            "  same, min face 20 (MTCNN's default) on the 320 copy": lambda: ours(
                manifest, truth, AlignmentSettings(min_face_size=20), 0),
            "  same, no downscaling (640), min face 20": lambda: ours(
                manifest, truth, AlignmentSettings(detect_max_side=640, min_face_size=20), 0),
        }
        results = alternate(variants, args.repeats)
    print(f"\n{args.scenes} SynthAU scenes of 640x480, {args.repeats} repeats, {args.threads} torch threads, "
          f"device cpu\n")
    print_table(results, "scenes/s", "detection rate", ".3f")

if __name__ == "__main__":
    main()
