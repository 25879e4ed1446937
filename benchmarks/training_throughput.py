"""Training throughput: ``au-detect fit`` (LightningCLI, real loader, MLflow) against a bare loop.

Both train the demo's model (two ResNet-18 branches, selective learning, AdamW) on the same
SynthAU crops. The bare loop runs forward, loss, backward and step over tensors already in
memory and normalised: no loader, no augmentation, no metrics, no logging. The Lightning run
is the real command with the demo config. Images/s are timed over the same steps (after a
warm-up) and alternate between the two, so the machine's noise hits both; medians and ratio.

    python benchmarks/training_throughput.py [--scenes 400] [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.alignment.align import AlignmentSettings  # noqa: E402
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest  # noqa: E402
from datamodules.io.manifest import read_manifest  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402
from experiments.lightning_cli import AUDetectCLI  # noqa: E402
from lightning_modules.au_detector import AUNet  # noqa: E402
from lightning_modules.losses import SelectiveLearningLoss  # noqa: E402


class StepTimer(L.Callback):
    """Wall time from the end of the warm-up steps to the end of the last training step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.images += len(batch["index"])
            self.end = time.perf_counter()

    def rate(self) -> float:
        return self.images / (self.end - self.start)


def bare_loop(split: AlignedSplit, crop: int, batch_size: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    net = AUNet(backbone="resnet18")
    loss_fn = SelectiveLearningLoss(seed=0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(np.asarray(split.crops)).permute(0, 3, 1, 2).float() - mean) / std
    y, m = torch.from_numpy(split.labels), torch.from_numpy(split.mask)
    net.train()
    start, images = None, 0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.randint(len(x), (batch_size,))
        loss = loss_fn(net(x[idx]), y[idx], m[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += batch_size if step >= warmup else 0
    return images / (time.perf_counter() - start)


def lightning_fit(tmp: Path, root: Path, cache: Path, batch_size: int, steps: int, warmup: int) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "mlflow.yaml").write_text(yaml.safe_dump({"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                                                     "experiment_name": "throughput"}))
    timer = StepTimer(warmup)
    AUDetectCLI(args=["fit", "--config", str(ROOT / "experiments" / "configs" / "demo.yaml"), "--data.data_root", str(root),
                      "--data.synth.num_images", str(SCENES), "--data.synth.seed", "9", "--data.synth.val_fraction",
                      "0.1", "--data.synth.test_fraction", "0.1", "--data.cache_dir", str(cache),
                      "--data.batch_size", str(batch_size), "--trainer.max_epochs", "1",
                      "--trainer.limit_train_batches", str(warmup + steps), "--trainer.limit_val_batches", "0",
                      "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false", "--mlflow", str(tmp / "mlflow.yaml"),
                      "--mlflow_artifacts.log_model", "false", "--mlflow_artifacts.sample_grid", "0",
                      # the demo config loads the pretrained branches; random ones cost the same
                      "--model.face_weights", "null", "--model.emotion_weights", "null",
                      "--trainer.default_root_dir", str(tmp / "runs")],
                trainer_defaults={"callbacks": [timer]})
    return timer.rate()


SCENES = 400


def main() -> None:
    global SCENES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=SCENES)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    SCENES = args.scenes
    demo = yaml.safe_load((ROOT / "experiments" / "configs" / "demo.yaml").read_text())
    batch_size, crop = demo["data"]["batch_size"], demo["data"]["alignment"]["crop_size"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, cache = tmp / "synthau", tmp / "cache"
        generate_synthau(root, SynthAUSettings(num_images=SCENES, seed=9))
        split = AlignedSplit.open(align_manifest(read_manifest(root / "train.tsv"), cache,
                                                 AlignmentSettings(crop_size=crop), name="train"))
        bare, fit = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(split, crop, batch_size, args.steps, args.warmup))
            fit.append(lightning_fit(tmp / f"run{r}", root, cache, batch_size, args.steps, args.warmup))
    b, f = statistics.median(bare), statistics.median(fit)
    print(f"\ndemo model (2 x resnet18, {crop} px, batch {batch_size}), {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.repeats} repeats, {torch.get_num_threads()} threads\n")
    print("| training | images/s (median) | runs | vs bare loop |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch loop, tensors in memory | {b:.1f} | {', '.join(f'{v:.1f}' for v in bare)} | 1.00 |")
    print(f"| au-detect fit (LightningCLI, loader + augmentation, MLflow) | {f:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in fit)} | {f / b:.2f} |")


if __name__ == "__main__":
    main()
