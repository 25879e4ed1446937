"""The detector as an MLflow pyfunc model: images in, one row per face out.

``au-detect fit`` logs the best model as ``runs:/<run id>/model``. It holds the predictor
folder (weights, AU list, fitted thresholds, alignment and normalisation settings), this
project's code, pinned requirements and a signature: input a column ``image`` of encoded image
bytes (JPEG, PNG, ...), output the columns of ``au-detect predict``'s CSV, with ``source`` the
input row. Detection and alignment happen inside, so a client sends plain photos:

    mlflow models serve -m runs:/<run id>/model --env-manager local -p 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d "{\\"dataframe_records\\": [{\\"image\\": \\"$(base64 -w0 face.jpg)\\"}]}"

(MLflow reads base64 text as bytes for a ``binary`` column.)
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from datamodules.manifest import au_column_name
from datamodules.images import DEFAULT_MAX_PIXELS, InputError, read_image
from lightning_modules.predictor import LANDMARKS, columns, frame_records, status_record

PACKAGES = ("datamodules", "lightning_modules")  # what loading the model imports
REQUIREMENTS = ("torch", "torchvision", "timm", "facenet-pytorch", "lightning", "torchmetrics", "jsonargparse",
                "albumentations", "opencv-python-headless", "pillow", "numpy", "pandas", "mlflow")


class AUModel(mlflow.pyfunc.PythonModel):
    """Encoded images -> per-face AU probabilities and decisions (see the module's docstring)."""

    def load_context(self, context) -> None:
        from lightning_modules.predictor import AUPredictor

        self.predictor = AUPredictor.from_dir(context.artifacts["predictor"])
        self.max_pixels = int(os.environ.get("AU_DETECT_MAX_PIXELS", DEFAULT_MAX_PIXELS))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        aus = self.predictor.aus
        decoded: list[np.ndarray | InputError] = []
        for i, value in enumerate(model_input["image"]):
            try:
                decoded.append(read_image(_as_bytes(value), self.max_pixels, name=f"row {i}"))
            except InputError as e:
                decoded.append(e)
        good = [d for d in decoded if not isinstance(d, InputError)]
        faces = iter(self.predictor.predict(good))
        records = []
        for i, d in enumerate(decoded):
            if isinstance(d, InputError):
                records.append(status_record(i, d.status, str(d)))
            else:
                records += frame_records(i, None, None, next(faces), aus)
        return pd.DataFrame.from_records(records, columns=columns(aus))


def _as_bytes(value) -> bytes:
    """Bytes as they come; text as a file path that exists, else as base64."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if len(value) < 4096 and os.path.isfile(value):
            return Path(value).read_bytes()
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return b"\0not base64"  # decodes to an unreadable image: a status row, not a crash
    raise TypeError(f"image values must be bytes, base64 text or a path, got {type(value).__name__}")


def signature(aus) -> ModelSignature:
    numeric = ["frame", "time_s", "face", "x0", "y0", "x1", "y1", *[f"{p}_{c}" for p in LANDMARKS for c in "xy"],
               "confidence"]
    names = [au_column_name(a) for a in aus]
    outputs = [ColSpec("long", "source"), ColSpec("string", "status"), ColSpec("string", "message")]
    outputs += [ColSpec("double", c) for c in numeric + [f"{n}_prob" for n in names] + names]
    order = {c: i for i, c in enumerate(columns(aus))}
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          outputs=Schema(sorted(outputs, key=lambda c: order[c.name])))


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version.split('+')[0]}")  # local tags (+cu130) are not on indexes
    return out


def log_model(predictor, name: str = "model", registered_model_name: str | None = None):
    """Log a predictor as a pyfunc model on the active MLflow run; returns MLflow's ModelInfo."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = predictor.save(Path(tmp) / "predictor")
        return mlflow.pyfunc.log_model(
            name=name, python_model=AUModel(), artifacts={"predictor": str(folder)},
            code_paths=[str(root / p) for p in PACKAGES], signature=signature(predictor.aus),
            input_example=pd.DataFrame({"image": [_example_image()]}), pip_requirements=requirements(),
            registered_model_name=registered_model_name)


def _example_image() -> bytes:
    """A small grey PNG: the request shape the MLflow UI shows (its answer is a no_face row)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
