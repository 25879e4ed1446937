"""``au-detect export``: the trained AU network for runtimes other than PyTorch.

    au-detect export --model runs/.../checkpoints/best.ckpt --out export/
    au-detect predict --backend onnxruntime --model export/ --input photos/

What the folder holds and how to feed it without this project: :mod:`lightning_modules.serving.onnx_model`
and the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from experiments.tracking import use_for_model_uri
from lightning_modules.serving.onnx_model import (CONFIG_FILE, ONNX_FILE, OPSET, OnnxAUPredictor, export_onnx,
                                                  outputs, parity)
from lightning_modules.serving.predictor import AUPredictor

# an export whose probabilities differ more than this from PyTorch's on the check crops is refused
TOLERANCE = 1e-4


def export(model: str, out: str, format: Literal["onnx"] = "onnx", opset: int = OPSET,
           mlflow: str = "mlflow.yaml") -> Path:
    """Export the trained AU network (both branches, head, fitted thresholds) as ONNX, and check it.

    Args:
        model: a checkpoint of ``au-detect fit``, a predictor folder, or an MLflow model URI
            (``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) read
            from ``--mlflow``'s server.
        out: the folder to write: ``au_net.onnx`` and ``predictor.json`` (how to feed it).
        format: ``onnx``.
        opset: the ONNX opset written.
        mlflow: MLflow settings file, for MLflow model URIs (MLFLOW_TRACKING_URI wins if set).
    """
    use_for_model_uri(model, mlflow)
    predictor = AUPredictor.load(model, "cpu")
    folder = export_onnx(predictor, out, opset)
    # The export checks itself: the file, run by onnxruntime, against the network it came from.
    size = predictor.alignment.crop_size
    crops = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    check = parity(predictor, OnnxAUPredictor.from_dir(folder, "cpu"), crops)
    gap = max(check["max_abs_prob"], check.get("max_abs_intensity", 0.0))
    if gap > TOLERANCE or check["decisions_equal"] < 1.0:
        raise RuntimeError(f"{folder / ONNX_FILE}: onnxruntime differs from PyTorch by {gap:.2e} "
                           f"(decisions equal: {check['decisions_equal']:.3f}); the export is not usable")
    answers = ", ".join(f"'{name}'" for name in outputs(predictor))
    intensity = f", max |d intensity| {check['max_abs_intensity']:.1e}" if predictor.has_intensity else ""
    print(f"Exported {model} -> {folder / ONNX_FILE} (opset {opset}; input 'crops' uint8 [batch, {size}, {size}, 3], "
          f"outputs {answers} for {len(predictor.aus)} AUs) and {folder / CONFIG_FILE}; "
          f"onnxruntime vs PyTorch on 8 crops: max |dp| {check['max_abs_prob']:.1e}{intensity}, decisions equal")
    return folder
