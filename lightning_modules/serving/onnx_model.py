"""The AU network as an ONNX file, and a predictor that runs it with onnxruntime.

``au-detect export --model CKPT --out DIR`` writes into ``DIR``:

- ``au_net.onnx``: aligned crops in, probabilities and decisions out, and each AU's intensity
  when the network has an intensity head (``intensities``: 0 where decided absent, the expected
  FACS level 1-5 where present). The input is what the alignment writes (uint8 RGB,
  ``(batch, S, S, 3)``, channels last); the normalisation, both branches, the heads, the sigmoid
  and the comparison with the fitted thresholds are inside the graph, so a caller needs nothing
  but onnxruntime and numpy. AU names, thresholds, crop size and
  normalisation are also in the file's metadata (``metadata_props``).
- ``predictor.json``: the same file a predictor folder holds (network spec, alignment, mean,
  std, thresholds) plus an ``onnx`` section saying how to feed the file.

:class:`OnnxAUPredictor` is :class:`~lightning_modules.serving.predictor.AUPredictor` with the network
run by onnxruntime: decoding, detection (MTCNN, still PyTorch), alignment and rows are the same
code. ``au-detect predict --backend onnxruntime --model DIR`` uses it. The graph answers AUs only:
in videos people are followed by their boxes alone, or told apart by a face-recognition backbone
run in PyTorch (``--identity_weights``), which then embeds only the faces the detection prior did
not follow.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from datamodules.alignment.align import FaceDetector
from datamodules.io.files import apply_umask, sync, write_text
from datamodules.io.manifest import au_column_name
from lightning_modules.intensity_head import reported_intensity
from lightning_modules.serving.model_card import CARD_FILE
from datamodules.augmentation import Normalize
from lightning_modules.serving.predictor import (CONFIG_FILE, AUPredictor, ModelConfigError, embeddings_asked,
                                                 inference_copy, read_config, saved_alignment)

ONNX_FILE = "au_net.onnx"
Backend = Literal["torch", "onnxruntime"]  # what runs the AU network
# opset 18 is what torch's exporter writes natively and onnxruntime has run since 1.14
OPSET = 18
INPUT, OUTPUTS = "crops", ("probabilities", "decisions")
INTENSITIES = "intensities"  # the third output, of a network with an intensity head


class CropClassifier(nn.Module):
    """uint8 crops ``(N, S, S, 3)`` -> probabilities ``(N, K)`` float32 and decisions ``(N, K)``
    bool, as :meth:`AUPredictor.classify` computes them, and intensities ``(N, K)`` float32 as
    :meth:`AUPredictor.classify_intensity` does when the network has an intensity head (the graph
    that is exported)."""

    def __init__(self, predictor: AUPredictor):
        super().__init__()
        self.net = inference_copy(predictor.net).cpu().to(memory_format=torch.contiguous_format)
        self.register_buffer("mean", torch.tensor(predictor.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(predictor.std).view(1, 3, 1, 1) * 255)
        self.register_buffer("thresholds", predictor.net.thresholds.detach().cpu().clone())
        self.intensity = predictor.has_intensity

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (crops.permute(0, 3, 1, 2).float() - self.mean) / self.std
        logits, _, feats = self.net.forward_all(x)
        probs = torch.sigmoid(logits)
        decisions = probs >= self.thresholds
        if not self.intensity:
            return probs, decisions
        # intensity from the same decisions: 0 where absent, >= 1 where present, as in PyTorch
        return probs, decisions, reported_intensity(self.net.intensity_logits(feats), decisions)


# The exporter's optimiser passes log each rewrite at INFO (about 25 lines a model): detail for
# whoever debugs the export, not for someone training or exporting a model.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's INFO lines held back while it runs (warnings still pass; a logger set to
    DEBUG on purpose keeps everything)."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.level != logging.DEBUG:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(predictor: AUPredictor, folder: str | Path, opset: int = OPSET) -> Path:
    """Write ``au_net.onnx`` and ``predictor.json`` into ``folder`` (see the module's docstring).

    The ONNX file is written beside its final name and renamed into place, and ``predictor.json``
    last: a folder with both files holds a whole export, whatever stopped a previous one.
    """
    try:
        import onnx

        importlib.import_module("onnxscript")  # torch's exporter needs it: said here, not deep inside torch
    except ImportError as e:
        raise ImportError(f"exporting to ONNX needs onnx and onnxscript ({e}): pip install -e '.[onnx]'") from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = CropClassifier(predictor).eval()
    size = predictor.alignment.crop_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    (folder / CONFIG_FILE).unlink(missing_ok=True)  # an old export's config never describes the new file
    fd, tmp = tempfile.mkstemp(prefix=f".{ONNX_FILE}.", dir=folder)
    os.close(fd)
    try:
        with quiet_exporter():
            torch.onnx.export(module, (example,), tmp, input_names=[INPUT], output_names=outputs(predictor),
                              dynamic_shapes={"crops": {0: torch.export.Dim("batch")}}, opset_version=opset,
                              dynamo=True, external_data=False, verbose=False)
        graph = onnx.load(tmp)
        for key, value in metadata(predictor).items():
            graph.metadata_props.add(key=key, value=value)
        graph.doc_string = ("au-detect: aligned uint8 RGB crops (N,S,S,3) -> AU probabilities and decisions"
                            + (" and intensities (0, or FACS level 1-5)" if predictor.has_intensity else ""))
        onnx.save(graph, tmp)
        sync(tmp)
        apply_umask(tmp)  # mkstemp made it owner-only; a serving account must read it like its neighbours
        os.replace(tmp, folder / ONNX_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    # thresholds unrounded: the graph decides at the exact float32 values, and so must their copies
    config = {"net": predictor.spec, "alignment": asdict(predictor.alignment), "mean": predictor.mean,
              "std": predictor.std, "thresholds": predictor.thresholds.tolist(), "onnx": feeding(predictor, opset)}
    write_text(folder / CONFIG_FILE, json.dumps(config, indent=1))
    if getattr(predictor, "card", None):  # the export goes where the card is needed most: away from MLflow
        write_text(folder / CARD_FILE, predictor.card)
    return folder


def outputs(predictor: AUPredictor) -> list[str]:
    """The graph's output names: probabilities and decisions, and intensities with an intensity head."""
    return list(OUTPUTS) + ([INTENSITIES] if predictor.has_intensity else [])


def metadata(predictor: AUPredictor) -> dict[str, str]:
    """What a caller of the bare ONNX file needs, as its ``metadata_props`` (strings)."""
    return {"aus": json.dumps([au_column_name(a) for a in predictor.aus]),
            "thresholds": json.dumps(predictor.thresholds.tolist()),
            "crop_size": str(predictor.alignment.crop_size),
            "mean": json.dumps(predictor.mean), "std": json.dumps(predictor.std),
            "alignment": json.dumps(asdict(predictor.alignment))}


def feeding(predictor: AUPredictor, opset: int) -> dict:
    """The ``onnx`` section of ``predictor.json``: how to feed the file and read its answer."""
    size, k = predictor.alignment.crop_size, len(predictor.aus)
    answers = {"probabilities": {"dtype": "float32", "shape": ["batch", k]},
               "decisions": {"dtype": "bool", "shape": ["batch", k], "what": "probabilities >= the fitted thresholds"}}
    if predictor.has_intensity:
        answers[INTENSITIES] = {"dtype": "float32", "shape": ["batch", k],
                                "what": "0 where decided absent; where present, the expected FACS level given "
                                        "presence, 1 (A) to 5 (E)"}
    return {"file": ONNX_FILE, "opset": opset,
            "input": {"name": INPUT, "dtype": "uint8", "shape": ["batch", size, size, 3],
                      "what": "RGB faces aligned as 'alignment' says (MTCNN landmarks onto the template), "
                              "channels last; normalisation is inside the graph"},
            "outputs": answers, "aus": [au_column_name(a) for a in predictor.aus]}


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime session on the CPU (or CUDA when onnxruntime-gpu offers it).

    ``threads``: intra-op threads, by default as many as PyTorch uses in this process
    (``torch.get_num_threads()``, which follows ``OMP_NUM_THREADS`` and ``torch.set_num_threads``).
    onnxruntime's own default counts the host's physical cores, not the process's share of them:
    in a container with a CPU quota, or beside decoding threads, it runs more threads than cores
    and they wait on each other (on 2 cores, pinning 2 threads: the network 1.22x PyTorch's instead
    of 1.11x). Graph optimisations at their highest level (``ORT_ENABLE_ALL``: constant folding,
    fused convolutions and activations, the blocked NCHWc layout on x86).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install -e '.[onnx]'") from e
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxAUPredictor(AUPredictor):
    """:class:`AUPredictor` whose network runs in onnxruntime (from an ``au-detect export`` folder).

    Args:
        session: the onnxruntime session of ``au_net.onnx``.
        config: the folder's ``predictor.json``.
        device: where MTCNN runs (torch; default cuda when available).
        batch_size: crops per ``session.run``.
    """

    def __init__(self, session, config: dict, device: str | torch.device | None = None, batch_size: int = 64,
                 source: str | Path = CONFIG_FILE, **detection):
        # No torch network: the parent's constructor is not called (it would build one).
        self.session = session
        self.net = None
        self.spec = dict(config["net"])
        self._aus = tuple(int(a) for a in self.spec["aus"])
        self._thresholds = np.asarray(config["thresholds"], np.float32)
        self.mean, self.std = [float(m) for m in config["mean"]], [float(s) for s in config["std"]]
        self.alignment = saved_alignment(config["alignment"], detection, source=source)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.precision = batch_size, "32-true"
        self.normalize = Normalize(self.mean, self.std)  # for the identity backbone, run in PyTorch
        self.identity_net = None
        self.detector = FaceDetector(self.alignment, self.device)
        self._intensity = INTENSITIES in {o.name for o in session.get_outputs()}

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | None = None, **detection) -> "OnnxAUPredictor":
        folder = Path(folder)
        config_path, model_path = folder / CONFIG_FILE, folder / ONNX_FILE
        if not model_path.is_file() or not config_path.is_file():
            raise FileNotFoundError(f"model {folder}: the onnxruntime backend needs a folder of 'au-detect export' "
                                    f"({ONNX_FILE} and {CONFIG_FILE})")
        config = read_config(config_path)  # checked before onnxruntime reads the graph it describes
        if "thresholds" not in config:
            raise ModelConfigError(f"{config_path}: no 'thresholds' section (an export writes one per AU)")
        session = onnx_session(model_path)
        size = config["alignment"]["crop_size"]
        expected = ["batch", size, size, 3]
        shape = [d if isinstance(d, int) else "batch" for d in session.get_inputs()[0].shape]
        if session.get_inputs()[0].name != INPUT or shape != expected:
            raise ValueError(f"{model_path}: input {session.get_inputs()[0].name} {shape}, expected {INPUT} "
                             f"{expected} (predictor.json and the ONNX file are not of one export)")
        answers = [o.name for o in session.get_outputs()]
        wanted = list(OUTPUTS) + ([INTENSITIES] if config["net"].get("intensity") else [])
        if answers != wanted:
            raise ValueError(f"{model_path}: outputs {answers}, expected {wanted} from {config_path}'s net "
                             f"(predictor.json and the ONNX file are not of one export)")
        predictor = cls(session, config, device, source=config_path, **detection)
        card = folder / CARD_FILE
        predictor.card = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
        return predictor

    @property
    def aus(self) -> tuple[int, ...]:
        return self._aus

    @property
    def thresholds(self) -> np.ndarray:
        return self._thresholds

    @property
    def has_intensity(self) -> bool:
        return self._intensity  # the graph has an intensities output

    def classify(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, decisions = self._run(crops, list(OUTPUTS))
        return probs, decisions

    def classify_intensity(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.has_intensity:
            raise ValueError("this export has no intensities output (its network has no intensity head)")
        probs, decisions, intensities = self._run(crops, [*OUTPUTS, INTENSITIES])
        return probs, decisions, intensities

    def classify_faces(self, crops: np.ndarray, embed: bool | np.ndarray = False
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """As :meth:`AUPredictor.classify_faces`: the exported graph answers AUs only, so embeddings
        come from the identity backbone (:meth:`use_identity_weights`) when there is one, and are
        None otherwise (people are then followed across frames by their boxes alone)."""
        intensities = None
        if self.has_intensity:
            probs, decisions, intensities = self.classify_intensity(crops)
        else:
            probs, decisions = self.classify(crops)
        embedded = embeddings_asked(embed) and self.identity_net is not None
        return probs, decisions, intensities, self.embed(crops, embed) if embedded else None

    def _run(self, crops: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The graph's ``names`` outputs over the crops, ``batch_size`` at a time, concatenated."""
        k = len(self.aus)
        if not len(crops):
            return [np.zeros((0, k), bool if n == "decisions" else np.float32) for n in names]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, len(crops), self.batch_size):
            batch = np.ascontiguousarray(crops[i:i + self.batch_size], np.uint8)
            for part, answer in zip(parts, self.session.run(names, {INPUT: batch})):
                part.append(answer)
        return [np.concatenate(part) for part in parts]

    def save(self, folder: str | Path) -> Path:
        raise TypeError("an onnxruntime predictor has no torch weights to save: its export folder is the model")


def load_predictor(model: str, device: str | None = None, backend: Backend = "torch", **detection) -> AUPredictor:
    """The predictor of ``model`` with its network run by ``backend``: ``torch`` takes what
    :meth:`AUPredictor.load` takes; ``onnxruntime`` a folder of ``au-detect export``."""
    if backend == "onnxruntime":
        return OnnxAUPredictor.from_dir(model, device, **detection)
    if backend != "torch":
        raise ValueError(f"backend {backend!r}: expected 'torch' or 'onnxruntime'")
    return AUPredictor.load(model, device, **detection)


def parity(predictor: AUPredictor, onnx_predictor: OnnxAUPredictor, crops: Sequence[np.ndarray] | np.ndarray
           ) -> dict[str, float]:
    """Largest probability difference and the share of equal decisions, torch vs onnxruntime, on
    the same uint8 crops; with an intensity head also the largest intensity difference where both
    decide alike (``max_abs_intensity``)."""
    crops = np.asarray(crops, np.uint8)
    if predictor.has_intensity:
        p_torch, d_torch, i_torch = predictor.classify_intensity(crops)
        p_onnx, d_onnx, i_onnx = onnx_predictor.classify_intensity(crops)
    else:
        (p_torch, d_torch), (p_onnx, d_onnx) = predictor.classify(crops), onnx_predictor.classify(crops)
    check = {"max_abs_prob": float(np.abs(p_torch - p_onnx).max(initial=0.0)),
             "decisions_equal": float((d_torch == d_onnx).mean()) if d_torch.size else 1.0}
    if predictor.has_intensity:
        # a decision flipped by float noise at the threshold moves the intensity by a whole level:
        # that is the decisions' difference, counted above, not the intensity head's
        same = d_torch == d_onnx
        check["max_abs_intensity"] = float(np.abs(i_torch - i_onnx)[same].max(initial=0.0))
    return check
