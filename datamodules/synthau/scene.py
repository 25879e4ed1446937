"""SynthAU scenes: a rendered face in a larger picture, with the four challenges of the wild.

Pose, illumination, resolution and occlusion vary from scene to scene, and the face sits at a
varying position and scale (sometimes beside a smaller second face), so that detection and
alignment matter. Each scene also returns the ground-truth boxes and landmarks of its faces.
``render_posed_scene`` draws faces whose identity, AUs, pose, place and light the caller fixes
(the frames of the benchmark layouts, :mod:`datamodules.synthau.layouts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from datamodules.synthau.face import FaceSpec, Identity, render_face, rgb8
from datamodules.synthau.labels import sample_aus


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cluttered, smooth-ish backgrounds: gradients, blurred shapes and texture noise (RGB uint8)."""
    c0, c1 = rng.uniform(0.1, 0.95, 3), rng.uniform(0.1, 0.95, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.uniform() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = ((1 - t) * c0 + t * c1) * 255 * np.ones((h, w, 3))
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        color = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if rng.uniform() < 0.5:
            p0 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            p1 = (int(p0[0] + rng.uniform(-200, 200)), int(p0[1] + rng.uniform(-200, 200)))
            cv2.rectangle(img, p0, p1, color, -1)
        else:
            cv2.circle(img, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.uniform(10, 90)), color, -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(1.0, 6.0))
    noise = rng.normal(0, rng.uniform(2, 10), (h, w, 1))
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _occlude(rng: np.random.Generator, img: np.ndarray, box: np.ndarray, lm: np.ndarray, skin) -> str:
    """Draw one occluder over part of the face; returns its kind."""
    x0, y0, x1, y1 = box
    fw = x1 - x0
    kind = str(rng.choice(["hand", "glasses", "hat", "scarf", "object"], p=[0.3, 0.25, 0.15, 0.15, 0.15]))
    if kind == "hand":
        mouth = lm[3:5].mean(0)
        c = mouth + rng.uniform(-0.25, 0.25, 2) * fw + np.array([0, 0.2 * fw])
        axes = (int(fw * rng.uniform(0.22, 0.32)), int(fw * rng.uniform(0.16, 0.24)))
        cv2.ellipse(img, tuple(int(v) for v in c), axes, rng.uniform(0, 180), 0, 360, rgb8(skin, 0.95), -1, cv2.LINE_AA)
    elif kind == "glasses":
        tint = rng.uniform() < 0.3  # sunglasses hide the eyes; clear frames do not
        for e in lm[:2]:
            r = int(0.17 * fw)
            if tint:
                cv2.circle(img, tuple(int(v) for v in e), r, (25, 25, 30), -1, cv2.LINE_AA)
            cv2.circle(img, tuple(int(v) for v in e), r, (20, 20, 20), max(1, int(0.025 * fw)), cv2.LINE_AA)
        cv2.line(img, tuple(int(v) for v in lm[0]), tuple(int(v) for v in lm[1]), (20, 20, 20), max(1, int(0.02 * fw)), cv2.LINE_AA)
    elif kind == "hat":
        top = int(min(lm[0][1], lm[1][1]) - 0.45 * fw)
        cv2.rectangle(img, (int(x0 - 0.2 * fw), top - int(0.5 * fw)), (int(x1 + 0.2 * fw), top),
                      tuple(int(v) for v in rng.uniform(0, 200, 3)), -1)
    elif kind == "scarf":
        chin = int(y1 - 0.12 * fw)
        cv2.rectangle(img, (int(x0 - 0.1 * fw), chin), (int(x1 + 0.1 * fw), int(y1 + 0.6 * fw)),
                      tuple(int(v) for v in rng.uniform(0, 255, 3)), -1)
    else:
        side = rng.choice([-1, 1])
        edge = x0 + 0.2 * fw if side < 0 else x1 - 0.2 * fw
        cv2.rectangle(img, (int(edge - 0.6 * fw), int(y0 - 0.2 * fw)), (int(edge), int(y1 + 0.2 * fw))
                      if side < 0 else (int(edge), int(y0 - 0.2 * fw)), tuple(int(v) for v in rng.uniform(0, 255, 3)), -1)
        if side > 0:
            cv2.rectangle(img, (int(edge), int(y0 - 0.2 * fw)), (int(edge + 0.6 * fw), int(y1 + 0.2 * fw)),
                          tuple(int(v) for v in rng.uniform(0, 255, 3)), -1)
    return kind


def _paste(scene: np.ndarray, face: np.ndarray, alpha: np.ndarray, lm: np.ndarray, center, size: float):
    """Scale the face canvas so the head is ``size`` px tall and paste it centered at ``center``."""
    canvas = face.shape[0]
    k = size / (canvas * 0.68)
    M = np.array([[k, 0, center[0] - k * canvas / 2], [0, k, center[1] - k * canvas / 2]])
    h, w = scene.shape[:2]
    warped = cv2.warpAffine(face, M, (w, h), flags=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    a = cv2.warpAffine(alpha, M, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    scene[:] = (scene * (1 - a) + warped * a).astype(np.uint8)
    return lm * k + M[:, 2], k


def _face_box(lm: np.ndarray) -> np.ndarray:
    """A face box from the 5 landmarks, in the proportions detectors use (brows to chin)."""
    eye_c = lm[:2].mean(0)
    mouth_c = lm[3:5].mean(0)
    d = np.linalg.norm(mouth_c - eye_c)
    c = eye_c + 0.45 * (mouth_c - eye_c)
    half = 1.1 * d
    return np.array([c[0] - half, c[1] - half * 1.05, c[0] + half, c[1] + half * 1.15])


@dataclass(frozen=True)
class PlacedFace:
    """A face whose every choice is the caller's: what it shows (identity, AU intensities, pose), where
    its center lies in the scene, how tall its head is in pixels, and the seed of its random detail
    (AU17's dimples), so that a face rendered frame after frame keeps the same dimples."""

    spec: FaceSpec
    center: tuple[float, float]
    head: float
    detail_seed: int | Sequence[int] = 0


def face_canvas(head: float) -> int:
    """The square canvas (a multiple of 16, 64 to 256 px) on which a face ``head`` px tall is drawn at
    about its final size: a larger one only costs time (the head's shading is per pixel).

    >>> face_canvas(120), face_canvas(1000)
    (192, 256)
    """
    return int(min(256, max(64, 16 * math.ceil(head / 0.68 / 16))))


@dataclass
class Shot:
    """What stays fixed over a sequence's frames: backdrop, light (a unit vector and the ambient
    share), and the camera's colour gain and sensor noise (:func:`expose`)."""

    backdrop: np.ndarray
    light: np.ndarray
    ambient: float
    gain: np.ndarray
    noise: float


def light_from(azimuth: float, elevation: float) -> np.ndarray:
    """The unit vector of light from ``azimuth`` (left-right) and ``elevation`` (up), in radians."""
    return np.array([math.sin(azimuth) * math.cos(elevation), -math.sin(elevation),
                     math.cos(azimuth) * math.cos(elevation)])


def expose(img: np.ndarray, shot: Shot, rng: np.random.Generator) -> np.ndarray:
    """The camera's gain and sensor noise on a rendered RGB frame; returns BGR for OpenCV."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(shot.noise)
    out = img.astype(np.float32) * shot.gain.astype(np.float32) + noise
    return np.clip(out, 0, 255).astype(np.uint8)[..., ::-1]


def render_posed_scene(backdrop: np.ndarray, faces: Sequence[PlacedFace], light: np.ndarray,
                       ambient: float) -> tuple[np.ndarray, list[dict]]:
    """The faces drawn, in order, onto a copy of ``backdrop`` (RGB uint8), lit by ``light`` (a unit
    vector) with ``ambient`` light: nothing is drawn at random, so a sequence of frames can move the
    AUs and the pose and nothing else. Returns the scene and each face's ground-truth ``box`` and
    five ``landmarks`` (as ``render_scene`` gives them)."""
    scene = backdrop.copy()
    out = []
    for placed in faces:
        face, alpha, lm = render_face(placed.spec, face_canvas(placed.head), light, ambient,
                                      np.random.default_rng(placed.detail_seed))
        lms, _ = _paste(scene, face, alpha, lm, placed.center, placed.head)
        out.append({"box": _face_box(lms).round(1).tolist(), "landmarks": lms.round(1).tolist()})
    return scene, out


def render_scene(rng: np.random.Generator, identities: list[Identity], size: tuple[int, int] = (640, 480),
                 canvas: int = 256) -> tuple[np.ndarray, dict]:
    """One scene: background, the labelled face, sometimes a smaller second face, the wild's challenges."""
    w, h = size
    scene = background(rng, h, w)
    ident_idx = int(rng.integers(len(identities)))
    expression, intensity, unilateral = sample_aus(rng)
    spec = FaceSpec(identities[ident_idx], intensity, yaw=rng.uniform(-8, 8), pitch=rng.uniform(-6, 6),
                    roll=rng.uniform(-8, 8), unilateral=unilateral)
    # Illumination: direction, strength, colour cast.
    az, el = rng.uniform(-1.2, 1.2), rng.uniform(-0.4, 0.9)
    light = np.array([math.sin(az) * math.cos(el), -math.sin(el), math.cos(az) * math.cos(el)])
    ambient = rng.uniform(0.25, 0.7)
    face, alpha, lm = render_face(spec, canvas, light, ambient, rng)

    head = rng.uniform(0.3, 0.85) * h  # head height in px: resolution and scale vary
    margin = head * 0.55
    cx = rng.uniform(margin, w - margin) if w > 2 * margin else w / 2
    cy = rng.uniform(margin, h - margin) if h > 2 * margin else h / 2

    faces = []
    if rng.uniform() < 0.12:  # a smaller face elsewhere: detectors must pick the main one
        other = FaceSpec(identities[int(rng.integers(len(identities)))], sample_aus(rng)[1],
                         yaw=rng.uniform(-8, 8), roll=rng.uniform(-8, 8))
        f2, a2, lm2 = render_face(other, canvas, light, ambient, rng)
        size2 = head * rng.uniform(0.35, 0.55)
        cx2 = cx - head * 0.9 if cx > w / 2 else cx + head * 0.9
        cx2 = float(np.clip(cx2, size2 * 0.5, w - size2 * 0.5))
        cy2 = float(rng.uniform(size2 * 0.5, h - size2 * 0.5))
        lm2s, _ = _paste(scene, f2, a2, lm2, (cx2, cy2), size2)
        faces.append({"primary": False, "box": _face_box(lm2s).round(1).tolist(), "landmarks": lm2s.round(1).tolist()})
    lms, k = _paste(scene, face, alpha, lm, (cx, cy), head)
    box = _face_box(lms)
    faces.insert(0, {"primary": True, "box": box.round(1).tolist(), "landmarks": lms.round(1).tolist()})

    occlusion = None
    if rng.uniform() < 0.15:
        occlusion = _occlude(rng, scene, box, lms, spec.identity.skin)
    # Global illumination: exposure, contrast and colour cast of the camera.
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.85, 1.15, 3)
    scene = np.clip(scene.astype(np.float32) * gain + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    # Resolution: some scenes are shot small and blown up.
    low_res = rng.uniform() < 0.2
    if low_res:
        f = rng.uniform(2.0, 3.5)
        small = cv2.resize(scene, (int(w / f), int(h / f)), interpolation=cv2.INTER_AREA)
        scene = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    scene = np.clip(scene + rng.normal(0, rng.uniform(1, 6), scene.shape), 0, 255).astype(np.uint8)
    meta = {
        "identity": ident_idx, "expression": expression,
        "intensity": {str(k_): round(v, 3) for k_, v in intensity.items()},
        "pose": {"yaw": spec.yaw, "pitch": spec.pitch, "roll": spec.roll},
        "occlusion": occlusion, "low_res": low_res, "faces": faces,
    }
    return scene, meta
