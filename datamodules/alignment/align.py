"""Face alignment: MTCNN detection and a similarity transform onto a landmark template.

facenet-pytorch's MTCNN finds each face and its five landmarks (eyes, nose tip, mouth corners),
on a downscaled copy of the image and in batches (:class:`FaceDetector`). A least-squares
similarity transform (Umeyama) maps the landmarks of the chosen face onto a fixed template and
the face is cropped at ``crop_size`` (:func:`warp_face`). Training aligns once, offline, into a
crop cache (:mod:`datamodules.alignment.crop_cache`); prediction aligns each face the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from datamodules.alignment.mtcnn_cascade import detect_batch, follow_batch, propose_batch

# How faces bigger than the crop are shrunk (see warp_face); part of the cache key, and kept by
# checkpoints so that prediction crops exactly as their training did.
ALIGNMENT_VERSION = 2
# ArcFace's 5-point template for 112x112 crops (eyes, nose tip, mouth corners), in [0, 1].
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
) / 112.0


METHODS = ("mtcnn", "box", "center")
# Crop sizes a model is built for: the paper aligns at 224; 512 px already costs ResNet-152 5x its
# compute, and a typo'd 20000 would allocate until killed (the bound saved models are checked against too).
CROP_SIZES = (16, 512)


@dataclass(frozen=True)
class AlignmentSettings:
    """How faces are found and cropped. Any change invalidates the cache.

    Args:
        crop_size: side of the square aligned crop (224 in the paper; smaller for quick runs).
        face_scale: how much of the crop the template's landmarks span. ArcFace's template
            (1.0) cuts off brows and chin, which carry AUs 1, 2, 4 and 17; 0.75 keeps them.
        detect_max_side: images whose longer side exceeds this are detected on a downscaled
            copy and the landmarks mapped back; this is where most of the speed comes from.
        min_face_size: smallest face MTCNN looks for, in pixels of the detection copy (24 there
            is 48 px in a 640 px photo; smaller faces carry too little for AU analysis, and the
            pyramid levels that find them are the most expensive).
        thresholds: MTCNN's P-, R- and O-net score thresholds.
        selection: which face to keep when there are several: ``largest`` or ``confidence``.
        batch_size: detection copies per MTCNN call (same-shape copies are batched together).
        method: ``mtcnn`` (detect, then warp the five landmarks onto the template), ``box``
            (detect, then the face box squared around its center and resized, no landmark warp:
            what a pipeline without alignment does; the box spans ``face_scale`` of the crop) or
            ``center``: no detection, every crop is the image's center square resized to
            ``crop_size`` (for data already cropped to the face).
    """

    crop_size: int = 112
    face_scale: float = 0.75
    detect_max_side: int = 320
    min_face_size: int = 24
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    selection: str = "largest"
    batch_size: int = 32
    method: str = "mtcnn"
    version: int = ALIGNMENT_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"alignment method must be one of {METHODS}, got {self.method!r}")
        if self.selection not in ("largest", "confidence"):
            raise ValueError(f"alignment selection must be 'largest' or 'confidence', got {self.selection!r}")
        if not CROP_SIZES[0] <= self.crop_size <= CROP_SIZES[1]:
            raise ValueError(f"alignment crop_size must be {CROP_SIZES[0]} to {CROP_SIZES[1]} pixels, "
                             f"got {self.crop_size}")

    @classmethod
    def coerce(cls, value: "AlignmentSettings | dict") -> "AlignmentSettings":
        """Settings from themselves or from a mapping (a config or a report: lists for tuples)."""
        if isinstance(value, cls):
            return value
        return cls(**{k: tuple(v) if k == "thresholds" else v for k, v in dict(value).items()})

    def template(self) -> np.ndarray:
        """The five target landmarks in crop pixels."""
        center = np.array([0.5, 0.5])
        return (center + (ARCFACE_TEMPLATE - center) * self.face_scale) * self.crop_size

    def cache_fields(self) -> dict:
        """The settings that change the crops (batch size does not)."""
        d = asdict(self)
        d.pop("batch_size")
        d["thresholds"] = list(d["thresholds"])
        return d


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` onto ``dst``.

    Umeyama (1991), without reflection. Returns the 2x3 matrix for ``cv2.warpAffine``.

    >>> src = np.array([[0., 0.], [1., 0.], [0., 1.]])
    >>> np.round(similarity_transform(src, 2 * src + 3), 6)
    array([[2., 0., 3.],
           [0., 2., 3.]])
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    U, S, Vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        sign[-1] = -1
    R = U @ np.diag(sign) @ Vt
    scale = (S * sign).sum() / s.var(0).sum()
    t = mu_d - scale * R @ mu_s
    return np.hstack([scale * R, t[:, None]])


def warp_face(image: np.ndarray, landmarks: np.ndarray, settings: AlignmentSettings) -> np.ndarray:
    """Crop the face whose 5 landmarks are given onto the template (RGB uint8 in and out)."""
    return _warp(image, similarity_transform(landmarks, settings.template()), settings)


def box_crop(image: np.ndarray, box: Sequence[float], settings: AlignmentSettings) -> np.ndarray:
    """The face box ``x0 y0 x1 y1`` squared around its center, widened so that it spans
    ``face_scale`` of the crop, and resized to ``crop_size`` (no rotation: the ``box`` method).

    >>> s = AlignmentSettings(crop_size=20, face_scale=0.5, method="box")
    >>> image = np.zeros((100, 100, 3), np.uint8); image[40:60, 45:55] = 255   # a 10x20 "face"
    >>> crop = box_crop(image, [45, 40, 55, 60], s)
    >>> round(float(crop[10, :, 0].sum()) / 255, 1), round(float(crop[:, 10, 0].sum()) / 255, 1)  # half size, centered
    (5.0, 10.0)
    >>> [int(i) for i in np.flatnonzero(crop[10, :, 0])], [int(i) for i in np.flatnonzero(crop[:, 10, 0])][::9]
    ([7, 8, 9, 10, 11, 12], [5, 14])
    """
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    side = max(x1 - x0, y1 - y0, 1.0) / settings.face_scale
    scale = settings.crop_size / side
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # crop pixel centers (u + 0.5) map to image pixel centers: u = scale * (x + 0.5 - cx) + size/2 - 0.5
    half = settings.crop_size / 2 - 0.5
    M = np.array([[scale, 0.0, half - scale * (cx - 0.5)], [0.0, scale, half - scale * (cy - 0.5)]])
    return _warp(image, M, settings)


def crop_face(image: np.ndarray, box: Sequence[float], landmarks: np.ndarray, settings: AlignmentSettings) -> np.ndarray:
    """A detected face's crop as ``settings.method`` says: landmark warp (``mtcnn``) or box (``box``)."""
    if settings.method == "box":
        return box_crop(image, box, settings)
    return warp_face(image, landmarks, settings)


def _warp(image: np.ndarray, M: np.ndarray, settings: AlignmentSettings) -> np.ndarray:
    """``cv2.warpAffine`` of a ``crop_size`` square through ``M``, antialiased when it shrinks."""
    scale = float(np.sqrt(abs(np.linalg.det(M[:, :2]))))
    size = settings.crop_size
    if scale < 0.5 and settings.version < 2:
        # Version 1: the whole image area-resized to twice the crop's scale (slow for big images).
        f = min(1.0, 2 * scale)
        small = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        sx, sy = small.shape[1] / image.shape[1], small.shape[0] / image.shape[0]
        M = M @ np.array([[1 / sx, 0, 0], [0, 1 / sy, 0], [0, 0, 1]])
        image = small
    elif scale < 0.5:
        # Shrinking a big face straight through warpAffine aliases. The window the crop reads is
        # halved (2x2 means, cv2's fast exact-half path) until the crop samples at least every
        # other pixel of it; a face in a 12 MP photo costs a few halvings of its own window.
        halvings = int(np.ceil(np.log2(0.5 / scale)))
        while halvings > 1 and 2 ** halvings > min(image.shape[:2]):
            halvings -= 1  # a face far bigger than a tiny image: as much as the image allows
        step = 2 ** halvings
        x0, y0, x1, y1 = _read_window(M, size, image.shape[:2], margin=2 * step + 2)
        x1, y1 = x1 - (x1 - x0) % step, y1 - (y1 - y0) % step  # whole 2x2 blocks at every halving
        image = image[y0:y1, x0:x1]
        # Window pixel (u, v) -> image (u + x0, v + y0); after a halving pixel q is the mean of
        # pixels 2q and 2q + 1, centered on 2q + 0.5.
        M = M @ np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])
        for _ in range(halvings):
            h, w = image.shape[:2]
            image = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
            M = M @ np.array([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]])
    return cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _read_window(M: np.ndarray, size: int, shape: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """The image pixels (x0, y0, x1, y1) a ``size`` crop through ``M`` reads, widened by ``margin``
    (the area and bilinear kernels' reach) and clipped to the image."""
    corners = np.array([[-1, -1], [size, -1], [-1, size], [size, size]], np.float64)
    src = (corners - M[:, 2]) @ np.linalg.inv(M[:, :2]).T
    h, w = shape
    x0, y0 = np.clip(np.floor(src.min(0)).astype(int) - margin, 0, [w - 1, h - 1])
    x1, y1 = np.clip(np.ceil(src.max(0)).astype(int) + margin + 1, [x0 + 1, y0 + 1], [w, h])
    return int(x0), int(y0), int(x1), int(y1)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The fallback when no face is found: the largest square at the image's center, resized."""
    h, w = image.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return cv2.resize(image[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)


def detection_copy(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most ``max_side``, pad to a multiple of 32 for batching."""
    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    small = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else image
    sh, sw = small.shape[:2]
    ph, pw = -(-sh // 32) * 32, -(-sw // 32) * 32
    if (ph, pw) != (sh, sw):
        small = cv2.copyMakeBorder(small, 0, ph - sh, 0, pw - sw, cv2.BORDER_CONSTANT, value=0)
    return np.ascontiguousarray(small), f


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes.

    >>> box_iou([0, 0, 2, 2], [1, 0, 3, 2])
    0.3333333333333333
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@dataclass
class Detection:
    """All faces found in one image, in the image's own pixel coordinates."""

    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1
    scores: np.ndarray  # (n,)
    landmarks: np.ndarray  # (n, 5, 2)
    # (n,) in a followed frame: the index of the face of the frame before that each face continues
    # (-1: a face found anew, entering); None where the frame was detected whole.
    follows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def pick(self, selection: str = "largest") -> int:
        """Index of the face to keep: the largest box, or the most confident."""
        if selection == "confidence":
            return int(np.argmax(self.scores))
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(area))


# A face of the frame before that no face of this one overlaps this much is lost.
LOST_IOU = 0.3


class FaceDetector:
    """Batched MTCNN (facenet-pytorch) on downscaled copies, on the GPU when there is one.

    ``every``: in a video's consecutive frames, the whole cascade runs only on every ``every``-th
    one (and the first of each call); the frames between are followed (:func:`follow_batch`): each
    face of the frame before costs seven R-net crops and one O-net crop instead of the dozens of
    candidates P-net puts around it, most of detection's cost, while P-net's candidates away from
    the known faces (a face entering) still go through R- and O-net on that frame. A frame where a
    known face is not found again is detected whole. ``counts`` tallies frames detected whole,
    followed, and lost (followed, then detected whole).
    """

    def __init__(self, settings: AlignmentSettings = AlignmentSettings(), device: str | torch.device | None = None,
                 every: int = 1):
        from facenet_pytorch import MTCNN

        if every < 1:
            raise ValueError(f"detect_every must be at least 1, got {every}")
        self.settings = settings
        self.every = every
        self.counts = {"whole": 0, "followed": 0, "lost": 0}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mtcnn = MTCNN(min_face_size=settings.min_face_size, thresholds=list(settings.thresholds),
                           keep_all=True, select_largest=False, post_process=False, device=self.device)
        # The cascade's inputs are NHWC images: channels-last nets take them without a layout change.
        for net in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet):
            net.to(memory_format=torch.channels_last)

    @staticmethod
    def _mapped(found, factors: Sequence[float]) -> list[Detection]:
        return [Detection(b.double().numpy() / f, s.double().numpy(), p.double().numpy() / f,
                          rest[0].numpy() if rest else None) for (b, s, p, *rest), f in zip(found, factors)]

    @torch.inference_mode()
    def detect_copies(self, copies: Sequence[np.ndarray], factors: Sequence[float]) -> list[Detection]:
        """Detect on same-shape detection copies; landmarks mapped back by their factors."""
        batch = torch.from_numpy(np.stack(copies)).to(self.device)
        found = detect_batch(batch, self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet, self.settings.min_face_size,
                             self.settings.thresholds, self.mtcnn.factor)
        self.counts["whole"] += len(copies)
        return self._mapped(found, factors)

    @torch.inference_mode()
    def follow_copy(self, copy: np.ndarray, factor: float, prior: Detection, proposals: torch.Tensor) -> Detection:
        """The faces of one detection copy, knowing ``prior``'s (the frame before, in image pixels)
        and P-net's candidates on it (:meth:`propose_copies`); each says which of ``prior``'s it
        continues (``follows``)."""
        batch = torch.from_numpy(copy[None]).to(self.device)
        found = follow_batch(batch, [torch.from_numpy(prior.boxes * factor)], [proposals], self.mtcnn.rnet,
                             self.mtcnn.onet, self.settings.thresholds)
        self.counts["followed"] += 1
        return self._mapped(found, [factor])[0]

    @torch.inference_mode()
    def propose_copies(self, copies: Sequence[tuple[np.ndarray, float]], indices: Sequence[int]) -> dict:
        """P-net's candidates on ``copies[indices]`` (batched by shape), by index."""
        result: dict[int, torch.Tensor] = {}
        for idx in self._by_shape(copies, indices):
            batch = torch.from_numpy(np.stack([copies[i][0] for i in idx])).to(self.device)
            result.update(zip(idx, propose_batch(batch, self.mtcnn.pnet, self.settings.min_face_size,
                                                 self.settings.thresholds[0], self.mtcnn.factor)))
        return result

    def _by_shape(self, copies: Sequence[tuple[np.ndarray, float]], indices: Sequence[int]) -> Iterator[list[int]]:
        """``indices`` in batches of same-shape copies of at most ``batch_size``."""
        groups: dict[tuple, list[int]] = {}
        for i in indices:
            groups.setdefault(copies[i][0].shape, []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), self.settings.batch_size):
                yield idx[j:j + self.settings.batch_size]

    def _detect_whole(self, copies: Sequence[tuple[np.ndarray, float]], indices: Sequence[int]) -> list[Detection]:
        """Whole-image detection of ``copies[indices]``, batched by shape, in ``indices``' order."""
        result: dict[int, Detection] = {}
        for part in self._by_shape(copies, indices):
            result.update(zip(part, self.detect_copies([copies[i][0] for i in part], [copies[i][1] for i in part])))
        return [result[i] for i in indices]

    def detect(self, images: Sequence[np.ndarray], copies: Sequence[tuple[np.ndarray, float] | None] | None = None,
               follows: Sequence[bool] | None = None) -> list[Detection]:
        """Detect faces in full-size RGB images of any sizes (grouped by detection shape).

        ``copies`` may hold :func:`detection_copy` results made ahead (e.g. in decoding threads);
        the missing ones are made here. ``follows[i]``: image ``i`` is the frame after image
        ``i - 1`` in the same video (see ``every``).
        """
        copies = [c if c is not None else detection_copy(im, self.settings.detect_max_side)
                  for im, c in zip(images, copies or [None] * len(images))]
        follows = list(follows) if follows is not None else [False] * len(images)
        whole, run = [], 0
        for i, follow in enumerate(follows):
            run = run + 1 if follow and i > 0 else 0
            if run % self.every == 0:
                whole.append(i)
        result: list[Detection | None] = [None] * len(images)
        for i, d in zip(whole, self._detect_whole(copies, whole)):
            result[i] = d
        proposals = self.propose_copies(copies, [i for i, d in enumerate(result) if d is None])
        for i, d in enumerate(result):
            if d is None:  # a followed frame: its predecessor is done
                prior = result[i - 1]
                d = self.follow_copy(*copies[i], prior, proposals.pop(i))
                if not all(any(box_iou(p, q) >= LOST_IOU for q in d.boxes) for p in prior.boxes):
                    self.counts["lost"] += 1
                    d = self._detect_whole(copies, [i])[0]
                result[i] = d
        return result  # type: ignore[return-value]
