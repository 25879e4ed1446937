"""The exported network in int8 against float32: speed and test F1 on SynthAU.

A trained model is exported (float32, ``au-detect export``) and quantized to int8 calibrated on
the validation split's faces (``--int8 --calibration <val manifest>``); the test split is aligned
as training aligns it (one face an image, the model's alignment), and its crops go through
PyTorch (the predictor's inference copy), onnxruntime float32 and onnxruntime int8, alternated
over repeats in one process: crops/s (median) and the mean test F1 over AUs with positives at
the model's fitted thresholds, masked as the fit's metrics are, with each backend's change
against PyTorch.

    python benchmarks/onnx_int8.py --model runs/demo/.../best.ckpt [--data data/synthau] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import alternate, print_table  # noqa: E402


def masked_f1(decisions: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    """Mean over AUs with a labelled positive of 2TP / (2TP + FP + FN), unlabelled cells left out."""
    d, y, m = decisions.astype(bool), labels.astype(bool), mask.astype(bool)
    tp, fp, fn = ((d & y & m).sum(0), (d & ~y & m).sum(0), (~d & y & m).sum(0))
    has = (y & m).sum(0) > 0
    return float(np.mean(2 * tp[has] / np.maximum(2 * tp[has] + fp[has] + fn[has], 1)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint, MLflow model or predictor folder")
    parser.add_argument("--data", default="data/synthau", help="a SynthAU folder (val.tsv, test.tsv)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
    from datamodules.io.manifest import read_manifest
    from experiments.export import export
    from lightning_modules.serving.onnx_model import OnnxAUPredictor
    from lightning_modules.serving.predictor import AUPredictor

    predictor = AUPredictor.load(args.model, "cpu")
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        tmp = Path(tmp)
        test = AlignedSplit.open(align_manifest(read_manifest(data / "test.tsv", predictor.aus), tmp / "cache",
                                                predictor.alignment, name="test"))
        crops = np.ascontiguousarray(test.crops)
        float32 = OnnxAUPredictor.from_dir(export(args.model, str(tmp / "float32")), "cpu")
        start = time.perf_counter()
        int8 = OnnxAUPredictor.from_dir(export(args.model, str(tmp / "int8"), int8=True,
                                               calibration=[str(data / "val.tsv")]), "cpu")
        quantize_s = time.perf_counter() - start
        backends = {"PyTorch float32, the predictor's inference copy (baseline)": predictor,
                    "onnxruntime float32 (au-detect export)": float32,
                    "onnxruntime int8 (au-detect export --int8, calibrated on val)": int8}
        f1 = {name: masked_f1(b.classify(crops)[1], test.labels, test.mask) for name, b in backends.items()}

        def timed(b):
            def go():
                t = time.perf_counter()
                b.classify(crops)
                return len(crops) / (time.perf_counter() - t), f1[name_of[id(b)]]
            return go

        name_of = {id(b): name for name, b in backends.items()}
        results = alternate({name: timed(b) for name, b in backends.items()}, args.repeats)
    print(f"\n{len(crops)} test crops of {predictor.alignment.crop_size} px, {args.repeats} repeats; "
          f"export + int8 calibration {quantize_s:.0f} s\n")
    print_table(results, "crops/s", "test F1", ".4f")
    base = f1[next(iter(f1))]
    for name, value in f1.items():
        print(f"{name}: test F1 {value:.4f} ({value - base:+.4f} against PyTorch)")
    return {"f1": f1, "results": results}


if __name__ == "__main__":
    main()
