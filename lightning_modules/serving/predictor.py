"""AUPredictor: every face of a frame found, aligned as in training, and classified in batches.

A predictor is the trained :class:`AUNet` (weights, AU list, fitted thresholds) plus what the
pixels went through before it: the alignment settings (crop size and landmark template must
match training) and the normalisation. It loads from a Lightning checkpoint (the data module's
settings are saved in it), from its own folder (``predictor.json`` + ``weights.pt``, the form
inside the MLflow model) or from an MLflow model URI.

Frames are detected together (MTCNN on downscaled copies, batched by shape), then every face of
every frame goes through the network in one batch: one forward pass per ``batch_size`` faces,
not one per face.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

from datamodules.alignment.align import CROP_SIZES, AlignmentSettings, FaceDetector, crop_face, detection_copy
from datamodules.augmentation import IMAGENET_MEAN, IMAGENET_STD, Normalize
from datamodules.io.manifest import au_column_name
from datamodules.io.sources import BATCH_PIXELS, NO_FACE, OK, Frame, batches
from lightning_modules.au_detector import BRANCHES, AUNet
from lightning_modules.backbones import check_backbone
from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.serving.model_card import CARD_FILE

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "predictor.json", "weights.pt"
# What a saved model may ask to be built with. A checkpoint or predictor folder is data from
# elsewhere: loading its weights runs no code, but a crop size or AU count in it sizes every
# tensor built after, so they are bounded before anything is allocated.
MAX_AUS = 64  # FACS codes fewer; EmotioNet's 23 and DISFA's 12 are the sets in use
AU_IDS = (1, 99)  # FACS numbers actions 1-99 (51-56: head movements, 61-64: eye movements)
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
# Lightning's precision names; the mixed ones run the network under torch.autocast.
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
Precision = Literal[tuple(PRECISIONS)]  # the option's type: a wrong name is refused by the CLI


@dataclass
class Face:
    """One detected face and the network's answer for it (image pixel coordinates)."""

    box: np.ndarray  # (4,) x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2) eyes, nose tip, mouth corners
    confidence: float
    probs: np.ndarray  # (K,)
    decisions: np.ndarray  # (K,) bool, at the fitted thresholds
    intensities: np.ndarray | None = None  # (K,) 0 where decided absent, else the expected FACS level 1-5
    embedding: np.ndarray | None = None  # (D,) unit vector of who the face is (AUNet.embedding), when asked
    # In a video frame followed from the one before (the detection prior): the index, among that
    # frame's faces, of the face this one continues; None for a face found anew.
    follows: int | None = None


class AUPredictor:
    """Detect, align and classify the faces of RGB frames.

    Args:
        net: the trained network (its ``thresholds`` buffer decides).
        alignment: the training alignment; detection knobs may be changed, the crop may not.
        mean, std: the normalisation of training.
        spec: how ``net`` is built (backbone, branches, AUs): saved next to its weights.
        device: torch device (default: cuda when available).
        batch_size: faces per forward pass.
        precision: ``32-true``, or ``bf16-mixed``/``16-mixed`` for the network under autocast
            (several times faster on GPUs and on CPUs with AMX; probabilities move by about 1e-3,
            so a decision right at its threshold may flip). Detection stays in float32.
    """

    def __init__(self, net: AUNet, alignment: AlignmentSettings, spec: dict, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, device: str | torch.device | None = None, batch_size: int = 64,
                 precision: str = "32-true"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self._inference_net = inference_copy(self.net)
        self.precision = precision
        self.alignment = AlignmentSettings.coerce(alignment)
        self.spec = dict(spec)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.normalize = Normalize(self.mean, self.std)
        self.batch_size = batch_size
        if self.alignment.method == "center":
            raise ValueError("this model was trained on center crops of whole images (no face detection); "
                             "prediction detects faces, so it needs a model trained on detected faces")
        self.detector = FaceDetector(self.alignment, self.device)
        self.card: str | None = None  # MODEL_CARD.md (lightning_modules.serving.model_card), when it has one
        self.identity_net: torch.nn.Module | None = None  # embeds faces for tracking (None: the face branch)

    def use_identity_weights(self, weights: str, backbone: str | None = None) -> str:
        """Embed faces for following people with a face-recognition backbone (a checkpoint of
        ``au-detect pretrain-face``, the face branch before the AU fit tuned it for AUs) instead of
        the model's face branch; returns what was loaded. ``backbone``: its architecture (default:
        the model's)."""
        from lightning_modules.backbones import create_backbone

        net, report = create_backbone(backbone or self.spec["backbone"], weights)
        self.identity_net = inference_copy_of_backbone(net).to(self.device)
        return str(report)

    @property
    def aus(self) -> tuple[int, ...]:
        return self.net.aus

    @property
    def has_intensity(self) -> bool:
        """Whether the network reports AU intensities beside occurrence (trained with an intensity head)."""
        return self.net.intensity_head is not None

    @property
    def thresholds(self) -> np.ndarray:
        return self.net.thresholds.detach().cpu().numpy()

    # -- loading and saving ---------------------------------------------------------------------
    @classmethod
    def load(cls, model: str, device: str | None = None, **detection) -> "AUPredictor":
        """From a checkpoint file, a predictor folder, or an MLflow model URI (``runs:/<id>/model``,
        ``models:/<name>/<version>``, ``models:/<name>@<alias>``). ``detection`` overrides
        detection settings (e.g. ``min_face_size``). The exported ONNX network: :func:`lightning_modules.serving.onnx_model.load_predictor`."""
        if model.startswith(MLFLOW_SCHEMES):
            return cls.from_mlflow(model, device, **detection)
        path = Path(model)
        if path.is_dir():
            return cls.from_dir(path, device, **detection)
        if path.is_file():
            return cls.from_checkpoint(path, device, **detection)
        raise FileNotFoundError(f"model {model!r}: not a checkpoint file, a predictor folder or an MLflow model URI "
                                f"({', '.join(s + '...' for s in MLFLOW_SCHEMES)})")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, **detection) -> "AUPredictor":
        """From a Lightning checkpoint of :class:`AUDetector` (branch weights come from it, so the
        pretraining checkpoints it started from need not exist any more)."""
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{path}: not a Lightning checkpoint of the AU detector (no hyper_parameters/state_dict)")
        data = ckpt.get("datamodule_hyper_parameters") or {}
        if not isinstance(data, dict):
            raise ModelConfigError(f"{path}: datamodule_hyper_parameters is a {type(data).__name__}, not a mapping")
        if "alignment" not in data:
            log.warning("%s holds no data settings: default alignment and ImageNet normalisation assumed", path)
        predictor = cls.from_state(ckpt["state_dict"], ckpt["hyper_parameters"],
                                   saved_alignment(data.get("alignment", AlignmentSettings()), detection, source=path),
                                   data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD), device, source=path)
        predictor.card = checkpoint_card(ckpt)
        return predictor

    @classmethod
    def from_state(cls, state_dict: dict, hparams: dict, alignment: AlignmentSettings | dict,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   device: str | None = "cpu", source: str | Path = "hyperparameters") -> "AUPredictor":
        """From an :class:`AUDetector`'s state dict and hyperparameters (a checkpoint's, or a live
        module's) and the data settings it was trained with; the weights are copied to the CPU.
        ``source`` names where they came from in the error a configuration out of bounds raises."""
        if not isinstance(hparams, dict):
            raise ModelConfigError(f"{source}: hyper_parameters is a {type(hparams).__name__}, not a mapping")
        missing = [k for k in ("aus", "backbone", "branches") if k not in hparams]
        if missing:
            raise ModelConfigError(f"{source}: hyper_parameters lack {missing}")
        spec = check_spec({"aus": hparams["aus"], "backbone": hparams["backbone"], "branches": hparams["branches"],
                           "aux_heads": bool(hparams.get("aux_heads", False)),
                           "intensity": any(k.startswith("net.intensity_head.") for k in state_dict)}, source)
        alignment = AlignmentSettings.coerce(alignment)
        check_crop_size(alignment.crop_size, source)
        check_normalisation(mean, std, source)
        if "net.thresholds" in state_dict:
            check_thresholds(state_dict["net.thresholds"], len(spec["aus"]), source, "state_dict net.thresholds")
        net = build_net(spec, source)
        net.load_state_dict({k[len("net."):]: v.detach().cpu() for k, v in state_dict.items() if k.startswith("net.")})
        return cls(net, alignment, spec, mean, std, device)

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | None = None, **detection) -> "AUPredictor":
        folder = Path(folder)
        config = read_config(folder / CONFIG_FILE)
        spec = check_spec(config["net"], folder / CONFIG_FILE)
        alignment = saved_alignment(config["alignment"], detection, source=folder / CONFIG_FILE)
        weights = load_checkpoint(folder / WEIGHTS_FILE, "predictor weights")
        if not isinstance(weights, dict):
            raise ModelConfigError(f"{folder / WEIGHTS_FILE}: a {type(weights).__name__}, not a state dict")
        if "thresholds" in weights:
            check_thresholds(weights["thresholds"], len(spec["aus"]), folder / WEIGHTS_FILE, "thresholds")
        net = build_net(spec, folder / CONFIG_FILE)
        net.load_state_dict(weights)
        predictor = cls(net, alignment, spec, config["mean"], config["std"], device)
        card = folder / CARD_FILE
        predictor.card = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
        return predictor

    @classmethod
    def from_mlflow(cls, uri: str, device: str | None = None, **detection) -> "AUPredictor":
        """From the pyfunc model ``au-detect fit`` logs (:mod:`lightning_modules.serving.pyfunc`): only its
        predictor folder is read (tensors and JSON, no code of the model runs), from a temporary
        copy that is removed once the weights are in memory."""
        import mlflow
        from mlflow.models import Model

        with tempfile.TemporaryDirectory(prefix="au-detect-model-") as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
                stored = Model.load(local).flavors["python_function"]["artifacts"]["predictor"]["path"]
            except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; say what was asked and where
                raise FileNotFoundError(f"model {uri!r}: could not load it from MLflow at {mlflow.get_tracking_uri()} "
                                        f"({type(e).__name__}: {e}); is MLFLOW_TRACKING_URI or --mlflow right?") from e
            folder = (local / stored).resolve()
            if not folder.is_relative_to(local.resolve()):  # the MLmodel file is data: no path out of the copy
                raise FileNotFoundError(f"model {uri!r}: its predictor path {stored!r} leaves the model's folder")
            # from_dir copies the memory-mapped weights into the network: the copy can go after it
            return cls.from_dir(folder, device, **detection)

    def save(self, folder: str | Path) -> Path:
        """Write ``predictor.json`` and ``weights.pt`` (tensors only) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"net": self.spec, "alignment": asdict(self.alignment), "mean": self.mean, "std": self.std,
                  "thresholds": self.thresholds.round(6).tolist()}
        torch.save({k: v.cpu() for k, v in self.net.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        if self.card:
            (folder / CARD_FILE).write_text(self.card, encoding="utf-8")
        return folder

    # -- prediction -------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligned uint8 crops (N,S,S,3) -> probabilities (N,K) and decisions (N,K), in batches."""
        k = len(self.aus)
        if not len(crops):
            return np.zeros((0, k), np.float32), np.zeros((0, k), bool)
        probs, decisions = self._in_batches(crops, self._inference_net.predict)
        return probs, decisions

    @torch.inference_mode()
    def classify_intensity(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`classify`, with each AU's intensity (N,K): 0 where decided absent, the
        expected FACS level (1-5) given presence where decided present. Needs :attr:`has_intensity`."""
        probs, decisions, intensities, _ = self.classify_faces(crops)
        if intensities is None:
            raise ValueError("this network has no intensity head (trained without AU<n>_intensity columns)")
        return probs, decisions, intensities

    @torch.inference_mode()
    def classify_faces(self, crops: np.ndarray, embed: bool | np.ndarray = False
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Everything a face's row holds: probabilities, decisions, intensities (None without an
        intensity head) and, with ``embed``, identity embeddings (N,D) (None otherwise). ``embed``
        may be a mask (N,) of the crops to embed: with an identity network (:meth:`use_identity_weights`)
        only those go through it and the other rows are nan; the face branch's embedding comes
        with the AU pass, so then every crop has one."""
        k, intensity = len(self.aus), self.has_intensity
        asked = embeddings_asked(embed)
        wanted = embed if np.ndim(embed) else np.full(len(crops), asked)
        if not len(crops):
            return (np.zeros((0, k), np.float32), np.zeros((0, k), bool),
                    np.zeros((0, k), np.float32) if intensity else None, np.zeros((0, 0), np.float32) if asked else None)
        if asked and self.identity_net is not None:
            answers = self._in_batches(crops, lambda x: self._inference_net.answer(x, intensity))
            answers.append(self.embed(crops, wanted))
        else:
            answers = self._in_batches(crops, lambda x: self._inference_net.answer(x, intensity, asked))
        probs, decisions, rest = answers[0], answers[1], answers[2:]
        intensities = rest.pop(0) if intensity else None
        return probs, decisions, intensities, (rest[0] if asked else None)

    @torch.inference_mode()
    def embed(self, crops: np.ndarray, wanted: bool | np.ndarray = True) -> np.ndarray:
        """Unit identity embeddings (N,D) of the crops ``wanted`` (a mask, or all) from the identity
        backbone (:meth:`use_identity_weights`); rows of nan for the others."""
        wanted = np.broadcast_to(np.asarray(wanted, bool), (len(crops),))
        if not wanted.any():
            return np.full((len(crops), 1), np.nan, np.float32)
        identity = self.identity_net
        found = self._in_batches(crops[wanted], lambda x: (torch.nn.functional.normalize(identity(x).float(), dim=1),))[0]
        embeddings = np.full((len(crops), found.shape[1]), np.nan, np.float32)
        embeddings[wanted] = found
        return embeddings

    def _in_batches(self, crops: np.ndarray, answer) -> list[np.ndarray]:
        """``answer`` (the inference net's ``predict`` or ``predict_intensity``) over the crops,
        ``batch_size`` at a time under the predictor's precision: each of its outputs concatenated,
        decisions as bool, the rest as float32."""
        parts: list[list[np.ndarray]] = []
        dtype = PRECISIONS[self.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        for i in range(0, len(crops), self.batch_size):
            # a memory-mapped cache is read-only: copied only then (torch wants writable memory)
            batch = np.require(crops[i:i + self.batch_size], np.uint8, ["C", "W"])
            x = torch.from_numpy(batch).to(self.device)
            with autocast:
                answers = answer(self.normalize(x.permute(0, 3, 1, 2)))
            values = [a.cpu().numpy() if a.dtype == torch.bool else a.float().cpu().numpy() for a in answers]
            parts = [[v] for v in values] if not parts else [part + [v] for part, v in zip(parts, values)]
        return [np.concatenate(part) for part in parts]

    def face_crops(self, frames: Sequence[np.ndarray], copies: Sequence | None = None,
                   follows: Sequence[bool] | None = None) -> tuple[list, np.ndarray, list[tuple[int, int]]]:
        """The faces of RGB uint8 frames, detected and aligned as the network expects them: each
        frame's :class:`Detection`, the crops (N, S, S, 3) uint8, frame by frame and largest face
        first, and each crop's ``(frame, face in its detection)`` (``copies``, ``follows``: see
        :meth:`FaceDetector.detect`)."""
        detections = self.detector.detect(frames, copies, follows)
        crops, owners = [], []
        for f, (frame, det) in enumerate(zip(frames, detections)):
            order = np.argsort(-(det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])) \
                if len(det) else []
            for j in order:
                crops.append(crop_face(frame, det.boxes[j], det.landmarks[j], self.alignment))
                owners.append((f, int(j)))
        size = self.alignment.crop_size
        return detections, np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8), owners

    def predict(self, frames: Sequence[np.ndarray], copies: Sequence | None = None,
                embed: bool = False, follows: Sequence[bool] | None = None) -> list[list[Face]]:
        """RGB uint8 frames of any sizes -> the faces of each, largest first (``copies``: their
        detection copies when made ahead; ``follows``: which frames come right after the one
        before in a video, see :meth:`FaceDetector.detect`); with ``embed`` each face carries its
        identity embedding, for following people across frames. A face the detection prior
        followed from the frame before says which face it continues (``Face.follows``) and, with
        an identity network, is not embedded: who it is was known a frame ago."""
        detections, stacked, owners = self.face_crops(frames, copies, follows)
        # each frame's detection index -> place among its faces (largest first)
        place = [{} for _ in frames]
        for f, j in owners:
            place[f][j] = len(place[f])
        continues = [place[f - 1].get(int(detections[f].follows[j])) if detections[f].follows is not None else None
                     for f, j in owners]
        wanted = np.array([c is None for c in continues], bool) if embed else False
        probs, decisions, intensities, embeddings = self.classify_faces(stacked, wanted)
        none = [None] * len(owners)
        out: list[list[Face]] = [[] for _ in frames]
        for (f, j), p, d, i, e, c in zip(owners, probs, decisions, none if intensities is None else intensities,
                                         none if embeddings is None else embeddings, continues):
            det = detections[f]
            e = None if e is None or np.isnan(e).any() else e
            out[f].append(Face(det.boxes[j], det.landmarks[j], float(det.scores[j]), p, d, i, e, c))
        return out


    def predict_frames(self, frames: Iterable[Frame], batch_frames: int = 32, batch_pixels: int = BATCH_PIXELS,
                       embed: bool = False) -> Iterator[tuple[Frame, list[Face] | None]]:
        """Each frame with its faces (None for an input that yielded no pixels), in order; frames
        are detected in batches of ``batch_frames``, fewer when they hold ``batch_pixels``; with
        ``embed`` the faces of video frames carry identity embeddings.

        A batch's pixels are released when the next batch is asked for (it decodes meanwhile,
        and memory must not hold both): copy them to keep them.
        """
        for batch in self.predict_batches(frames, batch_frames, batch_pixels, embed):
            yield from batch

    def predict_batches(self, frames: Iterable[Frame], batch_frames: int = 32, batch_pixels: int = BATCH_PIXELS,
                        embed: bool = False) -> Iterator[list[tuple[Frame, list[Face] | None]]]:
        """:meth:`predict_frames` a batch at a time: what a run that saves where it stands counts in."""
        for batch in batches(frames, batch_frames, batch_pixels):
            decoded = [f for f in batch if f.pixels is not None]
            # A batch starts afresh (whole detection): a run resumed at a batch finds the same faces.
            follows = [i > 0 and f.frame is not None and f.source is decoded[i - 1].source
                       and decoded[i - 1].frame is not None for i, f in enumerate(decoded)]
            found = self.predict([f.pixels for f in decoded], [f.copy for f in decoded],
                                 embed and any(f.frame is not None for f in batch), follows)
            faces = iter(found)
            yield [(f, next(faces) if f.pixels is not None else None) for f in batch]
            for f in batch:
                f.pixels = f.copy = None

    def detection_copy(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The downscaled copy MTCNN runs on (made ahead, in decoding threads, by :func:`frames`)."""
        return detection_copy(image, self.alignment.detect_max_side)


def embeddings_asked(embed: bool | np.ndarray) -> bool:
    """Whether ``classify_faces``' ``embed`` asks for embeddings: True, or a mask of crops, even
    one of none (the answer then has the embeddings' rows, nan where not embedded)."""
    return bool(np.ndim(embed)) or bool(embed)


def folded(backbone: torch.nn.Module, name: str) -> torch.nn.Module:
    """``backbone`` (in eval mode) with its batch norms folded into the convolutions before them
    (same outputs to ~1e-6), or as it is where torch.fx cannot trace it."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(backbone)
    except Exception as e:  # noqa: BLE001 - a backbone torch.fx cannot trace runs unfolded, as trained
        log.debug("%s not folded (%s: %s)", name, type(e).__name__, e)
        return backbone


def inference_copy_of_backbone(net: torch.nn.Module) -> torch.nn.Module:
    """A backbone for inference: eval mode, batch norms folded where torch.fx can trace it,
    channels-last weights (as :func:`inference_copy` does for each branch)."""
    return folded(net.eval(), "identity backbone").to(memory_format=torch.channels_last)


def inference_copy(net: AUNet) -> AUNet:
    """A copy of ``net`` for inference only: each branch's batch norms folded into the convolutions
    before them (same outputs to ~1e-6, one pass over each activation fewer), channels-last weights
    (crops arrive as NHWC, so no layout change in each conv). ``net`` itself stays as trained, for
    saving; the copy decides at ``net``'s own thresholds tensor (shared, not copied)."""
    import copy

    fused = copy.deepcopy(net).eval()
    for name, branch in fused.branches.items():
        fused.branches[name] = folded(branch, f"branch {name}")
    fused = fused.to(memory_format=torch.channels_last)
    fused.thresholds = net.thresholds
    return fused


def build_net(spec: dict, source: str | Path = "model spec") -> AUNet:
    """The network of a spec, with random weights (about to be overwritten by saved ones): the
    backbones' "random initialisation" lines would mislead about a trained model, so they are held back.
    The spec is checked first (:func:`check_spec`; ``source`` names it in the error)."""
    spec = check_spec(spec, source)
    backbones = logging.getLogger("lightning_modules.backbones")
    level = backbones.level
    backbones.setLevel(max(level, logging.WARNING))
    try:
        return AUNet(spec["aus"], spec["backbone"], spec["branches"], aux_heads=spec.get("aux_heads", False),
                     intensity=spec.get("intensity", False))
    finally:
        backbones.setLevel(level)


def checkpoint_card(ckpt: dict) -> str | None:
    """The model card a fit's checkpoint keeps with its best validation's files (its callbacks'
    state, :mod:`callbacks.mlflow_artifacts`), or None (a checkpoint of an untracked fit)."""
    for state in (ckpt.get("callbacks") or {}).values():
        files = ((state or {}).get("record") or {}).get("files") if isinstance(state, dict) else None
        if isinstance(files, dict) and isinstance(files.get(CARD_FILE), str):
            return files[CARD_FILE]
    return None


class ModelConfigError(ValueError):
    """A saved model's configuration (checkpoint hyperparameters, ``predictor.json``) is outside
    what this project builds: the message names the file and the field."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_crop_size(size, source: str | Path) -> int:
    """``size`` if it is a whole number within :data:`CROP_SIZES`, else a :class:`ModelConfigError`."""
    low, high = CROP_SIZES
    if not _is_int(size) or not low <= size <= high:
        raise ModelConfigError(f"{source}: alignment crop_size {size!r}: expected a whole number of pixels from "
                               f"{low} to {high} (224 in the paper)")
    return size


def check_spec(spec, source: str | Path) -> dict:
    """The network spec of a saved model (``aus``, ``backbone``, ``branches``, ``aux_heads``, ``intensity``),
    checked before anything is built: a backbone this project trains (:func:`check_backbone`), 1 to
    :data:`MAX_AUS` distinct AU numbers within :data:`AU_IDS`, a non-empty set of the known branches.
    Raises :class:`ModelConfigError` naming ``source`` and the field."""
    if not isinstance(spec, dict):
        raise ModelConfigError(f"{source}: net is a {type(spec).__name__}, not a mapping")
    for key in ("aus", "backbone", "branches"):
        if key not in spec:
            raise ModelConfigError(f"{source}: net has no {key!r}")
    aus, branches = spec["aus"], spec["branches"]
    if not isinstance(aus, (list, tuple)) or not 1 <= len(aus) <= MAX_AUS:
        got = f"{len(aus)} of them" if isinstance(aus, (list, tuple)) else f"a {type(aus).__name__}"
        raise ModelConfigError(f"{source}: net aus: expected a list of 1 to {MAX_AUS} AU numbers, got {got}")
    low, high = AU_IDS
    bad = [a for a in aus if not _is_int(a) or not low <= a <= high]
    if bad:
        raise ModelConfigError(f"{source}: net aus: {bad[:5]!r} not AU numbers ({low} to {high})")
    if len(set(aus)) != len(aus):
        raise ModelConfigError(f"{source}: net aus: {list(aus)} has duplicates")
    if not isinstance(branches, (list, tuple)) or not branches or len(set(branches)) != len(branches) \
            or not set(branches) <= set(BRANCHES):
        raise ModelConfigError(f"{source}: net branches {branches!r}: expected distinct names among {list(BRANCHES)}")
    try:
        check_backbone(spec["backbone"])
    except ValueError as e:
        raise ModelConfigError(f"{source}: net {e}") from None
    aux = spec.get("aux_heads", False)
    if not isinstance(aux, bool):
        raise ModelConfigError(f"{source}: net aux_heads {aux!r}: expected true or false")
    intensity = spec.get("intensity", False)
    if not isinstance(intensity, bool):
        raise ModelConfigError(f"{source}: net intensity {intensity!r}: expected true or false")
    return {"aus": [int(a) for a in aus], "backbone": spec["backbone"], "branches": list(branches), "aux_heads": aux,
            "intensity": intensity}


def check_thresholds(values, k: int, source: str | Path, field: str = "thresholds") -> None:
    """One decision threshold per AU, each a finite number in [0, 1]."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or not values.is_floating_point():
            raise ModelConfigError(f"{source}: {field}: a {values.dim()}-d {values.dtype} tensor, expected {k} floats")
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != k:
        n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ModelConfigError(f"{source}: {field}: {n} values, expected one per AU ({k})")
    bad = [v for v in values if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 <= v <= 1]
    if bad:
        raise ModelConfigError(f"{source}: {field}: {bad[:5]!r} outside [0, 1]")


def check_normalisation(mean, std, source: str | Path) -> None:
    """Three finite numbers each (RGB), every ``std`` above 0."""
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, (np.ndarray, torch.Tensor)):
            values = values.tolist()
        ok = isinstance(values, (list, tuple)) and len(values) == 3 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or (name == "std" and min(values) <= 0):
            raise ModelConfigError(f"{source}: {name} {values!r}: expected 3 finite numbers (RGB)"
                                   + (", above 0" if name == "std" else ""))


def read_config(path: Path) -> dict:
    """A ``predictor.json``, its sections checked (:func:`check_spec`, crop size, thresholds,
    normalisation) before a network is built from it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path}: not a readable predictor config ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: a {type(config).__name__}, not a mapping")
    missing = [k for k in ("net", "alignment", "mean", "std") if k not in config]
    if missing:
        raise ModelConfigError(f"{path}: no {missing} section")
    spec = check_spec(config["net"], path)
    if not isinstance(config["alignment"], dict):
        raise ModelConfigError(f"{path}: alignment is a {type(config['alignment']).__name__}, not a mapping")
    check_crop_size(config["alignment"].get("crop_size"), path)
    check_normalisation(config["mean"], config["std"], path)
    if "thresholds" in config:
        check_thresholds(config["thresholds"], len(spec["aus"]), path)
    return config


def saved_alignment(saved, detection: dict, source: str | Path = "saved alignment") -> AlignmentSettings:
    """The alignment a model was trained with (its crop size checked, :data:`CROP_SIZES`), with
    ``detection``'s overrides of the detection settings."""
    try:
        settings = AlignmentSettings.coerce(saved if isinstance(saved, (AlignmentSettings, dict)) else dict(saved))
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"{source}: alignment: {e}") from None
    check_crop_size(settings.crop_size, source)
    fixed = {"crop_size", "face_scale", "method", "version"} & {k for k, v in detection.items() if v is not None}
    if fixed:
        raise ValueError(f"alignment {sorted(fixed)} must stay as the model was trained; only detection settings "
                         "(detect_max_side, min_face_size, thresholds, batch_size) may change")
    changes = {k: (tuple(v) if k == "thresholds" else v) for k, v in detection.items() if v is not None}
    return AlignmentSettings(**{**asdict(settings), **changes}) if changes else settings


# -- rows: what a prediction reports, in au-detect predict's CSV and the MLflow model's answer --

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # MTCNN's order, image left/right
BASE_COLUMNS = ["source", "frame", "time_s", "face", "status", "message", "x0", "y0", "x1", "y1",
                *[f"{p}_{c}" for p in LANDMARKS for c in "xy"], "confidence"]


def columns(aus: Sequence[int], intensity: bool = False, person: bool = False) -> list[str]:
    """The CSV header: fixed columns (with ``person``, the person's id across a video's frames
    after ``face``), then each AU's probability, then each AU's decision, then with ``intensity``
    each AU's intensity (``AU12_intensity``)."""
    names = [au_column_name(a) for a in aus]
    base = BASE_COLUMNS if not person else [*BASE_COLUMNS[:4], "person", *BASE_COLUMNS[4:]]
    return base + [f"{n}_prob" for n in names] + names + ([f"{n}_intensity" for n in names] if intensity else [])


def face_record(source: str, frame: int | None, time_s: float | None, index: int, face: Face,
                aus: Sequence[int]) -> dict:
    record = {"source": source, "frame": frame, "time_s": time_s, "face": index, "status": OK, "message": "",
              "x0": face.box[0], "y0": face.box[1], "x1": face.box[2], "y1": face.box[3],
              "confidence": round(face.confidence, 5)}
    for name, (x, y) in zip(LANDMARKS, face.landmarks):
        record[f"{name}_x"], record[f"{name}_y"] = x, y
    for k in ("x0", "y0", "x1", "y1", *[f"{p}_{c}" for p in LANDMARKS for c in "xy"]):
        record[k] = round(float(record[k]), 1)
    for a, p, d in zip(aus, face.probs, face.decisions):
        name = au_column_name(a)
        record[f"{name}_prob"] = round(float(p), 5)
        record[name] = int(d)
    if face.intensities is not None:
        for a, i in zip(aus, face.intensities):
            record[f"{au_column_name(a)}_intensity"] = round(float(i), 3)
    return record


def status_record(source: str, status: str, message: str, frame: int | None = None,
                  time_s: float | None = None) -> dict:
    return {"source": source, "frame": frame, "time_s": time_s, "face": None, "status": status, "message": message}


def frame_records(frame: Frame, faces: list[Face] | None, aus: Sequence[int],
                  people: Sequence[int | None] | None = None) -> list[dict]:
    """The rows of one frame: one per face (with ``people``, each face's person id), or one
    saying why there is none."""
    source = frame.source.label
    if frame.error is not None:
        return [status_record(source, frame.error.status, str(frame.error), frame.frame, frame.time_s)]
    if not faces:
        return [status_record(source, NO_FACE, "no face detected", frame.frame, frame.time_s)]
    rows = [face_record(source, frame.frame, frame.time_s, i, f, aus) for i, f in enumerate(faces)]
    if people is not None:
        for row, person in zip(rows, people):
            row["person"] = person
    return rows
