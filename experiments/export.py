"""``au-detect export``: the trained AU network for runtimes other than PyTorch.

    au-detect export --model runs/.../checkpoints/best.ckpt --out export/
    au-detect export --model runs/.../checkpoints/best.ckpt --out export_int8/ --int8 --calibration data/synthau/val.tsv
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
# an int8 export deciding otherwise than float32 on more than this share of the calibration faces'
# AU decisions is refused: its scales do not fit the network
INT8_DISAGREEMENT = 0.1


def export(model: str, out: str, format: Literal["onnx"] = "onnx", opset: int = OPSET,
           mlflow: str = "mlflow.yaml", int8: bool = False, calibration: list[str] | None = None) -> Path:
    """Export the trained AU network (both branches, head, fitted thresholds) as ONNX, and check it.

    Args:
        model: a checkpoint of ``au-detect fit``, a predictor folder, or an MLflow model URI
            (``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) read
            from ``--mlflow``'s server.
        out: the folder to write: ``au_net.onnx`` and ``predictor.json`` (how to feed it).
        format: ``onnx``.
        opset: the ONNX opset written.
        mlflow: MLflow settings file, for MLflow model URIs (MLFLOW_TRACKING_URI wins if set).
        int8: quantize the exported network to int8 (onnxruntime static quantization, weights per
            output channel; :mod:`lightning_modules.serving.quantize`), calibrated on
            ``--calibration``.
        calibration: images, folders, globs or manifests whose aligned faces set the int8 scales
            (the validation split: faces the fit did not train on); up to 256 faces are used.
    """
    if int8 and not calibration:
        raise ValueError("--int8 needs --calibration: images, folders or a manifest of faces the model did not "
                         "train on (e.g. the validation split) to set the int8 scales")
    use_for_model_uri(model, mlflow)
    predictor = AUPredictor.load(model, "cpu")
    if int8:
        from lightning_modules.serving.quantize import agreement, calibration_crops, quantize_export

        # the faces first: calibration inputs without a face are refused before anything is written
        faces = calibration_crops(predictor, calibration)
    folder = export_onnx(predictor, out, opset)
    # The export checks itself: the file, run by onnxruntime, against the network it came from.
    size = predictor.alignment.crop_size
    crops = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    check = parity(predictor, OnnxAUPredictor.from_dir(folder, "cpu"), crops)
    gap = max(check["max_abs_prob"], check.get("max_abs_intensity", 0.0))
    if gap > TOLERANCE or check["decisions_equal"] < 1.0:
        raise RuntimeError(f"{folder / ONNX_FILE}: onnxruntime differs from PyTorch by {gap:.2e} "
                           f"(decisions equal: {check['decisions_equal']:.3f}); the export is not usable")
    if int8:
        quantize_export(folder, faces, folder)
        check = agreement(predictor, OnnxAUPredictor.from_dir(folder, "cpu"), faces)
        if 1 - check["decisions_equal"] > INT8_DISAGREEMENT:
            raise RuntimeError(f"{folder / ONNX_FILE}: the int8 network decides otherwise than float32 on "
                               f"{1 - check['decisions_equal']:.1%} of the calibration faces' AU decisions; "
                               "calibrate on more or other faces, or use the float32 export")
        print(f"Quantized {folder / ONNX_FILE} to int8 on {len(faces)} calibration faces: against PyTorch float32, "
              f"max |dp| {check['max_abs_prob']:.3f}, mean |dp| {check['mean_abs_prob']:.4f}, decisions equal "
              f"{check['decisions_equal']:.3f}")
        return folder
    answers = ", ".join(f"'{name}'" for name in outputs(predictor))
    intensity = f", max |d intensity| {check['max_abs_intensity']:.1e}" if predictor.has_intensity else ""
    print(f"Exported {model} -> {folder / ONNX_FILE} (opset {opset}; input 'crops' uint8 [batch, {size}, {size}, 3], "
          f"outputs {answers} for {len(predictor.aus)} AUs) and {folder / CONFIG_FILE}; "
          f"onnxruntime vs PyTorch on 8 crops: max |dp| {check['max_abs_prob']:.1e}{intensity}, decisions equal")
    return folder
