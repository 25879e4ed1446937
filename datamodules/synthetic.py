"""SynthAU: a procedurally rendered AU data set, generated deterministically from a seed.

No AU data set may be shipped, so the project renders its own. Each face is a shaded 3-D
ellipsoid head with eyes, brows, nose and mouth whose geometry moves with the active AUs
(FACS): brows up for AU1/2, down and together for AU4, lids for AU5/43, cheeks for AU6, nose
wrinkle for AU9, upper lip for AU10, lip corners for AU12/15, chin for AU17, pucker for AU18,
stretch for AU20, press for AU24, lips apart for AU25, jaw drop for AU26, lip suck for AU28 and
head turn/tilt for AU51-56. Scenes carry the four challenges of the wild: pose, illumination,
resolution and occlusion, with the face at varying position and scale in a larger image.

The output is exactly the EmotioNet form (tab-separated manifests, image reference first, then
the AU columns with 0/1/999), plus identity and expression columns for the pretraining tasks and
the ground-truth boxes and landmarks of every face drawn (``faces.jsonl``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from datamodules.manifest import EMOTIONET_AUS, UNLABELLED, au_column_name

SYNTHAU_VERSION = 1
SPLITS = ("train", "val", "test")

# Prototype AU combinations of the basic emotions (after Ekman & Friesen's EMFACS tables,
# restricted to the EmotioNet-2020 AUs), each AU kept with probability p.
EXPRESSIONS: dict[str, dict[int, float]] = {
    "neutral": {},
    "happiness": {6: 0.85, 12: 0.95, 25: 0.6},
    "sadness": {1: 0.85, 4: 0.85, 15: 0.85, 17: 0.5},
    "surprise": {1: 0.9, 2: 0.9, 5: 0.85, 25: 0.9, 26: 0.85},
    "fear": {1: 0.85, 2: 0.85, 4: 0.85, 5: 0.85, 20: 0.85, 25: 0.85},
    "anger": {4: 0.9, 5: 0.7, 24: 0.85, 17: 0.3},
    "disgust": {9: 0.9, 10: 0.85, 15: 0.5, 17: 0.3},
    "contempt": {12: 0.9},  # unilateral: one lip corner only
}
EXPRESSION_PRIOR = {
    "neutral": 0.36, "happiness": 0.25, "sadness": 0.08, "surprise": 0.08,
    "fear": 0.05, "anger": 0.07, "disgust": 0.04, "contempt": 0.07,
}
# Spontaneous AUs outside any prototype, so AUs also occur alone and in odd combinations.
BACKGROUND_RATE = {
    1: 0.02, 2: 0.01, 4: 0.03, 5: 0.01, 6: 0.02, 9: 0.005, 10: 0.01, 12: 0.03, 15: 0.02,
    17: 0.03, 18: 0.02, 20: 0.01, 24: 0.02, 25: 0.12, 26: 0.04, 28: 0.012, 43: 0.03,
    51: 0.03, 52: 0.03, 53: 0.025, 54: 0.025, 55: 0.03, 56: 0.03,
}
EXCLUSIVE = ((51, 52), (53, 54), (55, 56), (43, 5))
# EmotioNet leaves many AUs unlabelled; head movements more often than the rest.
UNLABELLED_RATE = {51: 0.2, 52: 0.2, 53: 0.2, 54: 0.2, 55: 0.2, 56: 0.2}
UNLABELLED_RATE_DEFAULT = 0.07


@dataclass
class Identity:
    """Face shape and appearance that stay fixed for one synthetic person."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    lips: tuple[float, float, float]
    width: float
    height: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_open: float
    brow_y: float
    brow_thick: float
    brow_arch: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    hair_style: int
    hair_line: float
    beard: float
    ear_size: float


def sample_identity(rng: np.random.Generator) -> Identity:
    tone = rng.uniform(0, 1)
    # Skin tones from light to dark along a plausible axis (RGB, 0..1).
    light, dark = np.array([0.96, 0.80, 0.69]), np.array([0.36, 0.22, 0.15])
    skin = (1 - tone) * light + tone * dark + rng.normal(0, 0.02, 3)
    hair = np.array([rng.choice([0.08, 0.15, 0.3, 0.45, 0.6, 0.75])] * 3) * np.array([1.0, 0.85, 0.7])
    if rng.uniform() < 0.1:
        hair = np.array([0.7, 0.7, 0.72])  # grey
    iris = rng.choice([[0.25, 0.15, 0.08], [0.2, 0.35, 0.5], [0.25, 0.4, 0.25], [0.12, 0.08, 0.05]])
    lips = skin * np.array([0.85, 0.55, 0.55]) + np.array([0.08, 0.0, 0.02])
    return Identity(
        skin=tuple(np.clip(skin, 0, 1)), hair=tuple(np.clip(hair, 0, 1)), iris=tuple(iris),
        lips=tuple(np.clip(lips, 0, 1)),
        width=rng.uniform(0.9, 1.08), height=rng.uniform(1.25, 1.42),
        eye_dx=rng.uniform(0.36, 0.44), eye_y=rng.uniform(-0.2, -0.1), eye_w=rng.uniform(0.19, 0.24),
        eye_open=rng.uniform(0.8, 1.1), brow_y=rng.uniform(0.2, 0.27), brow_thick=rng.uniform(0.045, 0.085),
        brow_arch=rng.uniform(0.0, 0.06), nose_len=rng.uniform(0.36, 0.46), nose_w=rng.uniform(0.14, 0.2),
        mouth_y=rng.uniform(0.58, 0.68), mouth_w=rng.uniform(0.26, 0.33), lip_thick=rng.uniform(0.05, 0.09),
        hair_style=int(rng.integers(0, 4)), hair_line=rng.uniform(-1.05, -0.85),
        beard=float(rng.uniform(0, 1) < 0.15) * rng.uniform(0.3, 0.8), ear_size=rng.uniform(0.2, 0.27),
    )


@dataclass
class FaceSpec:
    """One face to draw: who, which AUs at which intensity, and its pose."""

    identity: Identity
    intensity: dict[int, float] = field(default_factory=dict)
    yaw: float = 0.0  # degrees, positive turns the nose towards image right (subject's left)
    pitch: float = 0.0  # degrees, positive raises the head
    roll: float = 0.0  # degrees, positive tilts the head top towards image right
    unilateral: bool = False

    def au(self, k: int) -> float:
        return self.intensity.get(k, 0.0)


def sample_aus(rng: np.random.Generator) -> tuple[str, dict[int, float], bool]:
    """Expression and active AUs (with intensities) of one face."""
    names = list(EXPRESSION_PRIOR)
    expression = names[rng.choice(len(names), p=np.array([EXPRESSION_PRIOR[n] for n in names]))]
    active = {au for au, p in EXPRESSIONS[expression].items() if rng.uniform() < p}
    active |= {au for au, p in BACKGROUND_RATE.items() if rng.uniform() < p}
    for a, b in EXCLUSIVE:
        if a in active and b in active:
            active.discard(b if rng.uniform() < 0.5 else a)
    if 26 in active and rng.uniform() < 0.9:
        active.add(25)
    if 28 in active:
        active -= {18, 25, 26}
    intensity = {au: float(rng.uniform(0.65, 1.0)) for au in sorted(active)}
    return expression, intensity, expression == "contempt"


# ----------------------------------------------------------------------------------------------
# Rendering


class _Projector:
    """Maps face-model coordinates (x right, y down, z towards the camera) onto a canvas."""

    def __init__(self, spec: FaceSpec, canvas: int):
        ident = spec.identity
        self.a = ident.width
        self.b_up = ident.height
        self.b_low = ident.height * (1.0 + 0.16 * spec.au(26))  # the jaw drops
        self.c = 0.95 * ident.width
        yaw = math.radians(spec.yaw + 28 * (spec.au(51) - spec.au(52)))
        pitch = math.radians(spec.pitch + 20 * (spec.au(53) - spec.au(54)))
        ry = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
        rx = np.array([[1, 0, 0], [0, math.cos(pitch), math.sin(pitch)], [0, -math.sin(pitch), math.cos(pitch)]])
        self.R = rx @ ry
        self.canvas = canvas
        self.scale = canvas / 4.2  # model units -> canvas pixels; the head is about 2.7 units tall
        self.center = np.array([(canvas - 1) / 2, canvas / 2 + 0.05 * self.scale])  # mirror-symmetric in pixels

    def surface_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        b = np.where(y < 0, self.b_up, self.b_low)
        return self.c * np.sqrt(np.clip(1 - (x / self.a) ** 2 - (y / b) ** 2, 0.02, None))

    def project(self, pts: np.ndarray, lift: float | np.ndarray = 0.0) -> np.ndarray:
        """(N,2) model points on the face surface (raised by ``lift``) -> (N,2) canvas pixels."""
        pts = np.asarray(pts, float).reshape(-1, 2)
        z = self.surface_z(pts[:, 0], pts[:, 1]) + lift
        p3 = np.stack([pts[:, 0], pts[:, 1], z], 1) @ self.R.T
        return p3[:, :2] * self.scale + self.center

    def head_shading(self, light: np.ndarray, ambient: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel Lambert shading and coverage of the head ellipsoid (two half-ellipsoids)."""
        n = self.canvas
        v, u = np.mgrid[0:n, 0:n].astype(np.float64)
        u = (u - self.center[0]) / self.scale
        v = (v - self.center[1]) / self.scale
        q0 = np.stack([u, v, np.zeros_like(u)], -1) @ self.R  # R^T applied to row vectors
        d = self.R[2]  # R^T e_z
        best_t = np.full(u.shape, -np.inf)
        normal = np.zeros(u.shape + (3,))
        for b, lower in ((self.b_up, False), (self.b_low, True)):
            with np.errstate(invalid="ignore"):
                D = np.array([1 / self.a**2, 1 / b**2, 1 / self.c**2])
                A = (d * d * D).sum()
                B = 2 * (q0 * d * D).sum(-1)
                C = (q0 * q0 * D).sum(-1) - 1
                disc = B * B - 4 * A * C
                ok = disc >= 0
                t = np.where(ok, (-B + np.sqrt(np.where(ok, disc, 0))) / (2 * A), -np.inf)
                hit = q0 + t[..., None] * d
                side = hit[..., 1] >= 0 if lower else hit[..., 1] < 0
                use = ok & side & (t > best_t)
                best_t = np.where(use, t, best_t)
                nrm = (hit * D) @ self.R.T
                normal = np.where(use[..., None], nrm, normal)
        cover = np.isfinite(best_t)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-9
        lambert = np.clip((normal * light).sum(-1), 0, None)
        shade = ambient + (1 - ambient) * lambert
        return shade, cover


def _poly(img: np.ndarray, pts: np.ndarray, color, shift: int = 4) -> None:
    cv2.fillPoly(img, [np.round(pts * (1 << shift)).astype(np.int32)], color, cv2.LINE_AA, shift)


def _line(img: np.ndarray, pts: np.ndarray, color, width: float, shift: int = 4) -> None:
    cv2.polylines(img, [np.round(pts * (1 << shift)).astype(np.int32)], False, color,
                  max(1, int(round(width))), cv2.LINE_AA, shift)


def _curve(p0, p1, bulge: float, n: int = 16) -> np.ndarray:
    """A quadratic curve from p0 to p1 whose middle is pushed by ``bulge`` (model units, +down)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    mid = (p0 + p1) / 2 + np.array([0.0, 2 * bulge])  # control point: the curve's middle moves by bulge
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t**2 * p1


def _col(rgb, k: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * k * 255, 0, 255)) for c in rgb)


def render_face(spec: FaceSpec, canvas: int, light: np.ndarray, ambient: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one face on a square canvas.

    Returns RGB uint8 (canvas, canvas, 3), alpha float32 (canvas, canvas) and the five
    landmarks (left eye, right eye, nose tip, left and right mouth corner, in image terms)
    as canvas pixels.
    """
    ident = spec.identity
    P = _Projector(spec, canvas)
    s = P.scale
    albedo = np.zeros((canvas, canvas, 3), np.uint8)
    alpha = np.zeros((canvas, canvas), np.uint8)
    skin = _col(ident.skin)

    # Hair behind the head and the neck.
    if ident.hair_style in (1, 3):
        back = P.project(np.array([[0.0, -0.2]]), lift=-1.2)[0]
        cv2.ellipse(albedo, tuple(int(v) for v in back), (int(1.2 * ident.width * s), int(1.45 * ident.height * s)),
                    0, 0, 360, _col(ident.hair, 0.8), -1, cv2.LINE_AA)
        cv2.ellipse(alpha, tuple(int(v) for v in back), (int(1.2 * ident.width * s), int(1.45 * ident.height * s)),
                    0, 0, 360, 255, -1, cv2.LINE_AA)
    neck = np.array([[-0.5, 0.6], [0.5, 0.6], [0.55, 2.2], [-0.55, 2.2]]) * [ident.width, 1]
    neck_px = P.project(neck, lift=-0.6)
    _poly(albedo, neck_px, _col(ident.skin, 0.78))
    _poly(alpha, neck_px, 255)
    for side in (-1, 1):  # ears
        ear = P.project(np.array([[side * ident.width * 0.98, 0.05]]), lift=-0.35)[0]
        axes = (int(ident.ear_size * 0.55 * s), int(ident.ear_size * s))
        cv2.ellipse(albedo, tuple(int(v) for v in ear), axes, 0, 0, 360, _col(ident.skin, 0.85), -1, cv2.LINE_AA)
        cv2.ellipse(alpha, tuple(int(v) for v in ear), axes, 0, 0, 360, 255, -1, cv2.LINE_AA)

    shade, cover = P.head_shading(light, ambient)
    head = np.zeros((canvas, canvas, 3), np.uint8)
    head[:] = skin
    albedo = np.where(cover[..., None], head, albedo)
    alpha = np.where(cover, 255, alpha).astype(np.uint8)
    face = albedo.copy()

    dark = _col(ident.skin, 0.55)
    line_w = max(1.0, 0.018 * s)
    # Beard shadow on the lower face.
    if ident.beard > 0:
        pts = np.concatenate([_curve([-0.95, 0.3], [0.95, 0.3], 0.0), _curve([0.95, 0.3], [-0.95, 0.3], 1.3)])
        overlay = face.copy()
        _poly(overlay, P.project(pts * [ident.width, 1]), _col(ident.hair, 0.9))
        face = cv2.addWeighted(overlay, ident.beard * 0.6, face, 1 - ident.beard * 0.6, 0)

    # Cheeks (AU6 raises and rounds them).
    au6 = spec.au(6)
    for side in (-1, 1):
        c = P.project(np.array([[side * 0.55, 0.22 - 0.08 * au6]]))[0]
        r = int((0.2 + 0.08 * au6) * s)
        overlay = face.copy()
        cv2.circle(overlay, tuple(int(v) for v in c), r, _col(ident.skin, 1.12 + 0.1 * au6), -1, cv2.LINE_AA)
        face = cv2.addWeighted(overlay, 0.5, face, 0.5, 0)
        if au6 > 0:  # crow's feet and the fold under the raised cheek
            for k in (-1, 0, 1):
                p0 = [side * (ident.eye_dx + ident.eye_w * 1.05), ident.eye_y + 0.05 * k]
                p1 = [side * (ident.eye_dx + ident.eye_w * 1.35), ident.eye_y + 0.09 * k]
                _line(face, P.project(np.array([p0, p1])), dark, line_w * au6)
            _line(face, P.project(_curve([side * 0.25, 0.18], [side * 0.7, 0.28], 0.06)), dark, line_w * au6)

    # Eyes.
    landmarks = []
    au5, au43 = spec.au(5), spec.au(43)
    opening = ident.eye_open * (1 + 0.9 * au5) * (1 - 0.97 * au43)
    for side in (-1, 1):
        cx, cy = side * ident.eye_dx, ident.eye_y
        w = ident.eye_w
        inner, outer = [cx - side * w, cy], [cx + side * w, cy - 0.01]
        up = -0.075 * opening
        low = 0.04 * opening * (1 - 0.6 * au6) if opening > 0.05 else 0.0
        upper = _curve(inner, outer, up)
        lower = _curve(outer, inner, low)
        almond = P.project(np.concatenate([upper, lower]), lift=0.02)
        eye = np.zeros_like(alpha)
        _poly(eye, almond, 255)
        sclera = face.copy()
        _poly(sclera, almond, (235, 235, 230))
        iris_c = P.project(np.array([[cx, cy + 0.01]]), lift=0.03)[0]
        cv2.circle(sclera, tuple(int(v) for v in iris_c), int(0.085 * s), _col(ident.iris), -1, cv2.LINE_AA)
        cv2.circle(sclera, tuple(int(v) for v in iris_c), int(0.04 * s), (15, 10, 10), -1, cv2.LINE_AA)
        cv2.circle(sclera, tuple(int(v + 0.02 * s) for v in iris_c), max(1, int(0.015 * s)), (250, 250, 250), -1, cv2.LINE_AA)
        m = (eye[..., None] / 255.0)
        face = (face * (1 - m) + sclera * m).astype(np.uint8)
        _line(face, P.project(upper, lift=0.02), (30, 22, 20), line_w * 2.2)  # lashes
        if opening > 0.05:
            _line(face, P.project(_curve(inner, outer, up - 0.07), lift=0.02), dark, line_w)  # lid crease
        landmarks.append(P.project(np.array([[cx, cy + 0.01]]), lift=0.03)[0])

    # Brows.
    au1, au2, au4 = spec.au(1), spec.au(2), spec.au(4)
    for side in (-1, 1):
        base = ident.eye_y - ident.brow_y
        inner = [side * (ident.eye_dx - ident.eye_w * 1.1 - 0.06 * au4), base - 0.16 * au1 + 0.09 * au4]
        outer = [side * (ident.eye_dx + ident.eye_w * 1.25), base + 0.04 - 0.16 * au2 + 0.04 * au4]
        arch = -ident.brow_arch - 0.05 * au1 * (1 - au4) + 0.03 * au4
        top = _curve(inner, outer, arch - 0.02)
        bottom = _curve(outer, inner, arch + ident.brow_thick)
        _poly(face, P.project(np.concatenate([top, bottom]), lift=0.03), _col(ident.hair, 0.7))
    if au4 > 0:  # the vertical furrows between lowered brows
        for dx in (-0.06, 0.06):
            base = ident.eye_y - ident.brow_y
            _line(face, P.project(np.array([[dx, base - 0.05], [dx * 0.6, base + 0.12]])), dark, line_w * 1.2 * au4)
    if au1 > 0:  # horizontal forehead lines
        base = ident.eye_y - ident.brow_y
        for k in range(2):
            _line(face, P.project(_curve([-0.3, base - 0.18 - 0.1 * k], [0.3, base - 0.18 - 0.1 * k], -0.03)),
                  dark, line_w * 0.8 * au1)

    # Nose.
    au9, au10 = spec.au(9), spec.au(10)
    nose_tip_y = ident.eye_y + ident.nose_len
    nw = ident.nose_w * (1 + 0.15 * au9)
    for side in (-1, 1):
        _line(face, P.project(_curve([side * 0.09, ident.eye_y + 0.05], [side * nw * 0.9, nose_tip_y - 0.06], 0.0)),
              _col(ident.skin, 0.8), line_w * 1.1)
        wing = _curve([side * nw * 0.55, nose_tip_y + 0.06 - 0.04 * au9], [side * nw * 1.05, nose_tip_y - 0.03 - 0.04 * au9], -0.06)
        _line(face, P.project(wing, lift=0.06), dark, line_w * 1.3)
        nostril = P.project(np.array([[side * nw * 0.5, nose_tip_y + 0.04 - 0.035 * au9]]), lift=0.08)[0]
        cv2.ellipse(face, tuple(int(v) for v in nostril), (max(1, int(0.05 * s)), max(1, int(0.028 * s))), 0, 0, 360,
                    _col(ident.skin, 0.35), -1, cv2.LINE_AA)
    tip = P.project(np.array([[0.0, nose_tip_y - 0.03]]), lift=0.22)[0]
    cv2.circle(face, tuple(int(v) for v in tip), max(1, int(0.06 * s)), _col(ident.skin, 1.15), -1, cv2.LINE_AA)
    if au9 > 0:  # wrinkles on the bridge
        for k in range(3):
            y = ident.eye_y + 0.06 + 0.05 * k
            _line(face, P.project(np.array([[-0.1, y], [0.1, y]]), lift=0.05), dark, line_w * au9)
    landmarks.append(P.project(np.array([[0.0, nose_tip_y]]), lift=0.25)[0])

    # Mouth.
    au12, au15, au17, au18, au20 = spec.au(12), spec.au(15), spec.au(17), spec.au(18), spec.au(20)
    au24, au25, au26, au28 = spec.au(24), spec.au(25), spec.au(26), spec.au(28)
    my = ident.mouth_y * (1 + 0.1 * au26) - 0.04 * au17
    half = ident.mouth_w * (1 + 0.3 * au20 + 0.15 * au12 - 0.4 * au18)
    thick = ident.lip_thick * (1 - 0.65 * au24) * (1 - 0.9 * au28) * (1 + 0.5 * au18) * (1 - 0.3 * au20)
    gap = 0.07 * au25 + 0.22 * au26
    corner_dy = {}
    for side in (-1, 1):
        pull = au12 if (not spec.unilateral or side == 1) else 0.0
        corner_dy[side] = -0.16 * pull + 0.12 * au15 + 0.02 * au20
    L = np.array([-half, my + corner_dy[-1]])
    R = np.array([half, my + corner_dy[1]])
    lift_mid = -0.06 * au10 - 0.02 * au17
    smile = -0.04 * (au12 - au15)  # the lip line curves up in a smile
    upper_line = _curve(L, R, lift_mid - gap * 0.3 + 0.5 * smile * 0 - 0.01)
    lower_line = _curve(L, R, lift_mid + gap * 0.7 + (0.03 * au12 if gap > 0 else 0.0))
    upper_top = _curve(L, R, lift_mid - gap * 0.3 - thick * 1.2 - 0.01)
    lower_bot = _curve(L, R, lift_mid + gap * 0.7 + thick * 1.5 + 0.02 * au12 - 0.02 * au15)
    if 24 in spec.intensity or 28 in spec.intensity or gap < 0.01:
        upper_line = _curve(L, R, lift_mid - 0.005 - 0.03 * au12 + 0.02 * au15)
        lower_line = upper_line.copy()
    mouth_open = np.concatenate([upper_line, lower_line[::-1]])
    if gap > 0.01:
        _poly(face, P.project(mouth_open, lift=0.02), (60, 20, 25))
        if au10 > 0 or au25 > 0:  # upper teeth
            teeth = np.concatenate([upper_line, _curve(R, L, lift_mid - gap * 0.3 + min(gap, 0.06))])
            _poly(face, P.project(teeth, lift=0.02), (225, 222, 210))
    _poly(face, P.project(np.concatenate([upper_top, upper_line[::-1]]), lift=0.04), _col(ident.lips))
    _poly(face, P.project(np.concatenate([lower_line, lower_bot[::-1]]), lift=0.04), _col(ident.lips, 1.08))
    _line(face, P.project(upper_line, lift=0.04), _col(ident.lips, 0.45), line_w * 1.2)
    if au10 > 0:  # deepened nasolabial folds
        for side in (-1, 1):
            fold = _curve([side * nw * 1.1, nose_tip_y], [side * (half + 0.07), my + 0.05], 0.0)
            _line(face, P.project(fold), dark, line_w * 1.5 * au10)
    if au17 > 0:  # the chin boss bulges and dimples
        cy = my + gap + thick * 1.5 + 0.18
        _line(face, P.project(_curve([-0.16, cy - 0.07], [0.16, cy - 0.07], -0.03)), dark, line_w * au17)
        for k in range(5):
            p = P.project(np.array([[rng.uniform(-0.12, 0.12), cy + rng.uniform(-0.02, 0.06)]]))[0]
            cv2.circle(face, tuple(int(v) for v in p), max(1, int(0.012 * s)), dark, -1, cv2.LINE_AA)
    if au18 > 0:  # radial pucker lines
        for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False):
            c = np.array([0.0, my])
            d = np.array([np.cos(ang), np.sin(ang) * 0.6])
            _line(face, P.project(np.array([c + d * (half + 0.02), c + d * (half + 0.08)])), dark, line_w * 0.8 * au18)
    if au20 > 0:  # the stretched corners pull the skin down and out
        for side in (-1, 1):
            c = R if side == 1 else L
            _line(face, P.project(np.array([c + [side * 0.03, 0.02], c + [side * 0.12, 0.14]])), dark, line_w * au20)
    landmarks += [P.project(L[None], lift=0.04)[0], P.project(R[None], lift=0.04)[0]]

    # Hair on top of the head.
    hl = ident.hair_line
    top = np.concatenate([
        _curve([-1.02 * ident.width, hl + 0.35], [1.02 * ident.width, hl + 0.35], -0.25 + 0.05 * ident.hair_style),
        _curve([1.02 * ident.width, hl + 0.35], [-1.02 * ident.width, hl + 0.35], -1.1),
    ])
    _poly(face, P.project(top * [1, 1], lift=0.06), _col(ident.hair))

    lit = (face.astype(np.float32) * np.where(cover, shade, ambient + 0.3 * (1 - ambient))[..., None])
    out = np.where(cover[..., None], lit, face.astype(np.float32) * (ambient + 0.5 * (1 - ambient)))
    out = np.clip(out, 0, 255).astype(np.uint8)
    out = np.where(alpha[..., None] > 0, out, 0).astype(np.uint8)

    # Head roll last, in the image plane.
    roll = spec.roll + 22 * (spec.au(55) - spec.au(56))
    M = cv2.getRotationMatrix2D((canvas / 2, canvas / 2), -roll, 1.0)
    out = cv2.warpAffine(out, M, (canvas, canvas), flags=cv2.INTER_LINEAR)
    alpha_f = cv2.warpAffine(alpha, M, (canvas, canvas), flags=cv2.INTER_LINEAR).astype(np.float32) / 255
    lm = np.array(landmarks)
    lm = lm @ M[:, :2].T + M[:, 2]
    return out, alpha_f, lm


# ----------------------------------------------------------------------------------------------
# Scenes


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cluttered, smooth-ish backgrounds: gradients, blurred shapes and texture noise."""
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
        cv2.ellipse(img, tuple(int(v) for v in c), axes, rng.uniform(0, 180), 0, 360, _col(skin, 0.95), -1, cv2.LINE_AA)
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
    """Scale the face canvas so the head is ``size`` px tall and paste it centred at ``center``."""
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


def render_scene(rng: np.random.Generator, identities: list[Identity], size: tuple[int, int] = (640, 480),
                 canvas: int = 256) -> tuple[np.ndarray, dict]:
    """One scene: background, the labelled face, sometimes a smaller second face, the wild's challenges."""
    w, h = size
    scene = _background(rng, h, w)
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


# ----------------------------------------------------------------------------------------------
# The data set on disk


@dataclass(frozen=True)
class SynthAUSettings:
    """Everything the generated files depend on; a change regenerates them."""

    num_images: int = 2000
    seed: int = 0
    num_identities: int = 120
    width: int = 640
    height: int = 480
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    version: int = SYNTHAU_VERSION


def _identities(settings: SynthAUSettings) -> list[Identity]:
    return [sample_identity(np.random.default_rng([settings.seed, 1_000_000 + i])) for i in range(settings.num_identities)]


def _labels(rng: np.random.Generator, intensity: dict[int, float], aus: tuple[int, ...]) -> list[int]:
    out = []
    for au in aus:
        if rng.uniform() < UNLABELLED_RATE.get(au, UNLABELLED_RATE_DEFAULT):
            out.append(UNLABELLED)
        else:
            out.append(int(au in intensity))
    return out


def _render_chunk(args: tuple[SynthAUSettings, list[tuple[int, str]], str]) -> list[dict]:
    settings, items, out_dir = args
    identities = _identities(settings)
    rows = []
    for index, split in items:
        rng = np.random.default_rng([settings.seed, index])
        scene, meta = render_scene(rng, identities, (settings.width, settings.height))
        name = f"images/{split}/{index:06d}.jpg"
        quality = int(rng.uniform(40, 96))  # compression is part of the resolution challenge
        if not cv2.imwrite(os.path.join(out_dir, name), scene[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"could not write {os.path.join(out_dir, name)}")
        meta.update(index=index, split=split, image=name, jpeg_quality=quality,
                    labels=_labels(rng, {int(k): v for k, v in meta["intensity"].items()}, EMOTIONET_AUS))
        rows.append(meta)
    return rows


def _split_of(settings: SynthAUSettings) -> list[str]:
    n = settings.num_images
    order = np.random.default_rng([settings.seed, 7]).permutation(n)
    n_val = int(round(n * settings.val_fraction))
    n_test = int(round(n * settings.test_fraction))
    split = ["train"] * n
    for i in order[:n_val]:
        split[i] = "val"
    for i in order[n_val:n_val + n_test]:
        split[i] = "test"
    return split


def write_manifest(path: Path, rows: list[dict]) -> None:
    """EmotioNet form: tab-separated, image first, then one column per AU, then the extras."""
    header = ["image"] + [au_column_name(a) for a in EMOTIONET_AUS] + ["identity", "expression"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join([r["image"], *map(str, r["labels"]), str(r["identity"]), r["expression"]]) + "\n")


def label_statistics(rows: list[dict]) -> dict:
    """Per-AU positive rate over labelled entries and the share of ``999`` labels."""
    y = np.array([r["labels"] for r in rows])
    labelled = y != UNLABELLED
    pos = (y == 1).sum(0) / np.maximum(labelled.sum(0), 1)
    return {
        "positive_rate": {au_column_name(a): round(float(p), 4) for a, p in zip(EMOTIONET_AUS, pos)},
        "unlabelled_share": round(float(1 - labelled.mean()), 4),
        "aus_under_5pct": int((pos < 0.05).sum()),
        "aus_over_20pct": int((pos > 0.2).sum()),
    }


def contact_sheet(root: Path, rows: list[dict], path: Path, cols: int = 6, n: int = 24, thumb: int = 240) -> None:
    """A grid of scenes, each captioned with its positive AUs (``?`` counts unlabelled AUs)."""
    tiles = []
    for r in rows[:n]:
        img = cv2.imread(str(root / r["image"]))
        h = int(thumb * img.shape[0] / img.shape[1])
        img = cv2.resize(img, (thumb, h), interpolation=cv2.INTER_AREA)
        for f in r["faces"]:  # the ground-truth box of the labelled face
            if f["primary"]:
                b = np.array(f["box"]) * thumb / r.get("width", 640)
                cv2.rectangle(img, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), (0, 255, 0), 1)
        caption = np.full((44, thumb, 3), 255, np.uint8)
        pos = [str(a) for a, v in zip(EMOTIONET_AUS, r["labels"]) if v == 1]
        unl = sum(v == UNLABELLED for v in r["labels"])
        cv2.putText(caption, f"{r['expression']}  ?x{unl}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(caption, "AU " + ",".join(pos) if pos else "no AU", (4, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (0, 0, 160), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([img, caption], 0))
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.concatenate([np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)], 0)
    cv2.imwrite(str(path), grid)


def au_gallery(path: Path, seed: int = 0) -> None:
    """One identity, frontal, each AU alone at full intensity: what the renderer does per AU."""
    ident = sample_identity(np.random.default_rng([seed, 1_000_000]))
    light = np.array([0.3, -0.3, 0.9]) / np.linalg.norm([0.3, -0.3, 0.9])
    tiles = []
    for au in (0,) + EMOTIONET_AUS:
        face, alpha, _ = render_face(FaceSpec(ident, {au: 1.0} if au else {}), 192, light, 0.45,
                                     np.random.default_rng(0))
        tile = (face * alpha[..., None] + 235 * (1 - alpha[..., None])).astype(np.uint8)
        cv2.putText(tile, au_column_name(au) if au else "neutral", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    grid = np.concatenate([np.concatenate(tiles[i:i + 8], 1) for i in range(0, 24, 8)], 0)
    cv2.imwrite(str(path), grid[..., ::-1])


def synthau_is_complete(root: Path, settings: SynthAUSettings) -> bool:
    marker = Path(root) / "synthau.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["settings"] == asdict(settings)
    except (ValueError, KeyError):
        return False


def generate_synthau(root: str | Path, settings: SynthAUSettings = SynthAUSettings(), workers: int | None = None,
                     force: bool = False) -> dict:
    """Render SynthAU into ``root`` (``images/``, ``{train,val,test}.tsv``, ``faces.jsonl``, sheets).

    Deterministic: the same settings give the same files whatever the number of workers, since
    every image draws from its own generator seeded by (seed, index). The files are written to a
    temporary folder that replaces ``root`` only once complete, so an interrupted run never leaves
    a data set that looks finished. ``synthau.json`` is written last and marks completion.
    Returns the summary stored in ``synthau.json``.
    """
    root = Path(root)
    if not force and synthau_is_complete(root, settings):
        return json.loads((root / "synthau.json").read_text())
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
        split_of = _split_of(settings)
        items = list(enumerate(split_of))
        workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        chunks = [items[i::max(1, workers * 4)] for i in range(max(1, workers * 4))]
        jobs = [(settings, c, str(tmp)) for c in chunks if c]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                rows = [r for part in pool.map(_render_chunk, jobs) for r in part]
        else:
            rows = [r for job in jobs for r in _render_chunk(job)]
        rows.sort(key=lambda r: r["index"])
        for r in rows:
            r["width"], r["height"] = settings.width, settings.height
        for split in SPLITS:
            write_manifest(tmp / f"{split}.tsv", [r for r in rows if r["split"] == split])
        with open(tmp / "faces.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        contact_sheet(tmp, [r for r in rows if r["split"] == "train"], tmp / "contact_sheet.png")
        au_gallery(tmp / "au_gallery.png", settings.seed)
        summary = {
            "settings": asdict(settings),
            "counts": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "identities": len({r["identity"] for r in rows}),
            "expressions": sorted({r["expression"] for r in rows}),
            "occluded": sum(r["occlusion"] is not None for r in rows),
            "low_res": sum(r["low_res"] for r in rows),
            "multi_face": sum(len(r["faces"]) > 1 for r in rows),
            **label_statistics(rows),
        }
        (tmp / "synthau.json").write_text(json.dumps(summary, indent=2))
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary
