"""The exported network in int8: onnxruntime's static quantization, calibrated on real faces.

``au-detect export --int8 --calibration <images>`` exports the float32 graph as usual, then
quantizes it: convolution and matrix weights to int8 per output channel, activations to uint8
with ranges observed on aligned faces of the calibration images (min-max over every crop;
QDQ format, so the same file runs on any onnxruntime provider). What stays float: the
normalisation at the input, the sigmoid, the thresholds and the intensity rule, so decisions
are still ``probability >= threshold`` on the fitted thresholds. The folder is an ordinary
export folder (``au_net.onnx``, ``predictor.json`` with a ``quantized`` section), run by
``--backend onnxruntime``.

Calibrate on the validation split, faces the fit did not train on: the ranges are those the
network meets, and the fitted thresholds keep their meaning only as far as the probabilities
do. ``benchmarks/onnx_int8.py`` reports the speed and the test F1 against float32.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from datamodules.io.files import sync, write_text
from datamodules.io.sources import batches, expand, frames
from lightning_modules.serving.onnx_model import ONNX_FILE, OnnxAUPredictor
from lightning_modules.serving.predictor import CONFIG_FILE, AUPredictor


log = logging.getLogger(__name__)
CALIBRATION_CROPS = 256  # crops whose activation ranges set the scales (more adds time, not accuracy)


def calibration_crops(predictor: AUPredictor, inputs: Sequence[str], limit: int = CALIBRATION_CROPS) -> np.ndarray:
    """Aligned faces (N, S, S, 3) uint8 of the images and videos ``inputs`` name (folders, globs,
    manifests, as ``au-detect predict`` takes them), every face of each, at most ``limit``."""
    crops: list[np.ndarray] = []
    found = 0
    decoded = frames(expand(list(inputs)), prepare=predictor.detection_copy)
    for batch in batches(decoded, predictor.alignment.batch_size):
        for frame in batch:
            if frame.pixels is None:
                log.warning("calibration: %s", frame.error)
        faces = [f for f in batch if f.pixels is not None]
        crops.append(predictor.face_crops([f.pixels for f in faces], [f.copy for f in faces])[1])
        found += len(crops[-1])
        if found >= limit:
            break
    if not found:
        raise ValueError(f"--calibration {list(inputs)}: no face found to calibrate int8 on")
    return np.concatenate(crops)[:limit]


class _Crops:
    """onnxruntime's CalibrationDataReader over crops, a batch at a time."""

    def __init__(self, crops: np.ndarray, name: str, batch: int = 32):
        self._batches: Iterator[dict] = iter([{name: crops[i:i + batch]} for i in range(0, len(crops), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_export(folder: str | Path, crops: np.ndarray, out: str | Path) -> Path:
    """The float32 export in ``folder`` quantized to int8 into ``out`` (see the module's
    docstring), calibrated on ``crops``; ``out`` may be ``folder``. Written whole: the graph beside
    its final name and renamed, ``predictor.json`` last."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / CONFIG_FILE).read_text())
    with tempfile.TemporaryDirectory(dir=out, prefix=".int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / ONNX_FILE
        quant_pre_process(str(folder / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _Crops(crops, config["onnx"]["input"]["name"]),
                        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        sync(quantized)
        if out != folder:
            for extra in folder.iterdir():  # the model card and anything else the export holds
                if extra.is_file() and extra.name not in (ONNX_FILE, CONFIG_FILE):
                    shutil.copy2(extra, out / extra.name)
        (out / CONFIG_FILE).unlink(missing_ok=True)  # no config describes a graph it does not match
        quantized.replace(out / ONNX_FILE)
    config["quantized"] = {"weights": "int8 per output channel", "activations": "uint8",
                           "format": "QDQ", "calibration": "min-max", "calibration_crops": len(crops),
                           "what stays float": "input normalisation, sigmoid, thresholds, intensity rule"}
    write_text(out / CONFIG_FILE, json.dumps(config, indent=1))
    return out


def agreement(reference: OnnxAUPredictor | AUPredictor, other: OnnxAUPredictor, crops: np.ndarray) -> dict:
    """How far ``other``'s answers are from ``reference``'s on the same crops: largest and mean
    probability difference, and the share of equal decisions."""
    (p_ref, d_ref), (p_other, d_other) = reference.classify(crops), other.classify(crops)
    diff = np.abs(p_ref - p_other)
    return {"max_abs_prob": float(diff.max(initial=0.0)), "mean_abs_prob": float(diff.mean()) if diff.size else 0.0,
            "decisions_equal": float((d_ref == d_other).mean()) if d_ref.size else 1.0}
