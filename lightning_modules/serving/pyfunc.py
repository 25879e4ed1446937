"""The detector as an MLflow pyfunc model: image bytes in, one row per face out.

``au-detect fit`` logs the best model as ``runs:/<run id>/model``. It holds the predictor
folder (weights, AU list, fitted thresholds, alignment and normalisation settings), the
project's modules that serving imports (:mod:`lightning_modules.serving.model_code`), pinned requirements and a signature: input a column ``image`` of encoded image
bytes (JPEG, PNG, ...), output the columns of ``au-detect predict``'s CSV, with ``source`` the
input row. Detection and alignment happen inside, so a client sends plain photos:

    mlflow models serve -m runs:/<run id>/model --env-manager local -h 127.0.0.1 -p 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d "{\\"dataframe_records\\": [{\\"image\\": \\"$(base64 -w0 face.jpg)\\"}]}"

(MLflow reads base64 text as bytes for a ``binary`` column.)

A served model answers people it does not know, so:

* it is logged as *models from code* (:mod:`lightning_modules.serving.pyfunc_model`): loading it runs this
  project's code and reads the weights as tensors; nothing is unpickled. The code that runs is
  the model's copy in the artifact store: ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
  execute it, so load models only from stores you trust (``au-detect predict runs:/...`` reads the
  predictor folder only, no code of the model);
* a row is image bytes, never a path: text is taken as base64 and anything else is refused for
  that row, with the same answer whether or not a file of that name exists on the server;
* memory is bounded per request: the rows are decoded and detected a chunk of at most
  ``batch_pixels`` at a time, one request at a time, and a request is refused whole (HTTP 400)
  past ``max_rows`` rows, ``max_request_bytes`` of images or ``max_request_pixels`` decoded
  pixels (read from the headers, before decoding). A single image over ``max_pixels`` gets a
  ``too_large`` row. The limits are the model's config (:class:`RequestLimits`), changed at load time with
  ``mlflow.pyfunc.load_model(uri, model_config={...})`` or, for ``mlflow models serve``, with
  ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_rows": 16}'``.

The answer has a row per face, so more rows than the request. Spark's ``mlflow.pyfunc.spark_udf``
needs one value per input row: the inference parameter ``rows`` (in the signature's params, default
``"faces"``) set to ``"images"`` answers one row per input row instead, its column ``faces`` the list
of that row's rows as dicts, the same values (:mod:`lightning_modules.serving.spark` explodes them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import io
import json
import os
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from datamodules.io.images import DEFAULT_MAX_PIXELS, EMPTY, UNREADABLE, InputError, probe
from datamodules.io.manifest import au_column_name
from datamodules.io.sources import BATCH_PIXELS, Source, frames
from lightning_modules.serving.model_code import PACKAGES, copy_served_code
from lightning_modules.serving.model_card import CARD_FILE
from lightning_modules.serving.predictor import LANDMARKS, AUPredictor, columns, frame_records

# What loading the model runs or installs (MLmodel names the loader and the code file; code/ is put on
# sys.path; the requirements are installed by --env-manager virtualenv/conda), hashed at logging time
# into a tag of the logged model: tags live in the tracking store, not beside the files they vouch for.
RUNS_CODE = ("MLmodel", "pyfunc_model.py", "code", "requirements.txt", "python_env.yaml", "conda.yaml")
CODE_TAG = "au_detect.code_sha256"
CANDIDATE_ALIAS = "candidate"  # the alias every newly registered version gets (models:/<name>@candidate)
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# The inference parameter that shapes the answer: "faces", a row per face (the default), or "images", a
# row per input row with its faces' rows in a list (what a Spark UDF returns: one value per row).
ROWS_PARAM, ROWS = "rows", ("faces", "images")
REQUIREMENTS = ("torch", "torchvision", "timm", "facenet-pytorch", "lightning", "torchmetrics", "jsonargparse",
                "albumentations", "opencv-python-headless", "pillow", "numpy", "pandas", "mlflow")


@dataclass(frozen=True)
class RequestLimits:
    """What one request to the served model may ask for (the model's config).

    Args:
        max_rows: images in one request.
        max_request_bytes: encoded image bytes in one request, all rows together.
        max_request_pixels: decoded pixels in one request, all rows together (from the headers).
        max_pixels: pixels of one image; a larger one gets a ``too_large`` row, undecoded.
        batch_pixels: decoded pixels held at once (what bounds the server's memory).
        decode_seconds: how long the request waits for one image's decoding before that image
            gets a ``too_costly`` row (what a header cannot show: a slow JPEG under the scan limit).
    """

    max_rows: int = 64
    max_request_bytes: int = 64_000_000
    max_request_pixels: int = 400_000_000
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_pixels: int = BATCH_PIXELS
    decode_seconds: float = 10.0

    @classmethod
    def from_config(cls, config: dict | None) -> "RequestLimits":
        types = {f.name: float if f.name == "decode_seconds" else int for f in fields(cls)}
        return cls(**{k: types[k](v) for k, v in (config or {}).items() if k in types})


class AUModel(mlflow.pyfunc.PythonModel):
    """Encoded images -> per-face AU probabilities and decisions (see the module's docstring)."""

    def load_context(self, context) -> None:
        from lightning_modules.serving.onnx_model import load_predictor

        backend = (context.model_config or {}).get("backend", "torch")  # onnxruntime: the exported network
        self.predictor = load_predictor(context.artifacts["predictor"], backend=backend)
        code_folder_off_path(Path(context.artifacts["predictor"]))
        self.limits = RequestLimits.from_config(context.model_config)
        self._one_at_a_time = threading.Lock()  # the server runs requests in threads: one decodes at a time

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "image" not in getattr(model_input, "columns", ()):
            raise MlflowException.invalid_parameter_value("the request needs a column 'image' of image bytes")
        rows = self._rows(params)
        sources = self._sources(list(model_input["image"]))
        aus = self.predictor.aus
        records: list[dict] = []
        with self._one_at_a_time:
            decoded = frames(sources, max_pixels=self.limits.max_pixels, workers=2,
                             prepare=self.predictor.detection_copy, budget=self.limits.batch_pixels,
                             decode_seconds=self.limits.decode_seconds)
            for frame, faces in self.predictor.predict_frames(decoded, batch_pixels=self.limits.batch_pixels):
                records += frame_records(frame, faces, aus)
        answer = pd.DataFrame.from_records(records, columns=columns(aus, self.predictor.has_intensity))
        return per_image(answer, len(sources)) if rows == "images" else answer

    @staticmethod
    def _rows(params: dict | None) -> str:
        rows = (params or {}).get(ROWS_PARAM) or ROWS[0]
        if rows not in ROWS:
            raise MlflowException.invalid_parameter_value(
                f"params {ROWS_PARAM}={rows!r}: expected one of {', '.join(map(repr, ROWS))}")
        return rows

    def _sources(self, values: list) -> list[Source]:
        """One source per row, checked against the request limits before anything is decoded."""
        limits = self.limits
        if len(values) > limits.max_rows:
            raise MlflowException.invalid_parameter_value(
                f"{len(values)} images in one request; at most {limits.max_rows} (max_rows)")
        sources = [_source(i, v) for i, v in enumerate(values)]
        size = sum(len(s.data) for s in sources if s.data is not None)
        if size > limits.max_request_bytes:
            raise MlflowException.invalid_parameter_value(
                f"{size / 1e6:.1f} MB of images in one request; at most {limits.max_request_bytes / 1e6:.1f} MB "
                "(max_request_bytes)")
        pixels = 0
        for s in sources:
            if s.data is not None:
                try:
                    pixels += probe(s.data, limits.max_pixels, name=s.path).pixels
                except InputError:
                    pass  # that row gets its own status
        if pixels > limits.max_request_pixels:
            raise MlflowException.invalid_parameter_value(
                f"{pixels / 1e6:.0f} MP of images in one request; at most {limits.max_request_pixels / 1e6:.0f} MP "
                "(max_request_pixels)")
        return sources


def _source(row: int, value) -> Source:
    """A request row as image bytes. Text is base64 (MLflow's JSON already decodes a binary column;
    CSV and Python callers may send text); nothing is ever taken for a path on the server."""
    name = f"row {row}"
    if isinstance(value, str):
        try:
            value = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            return Source(name, "image", InputError(UNREADABLE, f"{name}: text that is not base64-encoded image "
                                                                "bytes (the model takes image bytes, never a path)"),
                          key=row)
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return Source(name, "image", data=bytes(value), key=row)
    if isinstance(value, (bytes, bytearray, memoryview)) or value is None or (isinstance(value, float) and np.isnan(value)):
        return Source(name, "image", InputError(EMPTY, f"{name}: no image"), key=row)
    return Source(name, "image", InputError(UNREADABLE, f"{name}: {type(value).__name__} is not image bytes"), key=row)


def per_image(answer: pd.DataFrame, n: int) -> pd.DataFrame:
    """A row per face (``source`` the input row) -> a row per input row, column ``faces``: the list
    of that row's rows as dicts, values as they are in ``answer`` (NaN where a value is missing)."""
    at = answer.groupby("source", sort=False).indices
    records = answer.to_dict("records")
    return pd.DataFrame({"faces": [[records[i] for i in at.get(row, ())] for row in range(n)]})


def signature(aus, intensity: bool = False) -> ModelSignature:
    numeric = ["frame", "time_s", "face", "x0", "y0", "x1", "y1", *[f"{p}_{c}" for p in LANDMARKS for c in "xy"],
               "confidence"]
    names = [au_column_name(a) for a in aus]
    outputs = [ColSpec("long", "source"), ColSpec("string", "status"), ColSpec("string", "message")]
    outputs += [ColSpec("double", c) for c in numeric + [f"{n}_prob" for n in names] + names]
    outputs += [ColSpec("double", f"{n}_intensity") for n in names] if intensity else []
    order = {c: i for i, c in enumerate(columns(aus, intensity))}
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          outputs=Schema(sorted(outputs, key=lambda c: order[c.name])),
                          params=ParamSchema([ParamSpec(ROWS_PARAM, "string", ROWS[0])]))


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version.split('+')[0]}")  # local tags (+cu130) are not on indexes
    return out


def code_folder_off_path(inside: Path) -> None:
    """Take the code folder of the model holding ``inside`` (an artifact of it) off ``sys.path``
    where this project imports without it (installed, or the working directory), else move it last.

    MLflow puts a loaded model's code folder first on ``sys.path`` and leaves it there. A process
    started afterwards from this one (spawned DataLoader workers, ``multiprocessing`` with spawn,
    the default on macOS and Windows) would import the project's packages from that copy, which
    holds only what serving imports, and fail on the rest (``datamodules.au_datamodule``); an
    editable install's finder comes after every ``sys.path`` entry, so last is not enough there.
    The loaded model is not affected: its packages are imported already and find their modules
    through their own ``__path__``."""
    root = next((p for p in inside.resolve().parents if (p / "MLmodel").is_file()), None)
    if root is None:
        return
    from mlflow.models import Model

    code = Model.load(str(root)).flavors.get("python_function", {}).get("code")
    if not code:
        return
    folder = os.path.realpath(root / code)
    ours = [p for p in sys.path if p and os.path.realpath(p) == folder]
    sys.path[:] = [p for p in sys.path if p not in ours]
    if not all(_imports_from_elsewhere(package, folder) for package in PACKAGES):
        sys.path.extend(ours)


def _imports_from_elsewhere(package: str, folder: str) -> bool:
    """Whether ``sys.meta_path``'s finders (``sys.path``, an editable install's finder) find
    ``package`` outside ``folder``."""
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec(package, None)
        except (AttributeError, ImportError, ValueError):
            continue
        if spec is not None and spec.origin and not os.path.realpath(spec.origin).startswith(folder + os.sep):
            return True
    return False


def log_model(predictor, name: str = "model", registered_model_name: str | None = None,
              limits: RequestLimits = RequestLimits(), onnx: bool = False):
    """Log a predictor as a pyfunc model (from code) on the active MLflow run; returns MLflow's
    ModelInfo. With ``registered_model_name`` the model is also registered, and the new version gets
    the alias ``candidate`` (:data:`CANDIDATE_ALIAS`). With ``onnx``, the network is also exported
    (:mod:`lightning_modules.serving.onnx_model`): the file goes into the pyfunc model's predictor folder
    (``model_config={"backend": "onnxruntime"}`` runs it) and is logged as an MLflow ONNX model,
    ``<name>_onnx``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = predictor.save(Path(tmp) / "predictor")
        code = copy_served_code(MODEL_CODE, Path(tmp) / "code")  # only what serving imports
        if onnx:
            from lightning_modules.serving.onnx_model import ONNX_FILE, export_onnx

            export_onnx(predictor, folder)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE), artifacts={"predictor": str(folder)},
            code_paths=[str(p) for p in code], signature=signature(predictor.aus, predictor.has_intensity),
            input_example=pd.DataFrame({"image": [_example_image()]}), pip_requirements=requirements(),
            model_config={**asdict(limits), "backend": "torch"}, registered_model_name=registered_model_name)
        record_model_code(mlflow.MlflowClient(), info.model_id)
        card = getattr(predictor, "card", None)
        if card:  # on top of the model's folder too, where people browsing it look first
            card_dir = Path(tmp) / "card"
            card_dir.mkdir()
            (card_dir / CARD_FILE).write_text(card, encoding="utf-8")
            mlflow.MlflowClient().log_model_artifacts(info.model_id, str(card_dir))
        if registered_model_name and info.registered_model_version is not None:
            # the newest fit's model is the candidate; `au-detect promote` moves other aliases (champion)
            client = mlflow.MlflowClient()
            client.set_registered_model_alias(registered_model_name, CANDIDATE_ALIAS, str(info.registered_model_version))
            if card:  # the registry's page of the version shows it
                client.update_model_version(registered_model_name, str(info.registered_model_version), description=card)
        if onnx:
            import onnx as onnx_lib

            mlflow.onnx.log_model(onnx_lib.load(str(folder / ONNX_FILE)), name=f"{name}_onnx")
        return info


def model_code_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 (first 32 hex digits) of each file of :data:`RUNS_CODE` in a model folder, by path."""
    folder = Path(folder)
    hashes = {}
    for name in RUNS_CODE:
        path = folder / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            hashes[f.relative_to(folder).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()[:32]
    return hashes


def download_model_code(model_id: str, into: str | Path) -> Path:
    """The files of :data:`RUNS_CODE` of a logged model, downloaded into ``into`` (not its weights)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    repo = ModelsArtifactRepository(f"models:/{model_id}")
    listed = {f.path for f in repo.list_artifacts("")}
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a few small files: no bar per folder
    try:
        for name in RUNS_CODE:
            if name in listed:
                repo.download_artifacts(name, dst_path=str(into))
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    return Path(into)


def record_model_code(client, model_id: str) -> dict[str, str]:
    """Hash the code files of a just-logged model, as stored, into its :data:`CODE_TAG` tag."""
    with tempfile.TemporaryDirectory() as tmp:
        hashes = model_code_hashes(download_model_code(model_id, tmp))
    client.set_logged_model_tags(model_id, {CODE_TAG: json.dumps(hashes, sort_keys=True, separators=(",", ":"))})
    return hashes


def log_model_to_run(predictor, client, run_id: str, name: str = "model", registered_model_name: str | None = None,
                     onnx: bool = False):
    """Log a predictor as ``runs:/<run_id>/<name>`` on the tracking server of ``client`` (an
    ``MlflowClient``), then delete the models an earlier, killed attempt left on the run under the
    same names (``runs:/<id>/model`` resolves to the newest, but a half-logged one is no model to keep)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = log_model(predictor, name=name, registered_model_name=registered_model_name, onnx=onnx)
    finally:
        mlflow.set_tracking_uri(previous)
    experiment_id = client.get_run(run_id).info.experiment_id
    for model in logged_models(client, experiment_id, run_id, name):
        if model.model_id != info.model_id:
            client.delete_logged_model(model.model_id)
    if onnx:  # the ONNX model just logged is the newest of its name
        models = sorted(logged_models(client, experiment_id, run_id, f"{name}_onnx"), key=lambda m: m.creation_timestamp)
        for model in models[:-1]:
            client.delete_logged_model(model.model_id)
    return info


def log_saved_predictor(folder: str | Path, client, run_id: str, **kwargs):
    """:func:`log_model_to_run` for a predictor saved to ``folder`` (``AUPredictor.save``): how a
    model kept while the tracking server was away is logged later (:mod:`callbacks.tracking.spool`)."""
    return log_model_to_run(AUPredictor.from_dir(folder, device="cpu"), client, run_id, **kwargs)


def logged_models(client, experiment_id: str, run_id: str, name: str) -> list:
    """The logged models of ``run_id`` named ``name``, in the order the store gives them."""
    quoted = name.replace("'", "\\'")
    found, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"name = '{quoted}'", page_token=token)
        found += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            return found


def _example_image() -> bytes:
    """A small grey PNG: the request shape the MLflow UI shows (its answer is a no_face row)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()
