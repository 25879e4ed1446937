"""Loader throughput from the aligned cache, with training augmentation, per worker core.

Ours: ``AlignedFaceDataset`` over the memory-mapped crop cache (uint8, augmentation with the
AU-aware flip). Baseline in the same run: the same crops stored as one JPEG per sample and
decoded per item, the usual image-folder layout. Images/s per worker core is the loader's rate
divided by its processes (the main process when ``num_workers`` is 0).

Second table: what verifying the crops' checksums costs the same loader. Checked and unchecked
alternate on freshly opened splits, so each checked run's first epoch hashes every chunk (its
workers share one record of verified chunks) and its later epochs only look the record up.

    python benchmarks/loader_throughput.py [--scenes 300] [--epochs 3] [--repeats 3]
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

from datamodules.alignment.align import AlignmentSettings  # noqa: E402
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest  # noqa: E402
from datamodules.au_datamodule import AlignedFaceDataset  # noqa: E402
from datamodules.augmentation import AUAugmentation  # noqa: E402
from datamodules.io.manifest import EMOTIONET_AUS, read_manifest  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402


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


def _loader(dataset: Dataset, workers: int, batch_size: int = 64) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def _epoch_rate(loader: DataLoader) -> float:
    start = time.perf_counter()
    n = sum(len(b["index"]) for b in loader)
    return n / (time.perf_counter() - start)


def rate(dataset: Dataset, workers: int, epochs: int) -> float:
    loader = _loader(dataset, workers)
    next(iter(loader))  # start-up is not throughput
    return statistics.median(_epoch_rate(loader) for _ in range(epochs))


def check_overhead(folder: Path, augment: AUAugmentation, workers: int, epochs: int,
                   repeats: int) -> dict[tuple[bool, str], float]:
    """Median images/s with and without the checksum check: first epoch (start-up and hashing
    included, for both) and later epochs, keyed by (checked, "first" | "later")."""
    rates: dict[tuple[bool, str], list[float]] = {(c, e): [] for c in (False, True) for e in ("first", "later")}
    for r in range(repeats):
        for checked in (False, True) if r % 2 == 0 else (True, False):  # ABBA: drift cancels
            split = AlignedSplit.open(folder, check_crops=checked)
            loader = _loader(AlignedFaceDataset(split, augment), workers)
            rates[checked, "first"].append(_epoch_rate(loader))
            rates[checked, "later"] += [_epoch_rate(loader) for _ in range(epochs - 1)]
            del loader
    return {k: statistics.median(v) for k, v in rates.items()}


def check_costs(folder: Path, reads: int = 20000, repeats: int = 5) -> tuple[float, float]:
    """Seconds ``verify()`` takes over the whole cache, and the seconds a read of a verified
    sample costs beyond an unchecked one (alternating medians)."""
    checked, plain = AlignedSplit.open(folder), AlignedSplit.open(folder, check_crops=False)
    start = time.perf_counter()
    checked.verify()
    verify = time.perf_counter() - start
    idx = np.random.default_rng(0).integers(len(checked), size=reads).tolist()
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats):
        for split in (plain, checked) if r % 2 == 0 else (checked, plain):
            start = time.perf_counter()
            for i in idx:
                split.crops[i]
            times[split is checked].append(time.perf_counter() - start)
    return verify, (statistics.median(times[True]) - statistics.median(times[False])) / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="alternating checked/unchecked runs")
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "configs" / "demo.yaml").read_text())
    parser.add_argument("--sizes", type=int, nargs="+", default=[demo["data"]["alignment"]["crop_size"], 224],
                        help="crop sizes (default: the demo's and the paper's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, checks, costs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synthau(tmp / "synthau", SynthAUSettings(num_images=args.scenes, seed=5, val_fraction=0,
                                                          test_fraction=0))
        manifest = read_manifest(tmp / "synthau" / "train.tsv")
        for size in args.sizes:
            cache = align_manifest(manifest, tmp / "cache", AlignmentSettings(crop_size=size))
            split = AlignedSplit.open(cache)
            jpegs = []
            for i in range(len(split)):
                jpegs.append(tmp / f"jpeg{size}" / f"{i:06d}.jpg")
                jpegs[-1].parent.mkdir(exist_ok=True)
                cv2.imwrite(str(jpegs[-1]), cv2.cvtColor(np.asarray(split.crops[i]), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
            augment = AUAugmentation(EMOTIONET_AUS)
            costs.append((size, split.crops.nbytes, check_costs(cache)))
            for workers in args.workers:
                cached = rate(AlignedFaceDataset(split, augment), workers, args.epochs)
                folder = rate(JpegFolder(jpegs, split, augment), workers, args.epochs)
                rows.append((size, workers, cached, folder))
                checks.append((size, workers, check_overhead(cache, augment, workers, max(args.epochs, 2),
                                                             args.repeats)))
    print(f"\n{args.scenes} aligned crops, batch 64, augmentation on, median of {args.epochs} epochs\n")
    print("| crop | workers | cache img/s | per core | JPEG-folder img/s | per core | cache vs JPEG |")
    print("|------|---------|-------------|----------|-------------------|----------|---------------|")
    for size, workers, cached, folder in rows:
        cores = max(workers, 1)
        print(f"| {size:4d} | {workers:7d} | {cached:11.0f} | {cached / cores:8.0f} | {folder:17.0f} | "
              f"{folder / cores:8.0f} | {cached / folder:12.2f}x |")
    print(f"\nChecksum check, median of {args.repeats} alternating runs (first epoch: worker start-up and "
          f"hashing; later: {max(args.epochs, 2) - 1} epochs each)\n")
    print("| crop | workers | first epoch img/s checked / unchecked | ratio | later img/s checked / unchecked | ratio |")
    print("|------|---------|---------------------------------------|-------|---------------------------------|-------|")
    for size, workers, r in checks:
        print(f"| {size:4d} | {workers:7d} | {r[True, 'first']:18.0f} / {r[False, 'first']:<16.0f} | "
              f"{r[True, 'first'] / r[False, 'first']:5.3f} | {r[True, 'later']:14.0f} / {r[False, 'later']:<14.0f} | "
              f"{r[True, 'later'] / r[False, 'later']:5.3f} |")
    print()
    unchecked = {size: r[False, "later"] for size, workers, r in checks if workers == min(args.workers)}
    for size, nbytes, (verify, per_read) in costs:
        share = f" ({100 * per_read * unchecked[size]:.3f} % of a sample's time with {min(args.workers)} workers)"
        print(f"{size} px: verify() hashed {nbytes / 1e6:.1f} MB in {1e3 * verify:.1f} ms ({nbytes / verify / 1e9:.2f} "
              f"GB/s); a read of a verified sample costs {1e6 * per_read:+.2f} us over an unchecked one{share}")


if __name__ == "__main__":
    main()
