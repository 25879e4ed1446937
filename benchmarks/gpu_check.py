"""GPU acceptance check: what one GPU does with the paper's model, measured with the project's code.

One command, meant to finish within 8 minutes on one H100/H200-class GPU; it prints a Markdown
table and writes the same figures as JSON (``--out``). Networks start from random weights (the
cost does not depend on them) and nothing is downloaded. The rows:

  train eager       the training step of the dual-branch AU network (AUNet, both branches, the
                    23 EmotioNet AUs, the paper config's heads, dropout and loss: AUDetector's own
                    ``model_step``) at 224 px under bf16 autocast, channels-last, AdamW (the paper
                    config's SGD keeps one state per weight, not two), cuDNN's autotuner on, on a
                    synthetic batch already on the device. Images/s from the median step
                    (CUDA-synchronised, after warm-up); model FLOPs per image counted by
                    ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward
                    (convolutions and matmuls: what MFU counts); achieved FLOP/s and MFU against
                    the GPU's peak dense bf16 rate (table below, or ``--peak_tflops``); peak memory
                    (``torch.cuda.max_memory_allocated``).
  largest batch     the largest training batch that fits: doubling, then bisection, a try being
                    one training step; out-of-memory errors are caught (search capped).
  train compiled    the same step with the branches under ``torch.compile``; compile time is the
                    warm-up steps' time beyond the steady steps' (reported apart).
  MTCNN             FaceDetector (the batched MTCNN cascade of alignment) on SynthAU scenes, on
                    the device and, on a few scenes only, on the CPU.
  predict           ``au-detect predict`` as the command runs it (experiments.predict.run: decode
                    threads, detection, alignment, the network, the CSV) with an AUPredictor built
                    in-process around the random network, in float32 and bf16-mixed.
  video             ``au-detect predict`` on a SynthAU clip of people crossing and leaving, with
                    people and smoothing on, detecting every frame whole (``--detect_every 1``)
                    against the detection prior (``--detect_every 10``): frames/s of each, their
                    ratio, and the faces each found.
  DDP               the training step under DistributedDataParallel over every visible GPU (NCCL;
                    skipped with one GPU): images/s in total and per GPU.
  loader            crops/s on one CPU core of the training loader (AlignedFaceDataset over an
                    aligned SynthAU cache at the crop size, the paper config's augmentation), and
                    the CPU cores one GPU needs: training images/s / crops/s per core.

``--smoke`` runs the same code paths on the CPU in seconds: resnet18 at 64 px, batch 4, 2 steps,
bf16 autocast on the CPU, torch.compile with Dynamo's ``eager`` backend (graphs captured, no
code generated; ``--compile_backend aot_eager`` adds the backward graph, ``inductor`` builds C++
kernels), MTCNN on 3 scenes, predict on 2, a 3 s clip at 320x240, DDP over 2 CPU processes with gloo; what needs CUDA
(memory figures, MFU) says so. A check that fails (compile, DDP, MTCNN, predict, loader) says so
in its row and the others still run; the exit status is then 1. The JSON also holds each
check's seconds (``seconds_by_check``).

    python benchmarks/gpu_check.py                  # on the GPU machine
    python benchmarks/gpu_check.py --smoke          # anywhere, e.g. in the tests
    python benchmarks/gpu_check.py --peak_tflops 835 --out h100nvl.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.alignment.align import AlignmentSettings, FaceDetector  # noqa: E402
from datamodules.au_datamodule import AlignedFaceDataset  # noqa: E402
from datamodules.augmentation import AUAugmentation  # noqa: E402
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest  # noqa: E402
from datamodules.io.manifest import EMOTIONET_AUS, read_manifest  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402
from datamodules.synthau.video import VideoSettings, clip_names, render_videos  # noqa: E402
from experiments.predict import run as predict_run  # noqa: E402
from lightning_modules.au_detector import AUDetector, AUNet  # noqa: E402
from lightning_modules.serving.predictor import AUPredictor  # noqa: E402

PAPER_CONFIG = ROOT / "experiments" / "configs" / "emotionet_resnet152.yaml"
# Peak dense bf16 FLOP/s (no sparsity), by what torch.cuda.get_device_name contains; the first match wins.
PEAK_BF16 = [
    (("H200",), 989e12, "H200"),
    (("H100", "PCIe"), 756e12, "H100 PCIe"),
    (("H100", "SXM"), 989e12, "H100 SXM"),
    (("H100", "HBM3"), 989e12, "H100 SXM"),  # the SXM part reports itself as "H100 80GB HBM3"
    (("A100",), 312e12, "A100"),
    (("L40S",), 362e12, "L40S"),
]


@dataclass(frozen=True)
class Plan:
    """What the check runs; ``--smoke`` shrinks it (:func:`plan_from_args`)."""

    device: str = "cuda"
    backbone: str = "resnet152"
    crop_size: int = 224
    batch_size: int = 64  # the paper config's batch per process
    steps: int = 30
    warmup: int = 5
    compile: bool = True
    compile_backend: str = "inductor"
    max_batch: int = 1024
    scenes: int = 64  # SynthAU scenes: MTCNN on the device, the loader's cache
    cpu_scenes: int = 4  # MTCNN on the CPU: a few only
    predict_scenes: int = 64
    video: VideoSettings = VideoSettings(clips=1, people=(3, 3), seconds=12.0, fps=10.0)
    detect_max_side: int = 640  # the paper config's
    repeats: int = 3
    ddp_processes: int = 0  # 0: one per visible GPU
    ddp_steps: int = 10
    loader_epochs: int = 5
    smoke: bool = False


SMOKE = dict(device="cpu", backbone="resnet18", crop_size=64, batch_size=4, steps=2, warmup=1,
             compile_backend="eager", max_batch=8, scenes=3, cpu_scenes=2, predict_scenes=2,
             detect_max_side=320, repeats=1,
             video=VideoSettings(clips=1, people=(2, 2), seconds=3.0, fps=8.0, width=320, height=240), ddp_processes=2, ddp_steps=2, loader_epochs=2, smoke=True)


def paper_model_args(backbone: str) -> dict:
    """AUDetector's arguments from the paper config, random branches (no pretraining checkpoints)."""
    model = yaml.safe_load(PAPER_CONFIG.read_text())["model"]
    drop = {"face_weights", "emotion_weights", "optimizer", "scheduler"}
    return {**{k: v for k, v in model.items() if k not in drop}, "backbone": backbone,
            "face_weights": None, "emotion_weights": None}


# -- timing helpers -------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's autotuner on (training: fixed shapes, the fastest kernels; ``trainer.benchmark: true``
    in a config) or off (MTCNN's candidate batches change size at every call: it would time
    every convolution again for each; the prediction and alignment commands leave it off)."""
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- training -------------------------------------------------------------------------------------

class TrainLoss(nn.Module):
    """The loss of one batch exactly as AUDetector.model_step computes it, as a module (so that DDP
    can wrap it: DDP must see the forward that produces the loss)."""

    def __init__(self, detector: AUDetector):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.detector.model_step({"image": image, "labels": labels, "mask": mask})[0]


def build_training(plan: Plan, device: torch.device, compiled: bool = False):
    """The paper's AUDetector on ``device`` (channels-last), its AdamW (the project's parameter
    groups) and the loss module; ``compiled``: each branch under torch.compile."""
    detector = AUDetector(**paper_model_args(plan.backbone))
    detector.to(device=device, memory_format=torch.channels_last).train()
    if compiled:
        for name in list(detector.net.branches):  # the backbones are the cost; heads and loss stay eager
            detector.net.branches[name] = torch.compile(detector.net.branches[name], backend=plan.compile_backend)
    detector.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    return detector, detector.configure_optimizers(), TrainLoss(detector)


def synthetic_batch(n: int, crop: int, k: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Normalised-looking images (channels-last), 0/1 labels, a mask with some entries unlabelled;
    drawn on the device (a batch of 1024 crops is 600 MB: slow to draw on the CPU and copy)."""
    g = torch.Generator(device).manual_seed(seed)
    image = torch.randn(n, crop, crop, 3, generator=g, device=device).permute(0, 3, 1, 2)  # NHWC memory
    labels = (torch.rand(n, k, generator=g, device=device) < 0.3).float()
    mask = torch.rand(n, k, generator=g, device=device) < 0.9
    return image, labels, mask


def train_step(loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batch, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_fn(*batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_times(step: Callable[[], None], device: torch.device, warmup: int,
               steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each warm-up step and of each timed step."""
    times = [timed(step, device) for _ in range(warmup + steps)]
    return times[:warmup], times[warmup:]


def count_flops(loss_fn: nn.Module, batch, device: torch.device) -> tuple[float, float]:
    """Model FLOPs per image of the forward and of forward + backward (convolutions and matmuls,
    what FlopCounterMode counts; the optimizer's elementwise work is not model FLOPs)."""
    n = len(batch[0])
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(*batch)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    backward = counter.get_total_flops()
    loss_fn.zero_grad(set_to_none=True)
    return forward / n, (forward + backward) / n


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """The device's peak dense bf16 FLOP/s and where the figure comes from."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak_tflops {override_tflops:g}"
    if device.type != "cuda":
        return None, "no peak for CPUs: MFU needs CUDA"
    name = torch.cuda.get_device_name(device)
    for keys, flops, label in PEAK_BF16:
        if all(k in name for k in keys):
            return flops, f"{label} table: {flops / 1e12:g} TFLOP/s"
    return None, f"{name!r} is not in the table: pass --peak_tflops"


def measure_training(plan: Plan, device: torch.device, compiled: bool) -> tuple[dict, tuple]:
    """Images/s, FLOPs per image and peak memory of the training step (``compiled``: plus compile
    time), and the model, optimizer and loss it ran (the largest-batch search goes on with them)."""
    torch.manual_seed(0)
    detector, optimizer, loss_fn = build_training(plan, device, compiled)
    batch = synthetic_batch(plan.batch_size, plan.crop_size, len(detector.aus), device)
    result: dict = {"batch_size": plan.batch_size, "steps": plan.steps}
    if not compiled:  # counted once, on the eager module (the compiled one computes the same)
        result["flops_per_image_forward"], result["flops_per_image"] = count_flops(loss_fn, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm, steady = step_times(lambda: train_step(loss_fn, optimizer, batch, device), device, plan.warmup, plan.steps)
    step = statistics.median(steady)
    result.update(step_ms=1e3 * step, images_per_s=plan.batch_size / step,
                  peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    if compiled:
        result.update(compile_backend=plan.compile_backend, compile_s=sum(warm) - len(warm) * step)
    return result, (detector, optimizer, loss_fn)


def add_rates(result: dict, flops_per_image: float, peak: float | None) -> None:
    result["achieved_flops"] = flops_per_image * result["images_per_s"]
    result["mfu"] = result["achieved_flops"] / peak if peak else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def largest_batch(plan: Plan, device: torch.device, detector, optimizer, loss_fn) -> dict:
    """The largest batch one training step fits in: doubling from the plan's batch (timed just
    before, so known to fit), then bisection down to a step of cap/128; each try is one full step
    (optimizer state already allocated)."""
    k, tries = len(detector.aus), []

    def fits(n: int) -> bool:
        ok = True
        try:
            train_step(loss_fn, optimizer, synthetic_batch(n, plan.crop_size, k, device), device)
            synchronize(device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            ok = False  # cleaned up outside the handler: the traceback holds the step's tensors
        if not ok:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tries.append((n, ok))
        return ok

    # cuDNN's autotuner would time every convolution again at each new size: off for the search.
    with cudnn_benchmark(False):
        lo, hi = min(plan.batch_size, plan.max_batch), None
        while hi is None and lo < plan.max_batch:
            n = min(2 * lo, plan.max_batch)
            lo, hi = (n, None) if fits(n) else (lo, n)
        resolution = max(1, plan.max_batch // 128)
        while hi is not None and hi - lo > resolution:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"batch": lo, "first_failing": hi, "cap": plan.max_batch, "capped": hi is None, "tries": tries}


def failure(e: BaseException) -> dict:
    """A check that failed: its traceback printed, its row says why, the other checks go on."""
    traceback.print_exc()
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def release() -> None:
    """Give a finished check's tensors back to the device (their last references are gone)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@cudnn_benchmark(True)
def training_checks(plan: Plan, device: torch.device, peak: float | None) -> dict:
    eager, objects = measure_training(plan, device, compiled=False)
    add_rates(eager, eager["flops_per_image"], peak)
    search = largest_batch(plan, device, *objects)
    del objects
    release()
    out = {"eager": eager, "largest_batch": search, "compiled": {"skipped": "--no_compile"}}
    if plan.compile:
        try:
            out["compiled"], objects = measure_training(plan, device, compiled=True)
            add_rates(out["compiled"], eager["flops_per_image"], peak)
            del objects
        except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the other rows
            out["compiled"] = failure(e)
        release()
    return out


# -- DDP --------------------------------------------------------------------------------------------

def ddp_worker(rank: int, world: int, plan: Plan, port: int, out: str) -> None:
    """One DDP process: the same training step, ``plan.ddp_steps`` timed; rank 0 writes the result."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = plan.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True  # as in training_checks
    else:  # CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        detector, optimizer, loss_fn = build_training(plan, device)
        model = DistributedDataParallel(loss_fn, device_ids=[rank] if cuda else None)
        batch = synthetic_batch(plan.batch_size, plan.crop_size, len(detector.aus), device, seed=rank)
        _, steady = step_times(lambda: train_step(model, optimizer, batch, device), device,
                               max(1, plan.warmup // 2), plan.ddp_steps)
        # Gradients are averaged every step, so the slowest process sets the pace.
        step = torch.tensor([statistics.median(steady)], dtype=torch.float64, device=device)
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        if rank == 0:
            total = world * plan.batch_size / step.item()
            Path(out).write_text(json.dumps({
                "processes": world, "backend": dist.get_backend(), "batch_per_process": plan.batch_size,
                "steps": plan.ddp_steps, "step_ms": 1e3 * step.item(), "images_per_s": total,
                "images_per_s_per_process": total / world}))
    finally:
        dist.destroy_process_group()


def ddp_check(plan: Plan, device: torch.device, tmp: Path) -> dict:
    world = plan.ddp_processes or (torch.cuda.device_count() if device.type == "cuda" else 0)
    if world < 2:
        return {"skipped": f"{world} {device.type} device visible: DDP needs 2 or more"}
    import torch.multiprocessing as mp

    out = tmp / "ddp.json"
    # CUDA: spawn (a forked child cannot use CUDA once the parent has). CPU: fork, so the processes
    # need not import torch and Lightning again (seconds each); this process ran single-threaded.
    start_method = "spawn" if device.type == "cuda" else "fork"
    mp.start_processes(ddp_worker, args=(world, plan, free_port(), str(out)), nprocs=world, join=True,
                       start_method=start_method)
    return json.loads(out.read_text())


# -- data: scenes, MTCNN, predict, loader -----------------------------------------------------------

def make_scenes(plan: Plan, tmp: Path) -> Path:
    root = tmp / "synthau"
    n = max(plan.scenes, plan.predict_scenes, plan.cpu_scenes)
    workers = 1 if n < 16 else min(8, os.cpu_count() or 1)  # a process pool costs more than a few scenes
    generate_synthau(root, SynthAUSettings(num_images=n, seed=11, val_fraction=0, test_fraction=0), workers=workers)
    return root


def scene_paths(root: Path) -> list[Path]:
    return sorted((root / "images").rglob("*.jpg"))


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def alignment(plan: Plan) -> AlignmentSettings:
    return AlignmentSettings(crop_size=plan.crop_size, detect_max_side=plan.detect_max_side)


def detection_rate(detector: FaceDetector, images: list[np.ndarray], device: torch.device, repeats: int,
                   warm: bool) -> dict:
    """Scenes/s of FaceDetector.detect on decoded scenes (median of ``repeats``) and faces found."""
    if warm:  # kernels loaded, cuDNN's choices made
        detector.detect(images[:detector.settings.batch_size])
    found: list = []
    times = [timed(lambda: found.append(detector.detect(images)), device) for _ in range(repeats)]
    return {"device": str(detector.device), "scenes": len(images), "faces": sum(len(d) for d in found[-1]),
            "scenes_per_s": len(images) / statistics.median(times), "threads": torch.get_num_threads()}


def mtcnn_check(plan: Plan, device: torch.device, paths: list[Path], settings: AlignmentSettings) -> dict:
    images = [read_rgb(p) for p in paths[:plan.scenes]]
    on_device = detection_rate(FaceDetector(settings, device), images, device, plan.repeats, warm=True)
    on_cpu = detection_rate(FaceDetector(settings, "cpu"), images[:plan.cpu_scenes], torch.device("cpu"), 1,
                            warm=False)
    return {"device": on_device, "cpu": on_cpu, "speedup": on_device["scenes_per_s"] / on_cpu["scenes_per_s"]}


def random_predictor(plan: Plan, device: torch.device, settings: AlignmentSettings) -> AUPredictor:
    """The paper's model (its config's branches and heads) with random weights, as a predictor."""
    torch.manual_seed(0)
    model = paper_model_args(plan.backbone)
    net = AUNet(EMOTIONET_AUS, plan.backbone, model["branches"], aux_heads=model["aux_heads"])
    spec = {"aus": list(net.aus), "backbone": plan.backbone, "branches": list(model["branches"]),
            "aux_heads": model["aux_heads"]}
    return AUPredictor(net, settings, spec, device=str(device))


def predict_check(plan: Plan, device: torch.device, paths: list[Path], settings: AlignmentSettings,
                  tmp: Path) -> dict:
    """au-detect predict's run() on scene files, with a randomly initialised predictor."""
    predictor = random_predictor(plan, device, settings)
    inputs = [str(p) for p in paths[:plan.predict_scenes]]
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        predictor.precision = precision
        predict_run(predictor, inputs[:1], str(tmp / "warm.csv"), progress=False)  # warm-up
        summaries = [predict_run(predictor, inputs, str(tmp / "predict.csv"), progress=False)
                     for _ in range(plan.repeats)]
        out[precision] = {"images": len(inputs), "faces": summaries[-1].faces,
                          "images_per_s": statistics.median(s.frames_per_second for s in summaries)}
    return out


def video_check(plan: Plan, device: torch.device, settings: AlignmentSettings, tmp: Path) -> dict:
    """predict's run() on a SynthAU clip, whole-frame detection on every frame vs the prior."""
    render_videos(tmp / "clips", plan.video, workers=1)
    video = str(tmp / "clips" / clip_names(0)[0])
    predictor = random_predictor(plan, device, settings)
    out = {}
    predict_run(predictor, [video], str(tmp / "warm.csv"), progress=False)  # warm-up
    runs: dict[int, list] = {1: [], 10: []}
    for _ in range(plan.repeats):  # alternated: a drift in the machine's speed hits both
        for every in runs:
            predictor.detector.every = every
            runs[every].append(predict_run(predictor, [video], str(tmp / "video.csv"), progress=False))
    for every, summaries in runs.items():
        out[f"every_{every}"] = {"frames": summaries[-1].frames, "faces": summaries[-1].faces,
                                 "frames_per_s": statistics.median(s.frames_per_second for s in summaries)}
    out["speedup"] = out["every_10"]["frames_per_s"] / out["every_1"]["frames_per_s"]
    out["faces_change"] = (out["every_10"]["faces"] - out["every_1"]["faces"]) / max(out["every_1"]["faces"], 1)
    return out


def loader_check(plan: Plan, root: Path, detector: FaceDetector, settings: AlignmentSettings, tmp: Path) -> dict:
    """Crops/s of the training loader on one core: the dataset read and augmented in this process."""
    from torch.utils.data import DataLoader

    cache = align_manifest(read_manifest(root / "train.tsv"), tmp / "cache", settings, name="train", detector=detector)
    split = AlignedSplit.open(cache)
    loader = DataLoader(AlignedFaceDataset(split, AUAugmentation(EMOTIONET_AUS)),
                        batch_size=min(plan.batch_size, len(split)), shuffle=True, num_workers=0)
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # one core: what a loader worker process gets
    cv2.setNumThreads(1)
    try:
        next(iter(loader))
        rates = []
        for _ in range(plan.loader_epochs):
            start = time.perf_counter()
            n = sum(len(b["index"]) for b in loader)
            rates.append(n / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    return {"crops": len(split), "crop_size": plan.crop_size, "crops_per_s_per_core": statistics.median(rates)}


# -- report ---------------------------------------------------------------------------------------

def fmt(value, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None else f"{value / scale:{spec}}{unit}"


def si(value: float | None, unit: str) -> str:
    """``3.21e14, "FLOP/s"`` -> ``321.0 TFLOP/s``."""
    if value is None:
        return "n/a"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


Row = tuple[str, str, str, str]  # check, figure, value, note


def unavailable(name: str, r: dict) -> list[Row]:
    """The row of a check that was skipped or failed (none when it ran)."""
    if "skipped" in r:
        return [(name, "-", "skipped", r["skipped"])]
    return [(name, "-", "**failed**", r["error"])] if "error" in r else []


def training_rows(name: str, r: dict, flops: float, peak_source: str) -> list[Row]:
    rows = [(name, "images/s", fmt(r["images_per_s"]), f"median of {r['steps']} steps, batch {r['batch_size']}, "
             f"step {r['step_ms']:.1f} ms")]
    if "compile_s" in r:
        rows.append((name, "compile time", fmt(r["compile_s"], unit=" s"), f"backend {r['compile_backend']}, "
                     "warm-up beyond steady steps"))
    return rows + [
        (name, "achieved", si(r["achieved_flops"], "FLOP/s"), f"{si(flops, 'FLOP')} per image"),
        (name, "MFU", fmt(r["mfu"], ".1%"), peak_source),
        (name, "peak memory", fmt(r["peak_memory_bytes"], ".2f", 2**30, " GiB"),
         "torch.cuda.max_memory_allocated" if r["peak_memory_bytes"] is not None else "needs CUDA")]


def train_rows(t: dict, model: str, peak_source: str) -> list[Row]:
    eager, lb, flops = t["eager"], t["largest_batch"], t["eager"]["flops_per_image"]
    return [("train", "model FLOPs per image", si(flops, "FLOP"),
             f"forward + backward ({si(eager['flops_per_image_forward'], 'FLOP')} forward), {model}, FlopCounterMode"),
            *training_rows("train eager", eager, flops, peak_source),
            ("train eager", "largest batch", str(lb["batch"]),
             f"search capped at {lb['cap']}" if lb["capped"] else f"{lb['first_failing']} does not fit"),
            *(unavailable("train compiled", t["compiled"])
              or training_rows("train compiled", t["compiled"], flops, peak_source))]


def mtcnn_rows(m: dict, detect_max_side: int) -> list[Row]:
    return unavailable("MTCNN", m) or [
        ("MTCNN", f"scenes/s, device {m['device']['device']}", fmt(m["device"]["scenes_per_s"]),
         f"{m['device']['scenes']} scenes, {m['device']['faces']} faces, detect_max_side {detect_max_side}"),
        ("MTCNN", "scenes/s, CPU reference", fmt(m["cpu"]["scenes_per_s"]),
         f"{m['cpu']['scenes']} scenes, {m['cpu']['threads']} threads; device / CPU {m['speedup']:.1f}x")]


def predict_rows(p: dict, model: str) -> list[Row]:
    return unavailable("predict", p) or [
        ("predict", f"images/s {precision}", fmt(r["images_per_s"]),
         f"{r['images']} scenes, {r['faces']} faces, {model}") for precision, r in p.items()]


def video_rows(v: dict, model: str) -> list[Row]:
    return unavailable("video", v) or [
        ("video", "frames/s, whole-frame detection every frame", fmt(v["every_1"]["frames_per_s"]),
         f"{v['every_1']['frames']} frames, {v['every_1']['faces']} faces, {model}"),
        ("video", "frames/s, detection prior (--detect_every 10)", fmt(v["every_10"]["frames_per_s"]),
         f"{v['speedup']:.2f}x; faces {v['every_10']['faces']} ({v['faces_change']:+.2%})")]


def ddp_rows(d: dict) -> list[Row]:
    return unavailable("DDP", d) or [
        ("DDP", f"images/s, {d['processes']} processes", fmt(d["images_per_s"]),
         f"{d['backend']}, batch {d['batch_per_process']} each, {d['steps']} steps"),
        ("DDP", "images/s per process", fmt(d["images_per_s_per_process"]), "")]


def loader_rows(lo: dict) -> list[Row]:
    return unavailable("loader", lo) or [
        ("loader", "crops/s per CPU core", fmt(lo["crops_per_s_per_core"]),
         f"{lo['crops']} crops at {lo['crop_size']} px, paper augmentation"),
        ("loader", "CPU cores to feed one GPU", fmt(lo["cores_per_gpu"], ".2f"),
         f"{lo['training_images_per_s']:.1f} training images/s / crops/s per core")]


def markdown(report: dict) -> str:
    dev, s = report["device"], report["settings"]
    model = f"{s['backbone']} x2 at {s['crop_size']} px"
    rows = [*train_rows(report["train"], model, dev["peak_source"]),
            *mtcnn_rows(report["mtcnn"], s["detect_max_side"]), *predict_rows(report["predict"], model),
            *video_rows(report["video"], model),
            *ddp_rows(report["ddp"]), *loader_rows(report["loader"])]
    title = (f"GPU check on {dev['name']} ({dev['type']}, {dev['count']} visible), torch {torch.__version__}"
             f"{', SMOKE (CPU, tiny model)' if report['smoke'] else ''}; {report['seconds']:.0f} s")
    return "\n".join([title, "", "| check | figure | value | note |", "|---|---|---|---|",
                      *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)])


# -- main -----------------------------------------------------------------------------------------

def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = Plan(**SMOKE) if args.smoke else Plan(device="cuda" if torch.cuda.is_available() else "cpu")
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "crop_size", "backbone", "compile_backend")
             if getattr(args, k)}
    plan = replace(plan, **given)
    if args.no_compile:
        plan = replace(plan, compile=False)
    return plan


def check(plan: Plan, peak_tflops: float | None = None) -> dict:
    started = time.perf_counter()
    device = torch.device(plan.device)
    if device.type == "cpu":  # on a shared CPU, threads waiting on preempted peers make a step 10x slower
        torch.set_num_threads(1)
    peak, peak_source = peak_flops(device, peak_tflops)
    report = {"smoke": plan.smoke, "settings": asdict(plan), "device": {
        "type": device.type, "count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_flops": peak, "peak_source": peak_source}, "seconds_by_check": {}}

    def section(name: str, fn: Callable[[], object], may_fail: bool = True):
        """Run one check, timed; one that ``may_fail`` reports its error in its row instead."""
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - DDP, detection or prediction failing leaves the other rows
            if not may_fail:
                raise
            value = failure(e)
        report["seconds_by_check"][name] = round(time.perf_counter() - start, 2)
        release()
        return value

    report["train"] = section("train", lambda: training_checks(plan, device, peak), may_fail=False)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        report["ddp"] = section("ddp", lambda: ddp_check(plan, device, tmp))
        root = section("scenes", lambda: make_scenes(plan, tmp), may_fail=False)
        paths, settings = scene_paths(root), alignment(plan)
        report["mtcnn"] = section("mtcnn", lambda: mtcnn_check(plan, device, paths, settings))
        report["predict"] = section("predict", lambda: predict_check(plan, device, paths, settings, tmp))
        report["video"] = section("video", lambda: video_check(plan, device, settings, tmp))
        loader = section("loader", lambda: loader_check(plan, root, FaceDetector(settings, device), settings, tmp))
    best = max(r["images_per_s"] for r in report["train"].values() if "images_per_s" in r)
    if "error" not in loader:
        loader.update(training_images_per_s=best, cores_per_gpu=best / loader["crops_per_s_per_core"])
    report["loader"] = loader
    report["errors"] = {k: v["error"] for k, v in [*report["train"].items(), *report.items()]
                        if isinstance(v, dict) and "error" in v}
    report["seconds"] = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny, in seconds")
    parser.add_argument("--steps", type=int, help="timed training steps (after warm-up)")
    parser.add_argument("--batch_size", type=int, help="training batch (default: the paper's 64; smoke 4)")
    parser.add_argument("--crop_size", type=int, help="crop side in pixels (default 224; smoke 64)")
    parser.add_argument("--backbone", help="timm ResNet of both branches (default resnet152; smoke resnet18)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--compile_backend", help="torch.compile backend (default inductor; smoke eager)")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, for MFU")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    args = parser.parse_args(argv)
    plan = plan_from_args(args)
    if plan.device == "cpu" and not plan.smoke:
        parser.error("no CUDA device: the full check is for a GPU; run --smoke for the CPU version")
    report = check(plan, args.peak_tflops)
    table = markdown(report)
    print(table)
    Path(args.out).write_text(json.dumps({**report, "table": table}, indent=1))
    print(f"\nwritten to {args.out}")
    if report["errors"]:
        sys.exit(f"failed checks: {report['errors']}")


if __name__ == "__main__":
    main()
