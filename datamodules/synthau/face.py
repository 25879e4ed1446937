"""SynthAU's face renderer: one face on a square canvas, its geometry moved by the active AUs.

Each face is a shaded 3-D ellipsoid head with eyes, brows, nose and mouth. The AUs move it as
FACS describes them: brows up for AU1/2, down and together for AU4, lids for AU5/43, cheeks for
AU6, nose wrinkle for AU9, upper lip for AU10, lip corners for AU12/15, chin for AU17, pucker for
AU18, stretch for AU20, press for AU24, lips apart for AU25, jaw drop for AU26, lip suck for AU28
and head turn/tilt for AU51-56. ``render_face`` draws the regions one after the other; the order
is part of the data set's bytes (strokes overlap, and the chin draws from the scene's generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np


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


def rgb8(rgb, k: float = 1.0) -> tuple[int, int, int]:
    """An RGB colour in 0..1, scaled by ``k`` (shadow below 1, highlight above), as 8-bit values."""
    return tuple(int(np.clip(c * k * 255, 0, 255)) for c in rgb)


# ----------------------------------------------------------------------------------------------
# Geometry and drawing primitives


def _head_turn(spec: FaceSpec) -> tuple[float, float]:
    """Yaw and pitch in degrees: the scene's pose plus AU51/52 (head turn left/right) and AU53/54 (head up/down)."""
    return spec.yaw + 28 * (spec.au(51) - spec.au(52)), spec.pitch + 20 * (spec.au(53) - spec.au(54))


class _Projector:
    """Maps face-model coordinates (x right, y down, z towards the camera) onto a canvas."""

    def __init__(self, spec: FaceSpec, canvas: int):
        ident = spec.identity
        self.a = ident.width
        self.b_up = ident.height
        self.b_low = ident.height * (1.0 + 0.16 * spec.au(26))  # AU26: the jaw drops, the lower head lengthens
        self.c = 0.95 * ident.width
        yaw, pitch = (math.radians(angle) for angle in _head_turn(spec))
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


# ----------------------------------------------------------------------------------------------
# Facial regions, in drawing order. Creases and wrinkles are drawn in ``dark`` (the skin in
# shadow) with strokes of ``line_w`` pixels, both fixed by render_face for the whole face.


def _draw_behind_head(albedo: np.ndarray, alpha: np.ndarray, P: _Projector, ident: Identity) -> None:
    """Hair behind the head, the neck and the ears, which the head then covers. No AU moves them."""
    s = P.scale
    if ident.hair_style in (1, 3):
        back = P.project(np.array([[0.0, -0.2]]), lift=-1.2)[0]
        cv2.ellipse(albedo, tuple(int(v) for v in back), (int(1.2 * ident.width * s), int(1.45 * ident.height * s)),
                    0, 0, 360, rgb8(ident.hair, 0.8), -1, cv2.LINE_AA)
        cv2.ellipse(alpha, tuple(int(v) for v in back), (int(1.2 * ident.width * s), int(1.45 * ident.height * s)),
                    0, 0, 360, 255, -1, cv2.LINE_AA)
    neck = np.array([[-0.5, 0.6], [0.5, 0.6], [0.55, 2.2], [-0.55, 2.2]]) * [ident.width, 1]
    neck_px = P.project(neck, lift=-0.6)
    _poly(albedo, neck_px, rgb8(ident.skin, 0.78))
    _poly(alpha, neck_px, 255)
    for side in (-1, 1):  # ears
        ear = P.project(np.array([[side * ident.width * 0.98, 0.05]]), lift=-0.35)[0]
        axes = (int(ident.ear_size * 0.55 * s), int(ident.ear_size * s))
        cv2.ellipse(albedo, tuple(int(v) for v in ear), axes, 0, 0, 360, rgb8(ident.skin, 0.85), -1, cv2.LINE_AA)
        cv2.ellipse(alpha, tuple(int(v) for v in ear), axes, 0, 0, 360, 255, -1, cv2.LINE_AA)


def _draw_beard(face: np.ndarray, P: _Projector, ident: Identity) -> np.ndarray:
    """Beard shadow on the lower face, blended by the identity's beard density. No AU moves it."""
    if ident.beard > 0:
        pts = np.concatenate([_curve([-0.95, 0.3], [0.95, 0.3], 0.0), _curve([0.95, 0.3], [-0.95, 0.3], 1.3)])
        overlay = face.copy()
        _poly(overlay, P.project(pts * [ident.width, 1]), rgb8(ident.hair, 0.9))
        face = cv2.addWeighted(overlay, ident.beard * 0.6, face, 1 - ident.beard * 0.6, 0)
    return face


def _draw_cheeks(face: np.ndarray, P: _Projector, spec: FaceSpec, dark, line_w: float) -> np.ndarray:
    """AU6 (cheek raiser): the cheeks rise and round, with crow's feet and a fold under each cheek."""
    ident, s = spec.identity, P.scale
    au6 = spec.au(6)
    for side in (-1, 1):
        c = P.project(np.array([[side * 0.55, 0.22 - 0.08 * au6]]))[0]
        r = int((0.2 + 0.08 * au6) * s)
        overlay = face.copy()
        cv2.circle(overlay, tuple(int(v) for v in c), r, rgb8(ident.skin, 1.12 + 0.1 * au6), -1, cv2.LINE_AA)
        face = cv2.addWeighted(overlay, 0.5, face, 0.5, 0)
        if au6 > 0:
            for k in (-1, 0, 1):
                p0 = [side * (ident.eye_dx + ident.eye_w * 1.05), ident.eye_y + 0.05 * k]
                p1 = [side * (ident.eye_dx + ident.eye_w * 1.35), ident.eye_y + 0.09 * k]
                _line(face, P.project(np.array([p0, p1])), dark, line_w * au6)
            _line(face, P.project(_curve([side * 0.25, 0.18], [side * 0.7, 0.28], 0.06)), dark, line_w * au6)
    return face


def _draw_eyes(face: np.ndarray, P: _Projector, spec: FaceSpec, dark,
               line_w: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """AU5 (upper lid raiser) widens the eyes, AU43 (eyes closed) shuts them; AU6 pushes the lower lids up.

    Returns the face and the two pupil landmarks (left, right in image terms).
    """
    ident, s = spec.identity, P.scale
    landmarks = []
    au5, au6, au43 = spec.au(5), spec.au(6), spec.au(43)
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
        eye = np.zeros(face.shape[:2], np.uint8)
        _poly(eye, almond, 255)
        sclera = face.copy()
        _poly(sclera, almond, (235, 235, 230))
        iris_c = P.project(np.array([[cx, cy + 0.01]]), lift=0.03)[0]
        cv2.circle(sclera, tuple(int(v) for v in iris_c), int(0.085 * s), rgb8(ident.iris), -1, cv2.LINE_AA)
        cv2.circle(sclera, tuple(int(v) for v in iris_c), int(0.04 * s), (15, 10, 10), -1, cv2.LINE_AA)
        cv2.circle(sclera, tuple(int(v + 0.02 * s) for v in iris_c), max(1, int(0.015 * s)), (250, 250, 250), -1, cv2.LINE_AA)
        m = (eye[..., None] / 255.0)
        face = (face * (1 - m) + sclera * m).astype(np.uint8)
        _line(face, P.project(upper, lift=0.02), (30, 22, 20), line_w * 2.2)  # lashes
        if opening > 0.05:  # a closed eye has no visible crease
            _line(face, P.project(_curve(inner, outer, up - 0.07), lift=0.02), dark, line_w)
        landmarks.append(P.project(np.array([[cx, cy + 0.01]]), lift=0.03)[0])
    return face, landmarks


def _draw_brows(face: np.ndarray, P: _Projector, spec: FaceSpec, dark, line_w: float) -> None:
    """AU1 (inner brow raiser) and AU2 (outer brow raiser) lift the brows, AU1 with forehead lines;
    AU4 (brow lowerer) pulls them down and together, with vertical furrows between them."""
    ident = spec.identity
    au1, au2, au4 = spec.au(1), spec.au(2), spec.au(4)
    for side in (-1, 1):
        base = ident.eye_y - ident.brow_y
        inner = [side * (ident.eye_dx - ident.eye_w * 1.1 - 0.06 * au4), base - 0.16 * au1 + 0.09 * au4]
        outer = [side * (ident.eye_dx + ident.eye_w * 1.25), base + 0.04 - 0.16 * au2 + 0.04 * au4]
        arch = -ident.brow_arch - 0.05 * au1 * (1 - au4) + 0.03 * au4
        top = _curve(inner, outer, arch - 0.02)
        bottom = _curve(outer, inner, arch + ident.brow_thick)
        _poly(face, P.project(np.concatenate([top, bottom]), lift=0.03), rgb8(ident.hair, 0.7))
    if au4 > 0:
        for dx in (-0.06, 0.06):
            base = ident.eye_y - ident.brow_y
            _line(face, P.project(np.array([[dx, base - 0.05], [dx * 0.6, base + 0.12]])), dark, line_w * 1.2 * au4)
    if au1 > 0:
        base = ident.eye_y - ident.brow_y
        for k in range(2):
            _line(face, P.project(_curve([-0.3, base - 0.18 - 0.1 * k], [0.3, base - 0.18 - 0.1 * k], -0.03)),
                  dark, line_w * 0.8 * au1)


def _nose_shape(spec: FaceSpec) -> tuple[float, float]:
    """The nose tip's height and the nose's half-width; AU9 (nose wrinkler) flares the wings."""
    ident = spec.identity
    return ident.eye_y + ident.nose_len, ident.nose_w * (1 + 0.15 * spec.au(9))


def _draw_nose(face: np.ndarray, P: _Projector, spec: FaceSpec, dark, line_w: float) -> np.ndarray:
    """AU9 (nose wrinkler): wider, raised wings and nostrils, wrinkles across the bridge.

    Returns the nose-tip landmark.
    """
    ident, s = spec.identity, P.scale
    au9 = spec.au(9)
    nose_tip_y, nw = _nose_shape(spec)
    for side in (-1, 1):
        _line(face, P.project(_curve([side * 0.09, ident.eye_y + 0.05], [side * nw * 0.9, nose_tip_y - 0.06], 0.0)),
              rgb8(ident.skin, 0.8), line_w * 1.1)
        wing = _curve([side * nw * 0.55, nose_tip_y + 0.06 - 0.04 * au9], [side * nw * 1.05, nose_tip_y - 0.03 - 0.04 * au9], -0.06)
        _line(face, P.project(wing, lift=0.06), dark, line_w * 1.3)
        nostril = P.project(np.array([[side * nw * 0.5, nose_tip_y + 0.04 - 0.035 * au9]]), lift=0.08)[0]
        cv2.ellipse(face, tuple(int(v) for v in nostril), (max(1, int(0.05 * s)), max(1, int(0.028 * s))), 0, 0, 360,
                    rgb8(ident.skin, 0.35), -1, cv2.LINE_AA)
    tip = P.project(np.array([[0.0, nose_tip_y - 0.03]]), lift=0.22)[0]
    cv2.circle(face, tuple(int(v) for v in tip), max(1, int(0.06 * s)), rgb8(ident.skin, 1.15), -1, cv2.LINE_AA)
    if au9 > 0:
        for k in range(3):
            y = ident.eye_y + 0.06 + 0.05 * k
            _line(face, P.project(np.array([[-0.1, y], [0.1, y]]), lift=0.05), dark, line_w * au9)
    return P.project(np.array([[0.0, nose_tip_y]]), lift=0.25)[0]


@dataclass
class _Mouth:
    """Where the lips lie once the AUs have moved them (model units)."""

    y: float  # height of the lip line
    half: float  # half-width, corner to center
    thick: float  # lip thickness
    gap: float  # how far the lips part
    left: np.ndarray  # corners, image left and right
    right: np.ndarray
    lift_mid: float  # how far the middle of the lips rises


def _mouth_shape(spec: FaceSpec) -> _Mouth:
    """The lips' geometry: AU10 (upper lip raiser) and AU17 (chin raiser) lift the middle, AU12 (lip
    corner puller, one side only when unilateral) raises and widens the corners, AU15 (lip corner
    depressor) lowers them, AU18 (lip pucker) narrows and thickens the lips, AU20 (lip stretcher)
    widens and thins them, AU24 (lip pressor) and AU28 (lip suck) thin them, AU25 (lips part) and
    AU26 (jaw drop) open them, AU26 also lowering the mouth."""
    ident = spec.identity
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
    lift_mid = -0.06 * spec.au(10) - 0.02 * au17
    return _Mouth(y=my, half=half, thick=thick, gap=gap, left=L, right=R, lift_mid=lift_mid)


def _draw_lips(face: np.ndarray, P: _Projector, spec: FaceSpec, mouth: _Mouth, line_w: float) -> None:
    """The lips as ``_mouth_shape`` placed them (AU10, 12, 15, 17, 18, 20, 24, 25, 26, 28); parted lips
    (AU25/26) show the mouth's inside, and upper teeth when AU10 or AU25 is active. A smile (AU12)
    curves the lip line up, AU15 down; pressed or sucked lips (AU24/28) meet in one line."""
    ident = spec.identity
    au10, au12, au15, au25 = spec.au(10), spec.au(12), spec.au(15), spec.au(25)
    L, R, gap, thick, lift_mid = mouth.left, mouth.right, mouth.gap, mouth.thick, mouth.lift_mid
    upper_line = _curve(L, R, lift_mid - gap * 0.3 - 0.01)
    lower_line = _curve(L, R, lift_mid + gap * 0.7 + (0.03 * au12 if gap > 0 else 0.0))
    upper_top = _curve(L, R, lift_mid - gap * 0.3 - thick * 1.2 - 0.01)
    lower_bot = _curve(L, R, lift_mid + gap * 0.7 + thick * 1.5 + 0.02 * au12 - 0.02 * au15)
    if 24 in spec.intensity or 28 in spec.intensity or gap < 0.01:
        upper_line = _curve(L, R, lift_mid - 0.005 - 0.03 * au12 + 0.02 * au15)
        lower_line = upper_line.copy()
    mouth_open = np.concatenate([upper_line, lower_line[::-1]])
    if gap > 0.01:
        _poly(face, P.project(mouth_open, lift=0.02), (60, 20, 25))
        if au10 > 0 or au25 > 0:
            teeth = np.concatenate([upper_line, _curve(R, L, lift_mid - gap * 0.3 + min(gap, 0.06))])
            _poly(face, P.project(teeth, lift=0.02), (225, 222, 210))
    _poly(face, P.project(np.concatenate([upper_top, upper_line[::-1]]), lift=0.04), rgb8(ident.lips))
    _poly(face, P.project(np.concatenate([lower_line, lower_bot[::-1]]), lift=0.04), rgb8(ident.lips, 1.08))
    _line(face, P.project(upper_line, lift=0.04), rgb8(ident.lips, 0.45), line_w * 1.2)


def _draw_nasolabial_folds(face: np.ndarray, P: _Projector, spec: FaceSpec, mouth: _Mouth, dark,
                           line_w: float) -> None:
    """AU10 (upper lip raiser) deepens the folds from the nose wings to beyond the mouth corners."""
    au10 = spec.au(10)
    if au10 > 0:
        nose_tip_y, nw = _nose_shape(spec)
        for side in (-1, 1):
            fold = _curve([side * nw * 1.1, nose_tip_y], [side * (mouth.half + 0.07), mouth.y + 0.05], 0.0)
            _line(face, P.project(fold), dark, line_w * 1.5 * au10)


def _draw_chin(face: np.ndarray, P: _Projector, spec: FaceSpec, mouth: _Mouth, rng: np.random.Generator, dark,
               line_w: float) -> None:
    """AU17 (chin raiser): the chin boss bulges under a crease and dimples. It sits below the lips,
    so parted lips (AU25) and the jaw drop (AU26, which also lengthens the lower head in
    ``_Projector``) carry it down. The dimples are the only draws from ``rng`` in a face."""
    s = P.scale
    au17 = spec.au(17)
    if au17 > 0:
        cy = mouth.y + mouth.gap + mouth.thick * 1.5 + 0.18
        _line(face, P.project(_curve([-0.16, cy - 0.07], [0.16, cy - 0.07], -0.03)), dark, line_w * au17)
        for k in range(5):
            p = P.project(np.array([[rng.uniform(-0.12, 0.12), cy + rng.uniform(-0.02, 0.06)]]))[0]
            cv2.circle(face, tuple(int(v) for v in p), max(1, int(0.012 * s)), dark, -1, cv2.LINE_AA)


def _draw_perioral_lines(face: np.ndarray, P: _Projector, spec: FaceSpec, mouth: _Mouth, dark,
                         line_w: float) -> None:
    """AU18 (lip pucker): radial lines around the lips; AU20 (lip stretcher): the stretched corners
    pull the skin down and out."""
    au18, au20 = spec.au(18), spec.au(20)
    if au18 > 0:
        for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False):
            c = np.array([0.0, mouth.y])
            d = np.array([np.cos(ang), np.sin(ang) * 0.6])
            _line(face, P.project(np.array([c + d * (mouth.half + 0.02), c + d * (mouth.half + 0.08)])), dark,
                  line_w * 0.8 * au18)
    if au20 > 0:
        for side in (-1, 1):
            c = mouth.right if side == 1 else mouth.left
            _line(face, P.project(np.array([c + [side * 0.03, 0.02], c + [side * 0.12, 0.14]])), dark, line_w * au20)


def _draw_hair(face: np.ndarray, P: _Projector, ident: Identity) -> None:
    """Hair on top of the head, over the forehead's edge. No AU moves it."""
    hl = ident.hair_line
    top = np.concatenate([
        _curve([-1.02 * ident.width, hl + 0.35], [1.02 * ident.width, hl + 0.35], -0.25 + 0.05 * ident.hair_style),
        _curve([1.02 * ident.width, hl + 0.35], [-1.02 * ident.width, hl + 0.35], -1.1),
    ])
    _poly(face, P.project(top, lift=0.06), rgb8(ident.hair))


def _light(face: np.ndarray, alpha: np.ndarray, shade: np.ndarray, cover: np.ndarray, ambient: float) -> np.ndarray:
    """Lambert shading on the head; hair, neck and ears off the ellipsoid get a flat share of the light."""
    lit = (face.astype(np.float32) * np.where(cover, shade, ambient + 0.3 * (1 - ambient))[..., None])
    out = np.where(cover[..., None], lit, face.astype(np.float32) * (ambient + 0.5 * (1 - ambient)))
    out = np.clip(out, 0, 255).astype(np.uint8)
    return np.where(alpha[..., None] > 0, out, 0).astype(np.uint8)


def _roll_head(out: np.ndarray, alpha: np.ndarray, landmarks: np.ndarray, spec: FaceSpec,
               canvas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AU55/56 (head tilt left/right) on top of the scene's roll. Roll turns within the image plane,
    so it is applied last, to the finished face, its alpha and its landmarks."""
    roll = spec.roll + 22 * (spec.au(55) - spec.au(56))
    M = cv2.getRotationMatrix2D((canvas / 2, canvas / 2), -roll, 1.0)
    out = cv2.warpAffine(out, M, (canvas, canvas), flags=cv2.INTER_LINEAR)
    alpha_f = cv2.warpAffine(alpha, M, (canvas, canvas), flags=cv2.INTER_LINEAR).astype(np.float32) / 255
    return out, alpha_f, landmarks @ M[:, :2].T + M[:, 2]


def render_face(spec: FaceSpec, canvas: int, light: np.ndarray, ambient: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one face on a square canvas.

    Returns RGB uint8 (canvas, canvas, 3), alpha float32 (canvas, canvas) and the five
    landmarks (left eye, right eye, nose tip, left and right mouth corner, in image terms)
    as canvas pixels. Head turn (AU51-54) and jaw drop (AU26) shape the projection itself.
    """
    ident = spec.identity
    P = _Projector(spec, canvas)
    albedo = np.zeros((canvas, canvas, 3), np.uint8)
    alpha = np.zeros((canvas, canvas), np.uint8)
    _draw_behind_head(albedo, alpha, P, ident)

    shade, cover = P.head_shading(light, ambient)
    head = np.zeros((canvas, canvas, 3), np.uint8)
    head[:] = rgb8(ident.skin)
    albedo = np.where(cover[..., None], head, albedo)
    alpha = np.where(cover, 255, alpha).astype(np.uint8)
    face = albedo.copy()

    dark = rgb8(ident.skin, 0.55)
    line_w = max(1.0, 0.018 * P.scale)
    face = _draw_beard(face, P, ident)
    face = _draw_cheeks(face, P, spec, dark, line_w)
    face, eyes = _draw_eyes(face, P, spec, dark, line_w)
    _draw_brows(face, P, spec, dark, line_w)
    nose_tip = _draw_nose(face, P, spec, dark, line_w)
    mouth = _mouth_shape(spec)
    _draw_lips(face, P, spec, mouth, line_w)
    _draw_nasolabial_folds(face, P, spec, mouth, dark, line_w)
    _draw_chin(face, P, spec, mouth, rng, dark, line_w)
    _draw_perioral_lines(face, P, spec, mouth, dark, line_w)
    _draw_hair(face, P, ident)

    out = _light(face, alpha, shade, cover, ambient)
    corners = [P.project(mouth.left[None], lift=0.04)[0], P.project(mouth.right[None], lift=0.04)[0]]
    return _roll_head(out, alpha, np.array(eyes + [nose_tip] + corners), spec, canvas)
