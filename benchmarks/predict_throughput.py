"""Prediction throughput: ``au-detect predict`` on a folder against the naive path, end to end.

Naive path, as a user of facenet-pytorch would write it: per image, decode, ``MTCNN.detect`` on
the full-size image (landmarks on), then for each face the same similarity alignment and the
trained network as it is (NCHW, eval mode) on a batch of one. A second naive row sends each face
through the predictor's inference copy (batch norms folded, channels-last) instead, to show that
the gain is batching and detection rather than the network's form. Ours:
:func:`experiments.predict.run` on the folder (decode in threads, MTCNN on downscaled copies
batched across images, every face of a batch through the inference copy together, CSV written).
Both use the same network (the demo's: two ResNet-18 branches at 96 px; random weights, which do
not change the cost) on the same SynthAU scenes (some with two people), alternating in one
process; the table gives medians over repeats and the ratio, and how many faces each path found.
A row runs ours with the network in bfloat16 under autocast (``--precision bf16-mixed``): a
large gain only on CPUs with AMX or AVX512-BF16; the last runs the network exported to ONNX in
onnxruntime (``--backend onnxruntime``; skipped without the ``onnx`` extra). A second table
times the network alone on aligned crops (the same faces), PyTorch's inference copy against
onnxruntime, where the backends differ most.

    python benchmarks/predict_throughput.py [--scenes 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import alternate, print_table  # noqa: E402
from datamodules.alignment.align import AlignmentSettings, warp_face  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402
from experiments.predict import run  # noqa: E402
from lightning_modules.serving.predictor import AUPredictor  # noqa: E402
from lightning_modules.au_detector import AUNet  # noqa: E402

SPEC = {"aus": None, "backbone": "resnet18", "branches": ["face", "emotion"], "aux_heads": False}


def naive(paths: list[Path], predictor: AUPredictor, tuned: bool = False) -> tuple[float, int]:
    """Per image ``MTCNN.detect``, then each face alone through the trained network as it is
    (NCHW, eval mode); ``tuned``: through the predictor's inference copy instead."""
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, device="cpu")
    faces = 0
    start = time.perf_counter()
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        boxes, _, landmarks = mtcnn.detect(image, landmarks=True)
        for lm in landmarks if boxes is not None else []:
            crop = warp_face(image, lm, predictor.alignment)
            if tuned:
                predictor.classify(crop[None])
            else:
                with torch.inference_mode():
                    predictor.net.predict(predictor.normalize(torch.from_numpy(crop).permute(2, 0, 1)[None]))
            faces += 1
    return len(paths) / (time.perf_counter() - start), faces


def ours(folder: Path, predictor: AUPredictor, out: Path, precision: str = "32-true") -> tuple[float, int]:
    predictor.precision = precision
    start = time.perf_counter()
    summary = run(predictor, [str(folder)], str(out), progress=False)
    return summary.frames / (time.perf_counter() - start), summary.faces


def exported(predictor: AUPredictor, folder: Path):
    """The predictor exported to ONNX and loaded in onnxruntime; None without the onnx extra."""
    try:
        from lightning_modules.serving.onnx_model import OnnxAUPredictor, export_onnx

        return OnnxAUPredictor.from_dir(export_onnx(predictor, folder), "cpu")
    except ImportError as e:
        print(f"(no onnxruntime row: {e})")
        return None


def aligned_crops(paths: list[Path], predictor: AUPredictor) -> np.ndarray:
    """The aligned faces of the scenes, as the predictor crops them."""
    return predictor.face_crops([np.asarray(Image.open(p).convert("RGB")) for p in paths])[1]


def classify(predictor: AUPredictor, crops: np.ndarray) -> tuple[float, int]:
    """The network alone, in float32 (the rows above leave the predictor at whatever precision
    ran last: the bf16 row's autocast would be timed instead, 7x slower on CPUs without AMX)."""
    predictor.precision = "32-true"
    start = time.perf_counter()
    predictor.classify(crops)
    return len(crops) / (time.perf_counter() - start), len(crops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = AUNet(backbone=SPEC["backbone"], branches=SPEC["branches"])
    spec = {**SPEC, "aus": list(net.aus)}
    predictor = AUPredictor(net, AlignmentSettings(crop_size=args.crop), spec, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthau"
        generate_synthau(root, SynthAUSettings(num_images=args.scenes, seed=321, val_fraction=0, test_fraction=0))
        folder = root / "images"
        paths = sorted(folder.rglob("*.jpg"))
        onnx_predictor = exported(predictor, Path(tmp) / "export")
        variants = {
            "naive: per image MTCNN.detect full size, one face per forward (baseline)":
                lambda: naive(paths, predictor),
            "  same, each face through the predictor's inference copy (folded, channels-last)":
                lambda: naive(paths, predictor, tuned=True),
            "au-detect predict (batched detection on copies, batched faces)":
                lambda: ours(folder, predictor, Path(tmp) / "out.csv"),
            "  same, --precision bf16-mixed (the network under autocast)":
                lambda: ours(folder, predictor, Path(tmp) / "out.csv", "bf16-mixed"),
        }
        if onnx_predictor is not None:
            variants["  same, --backend onnxruntime (the exported ONNX network)"] = \
                lambda: ours(folder, onnx_predictor, Path(tmp) / "out.csv")
        results = alternate(variants, args.repeats)
        crops = network = None
        if onnx_predictor is not None:
            crops = aligned_crops(paths, predictor)
            network = alternate({"PyTorch: the predictor's inference copy (baseline)": lambda: classify(predictor, crops),
                                 "onnxruntime: the exported file": lambda: classify(onnx_predictor, crops)},
                                args.repeats)
    print(f"\n{len(paths)} SynthAU scenes of 640x480, network 2 x resnet18 at {args.crop} px, {args.repeats} repeats, "
          f"{args.threads} torch threads, device cpu\n")
    print_table(results, "images/s", "faces found", "d")
    if crops is not None:
        print(f"\nthe network alone on {len(crops)} aligned crops of {args.crop} px, batches of 64\n")
        print_table(network, "crops/s", "crops", "d")

if __name__ == "__main__":
    main()
