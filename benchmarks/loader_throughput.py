"""Loader throughput from the aligned cache, with training augmentation, per worker core.

Ours: ``AlignedFaceDataset`` over the memory-mapped crop cache (uint8, augmentation with the
AU-aware flip). Baseline in the same run: the same crops stored as one JPEG per sample and
decoded per item, the usual image-folder layout. Images/s per worker core is the loader's rate
divided by its processes (the main process when ``num_workers`` is 0).

    python benchmarks/loader_throughput.py [--scenes 300] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.alignment import AlignedSplit, AlignmentSettings, align_manifest  # noqa: E402
from datamodules.au_datamodule import AlignedFaceDataset  # noqa: E402
from datamodules.augmentation import AUAugmentation  # noqa: E402
from datamodules.manifest import EMOTIONET_AUS, read_manifest  # noqa: E402
from datamodules.synthetic import SynthAUSettings, generate_synthau  # noqa: E402


class JpegFolder(Dataset):
    """The baseline: one JPEG per aligned crop, decoded for every item."""

    def __init__(self, paths: list[Path], split: AlignedSplit, transform: AUAugmentation):
        self.paths, self.split, self.transform = paths, split, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = cv2.cvtColor(cv2.imread(str(self.paths[i])), cv2.COLOR_BGR2RGB)
        image, labels, mask = self.transform(image, self.split.labels[i], self.split.mask[i])
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "labels": torch.as_tensor(labels), "mask": torch.as_tensor(mask), "index": i}


def rate(dataset: Dataset, workers: int, epochs: int, batch_size: int = 64) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    next(iter(loader))  # start-up is not throughput
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        n = sum(len(b["index"]) for b in loader)
        times.append(n / (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml").read_text())
    parser.add_argument("--sizes", type=int, nargs="+", default=[demo["data"]["alignment"]["crop_size"], 224],
                        help="crop sizes (default: the demo's and the paper's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synthau(tmp / "synthau", SynthAUSettings(num_images=args.scenes, seed=5, val_fraction=0,
                                                          test_fraction=0))
        manifest = read_manifest(tmp / "synthau" / "train.tsv")
        for size in args.sizes:
            split = AlignedSplit.open(align_manifest(manifest, tmp / "cache", AlignmentSettings(crop_size=size)))
            jpegs = []
            for i in range(len(split)):
                jpegs.append(tmp / f"jpeg{size}" / f"{i:06d}.jpg")
                jpegs[-1].parent.mkdir(exist_ok=True)
                cv2.imwrite(str(jpegs[-1]), cv2.cvtColor(np.asarray(split.crops[i]), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
            augment = AUAugmentation(EMOTIONET_AUS)
            for workers in args.workers:
                cached = rate(AlignedFaceDataset(split, augment), workers, args.epochs)
                folder = rate(JpegFolder(jpegs, split, augment), workers, args.epochs)
                rows.append((size, workers, cached, folder))
    print(f"\n{args.scenes} aligned crops, batch 64, augmentation on, median of {args.epochs} epochs\n")
    print("| crop | workers | cache img/s | per core | JPEG-folder img/s | per core | cache vs JPEG |")
    print("|------|---------|-------------|----------|-------------------|----------|---------------|")
    for size, workers, cached, folder in rows:
        cores = max(workers, 1)
        print(f"| {size:4d} | {workers:7d} | {cached:11.0f} | {cached / cores:8.0f} | {folder:17.0f} | "
              f"{folder / cores:8.0f} | {cached / folder:12.2f}x |")


if __name__ == "__main__":
    main()
