"""SynthAU rendered in the folders and label files of BP4D, DISFA and Aff-Wild2, as they are distributed.

Nobody may ship the field's benchmarks, so their importers, folds and cross-validation are run
on SynthAU written in each data set's own form (``au-detect synth --layout bp4d|disfa|affwild2``):

* ``bp4d``: ``AUCoding/AU_OCC/<subject>_<task>.csv`` (header ``0,1,2,4,...``: the frame number,
  then one 0/1/9 column per coded AU) and ``Sequences/<subject>/<task>/<frame:04d>.jpg``;
  subjects F001-F023 and M001-M018, tasks T1-T8.
* ``disfa``: ``ActionUnit_Labels/<SN>/<SN>_au<k>.txt`` (lines ``frame,intensity``, frame from 1,
  intensity 0-5) and one MJPG AVI per subject and camera,
  ``Videos_LeftCamera/LeftVideo<SN>_comp.avi`` and ``Video_RightCamera/RightVideo<SN>_Comp.avi``;
  subjects SN001-SN032 without SN014, SN015, SN019, SN020 and SN022.
* ``affwild2``: ``3rd_ABAW_Annotations/AU_Detection_Challenge/{Train_Set,Validation_Set}/<video>.txt``
  (header ``AU1,AU2,...``, then one line of 0/1, or of -1 for a frame nobody annotated, per video
  frame) and ``cropped_aligned/<video>/<line:05d>.jpg``, face crops of ``crop`` px.

Subject ids are those of the published protocols (:data:`datamodules.io.folds.PROTOCOLS`); a tree
with fewer subjects takes them from the protocol's three parts in turn, so that every fold keeps
test subjects. Each subject is one SynthAU identity (one face in all its frames). A sequence
(a BP4D task, a DISFA video, an Aff-Wild2 video) is a run of frames in which AU events rise
from nothing (onset), hold (apex) and fall back (offset), several per sequence, each drawing its
AUs from the expression prototypes of :mod:`datamodules.synthau.labels`, while the head drifts
a little. Frames of BP4D and DISFA are lab shots (a fixed scene per subject, small pose drift);
Aff-Wild2's are wild (a scene per video, more pose, light and camera noise).

Labels follow what was rendered. A rendered intensity ``v`` (0..1) is the FACS level
:func:`facs_level` (0 below 0.1, then A-E = 1-5 in steps of 0.18), and an AU under level A is
not drawn at all, so a label never names an AU that was not drawn, nor leaves out one that was:

* BP4D and Aff-Wild2 write occurrence: 1 for level 1 or more, else 0;
* DISFA writes the level (the field calls level 2 or more present).

The renderer draws EmotioNet's 23 AUs. The AUs it cannot draw are labelled from the rendered AU
whose look they share, so that their labels are learnable and co-occur as in the data sets:

* AU7 (lid tightener) = max(AU6, AU4): the renderer's AU6 pushes the lower lids up and AU4 presses
  the brows onto the eyes, the two ways it narrows an eye;
* AU14 (dimpler) = the one-sided lip-corner pull of contempt (AU12 on one side), FACS's contempt AU;
* AU23 (lip tightener) = AU24 (lip pressor): both draw as thinned, pressed lips.

BP4D's CSV carries its 22 coded AUs (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20,
22, 23, 24, 27, 28); AU11, 13, 16, 22 and 27 are never drawn and are 0 (or 9 where a whole frame
is not coded). BP4D's 12 AUs (:data:`datamodules.io.manifest.BP4D_AUS`) are among them. DISFA's 12
AUs are all drawn. Aff-Wild2's 12 take AU7 and AU23 as above.

The data sets' quirks, at small rates:

* BP4D: ``9`` (not coded) over 1-3 frames of some tasks, for one or two AUs or a whole row;
  frames on disk before and after each task's coded segment, absent from its CSV; frame numbers
  starting mid-task, file names zero-padded to 4 digits;
* DISFA: one subject (SN010 when rendered, as in the field's lists, else the last) whose label
  files are one line shorter than the other subjects' and than its own videos;
* Aff-Wild2: runs of ``-1`` lines, annotated lines whose crop is missing (no face found), and one
  two-person video (persons 0 and 1) with ``<video>_left`` / ``<video>_right`` annotation files
  and crop folders.

BP4D's 9s and Aff-Wild2's -1 runs and missing crops are always in the tree's first sequence, so
that even a tiny tree has each.

Beside the data set's own files, ``truth.jsonl`` holds one line per labelled frame: ``subject``,
``sequence`` (BP4D task; DISFA the subject; Aff-Wild2 the video) and ``frame`` as the label file
numbers them, ``image`` (its path, or null: a missing crop, or DISFA, whose frame is ``video_frame``
of ``video`` and ``right_video``), ``labels`` as written and ``intensity`` (the FACS level drawn)
per label-file AU, ``rendered`` (the renderer's intensities), ``unilateral``, ``identity``,
``pose``, ``box`` (the face box in the scene) and, for Aff-Wild2, ``split`` and ``video``.
``synthau_layout.json`` (settings and summary), written last, marks the tree complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from datamodules.io import files
from datamodules.io.folds import PROTOCOLS
from datamodules.io.manifest import BP4D_AUS, DISFA_AUS, au_column_name
from datamodules.synthau.face import FaceSpec, Identity, sample_identity
from datamodules.synthau.labels import EXCLUSIVE, sample_aus
from datamodules.synthau.scene import PlacedFace, Shot, background, expose, light_from, render_posed_scene

LAYOUTS = ("bp4d", "disfa", "affwild2")
LAYOUT_VERSION = 1
MARKER = "synthau_layout.json"
TRUTH = "truth.jsonl"

BP4D_CODED_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 22, 23, 24, 27, 28)
AFFWILD2_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)
BP4D_UNKNOWN = 9
AFFWILD2_UNANNOTATED = -1
BP4D_TASKS = tuple(f"T{k}" for k in range(1, 9))

BP4D_LABELS = "AUCoding/AU_OCC"
BP4D_IMAGES = "Sequences"
DISFA_LABELS = "ActionUnit_Labels"
DISFA_LEFT = "Videos_LeftCamera"
DISFA_RIGHT = "Video_RightCamera"
AFFWILD2_ANNOTATIONS = "3rd_ABAW_Annotations/AU_Detection_Challenge"
AFFWILD2_IMAGES = "cropped_aligned"
AFFWILD2_SPLITS = ("Train_Set", "Validation_Set")
AFFWILD2_CROP_MARGIN = 1.45  # crop side / face box side: brows to chin and a little around, as the crops show

# Subjects, sequences per subject and frames per sequence when the settings leave them out: every
# published subject, few frames, so that CI renders a whole protocol in well under a minute.
DEFAULTS: dict[str, dict[str, int]] = {
    "bp4d": {"subjects": 41, "sequences": 2, "frames": 10},
    "disfa": {"subjects": 27, "sequences": 1, "frames": 20},
    "affwild2": {"subjects": 20, "sequences": 1, "frames": 30},
}
# Lower edges of FACS levels A-E on the renderer's 0..1 intensity.
LEVEL_EDGES = (0.1, 0.28, 0.46, 0.64, 0.82)
HEAD_AUS = frozenset({51, 52, 53, 54, 55, 56})  # head movements: the pose drift stands for them
EVENT_EVERY = 8  # frames per AU event (at least two per sequence)
BP4D_UNCODED = (2, 1)  # frames on disk before and after each task's coded segment
UNKNOWN_SPAN_RATE = 0.25  # BP4D tasks with a few frames coded 9
UNANNOTATED_SPAN_RATE = 0.3  # Aff-Wild2 videos with a run of -1 lines
MISSING_CROP_RATE = 0.03  # Aff-Wild2 annotated lines whose crop is missing
DISFA_SHORT_SUBJECT = "SN010"
DISFA_CAMERA_YAW = 6.0  # degrees each camera sees the face turned, in opposite directions
_CODE = {name: 7_100_001 + i for i, name in enumerate(LAYOUTS)}  # keeps the layouts' random streams apart


@dataclass(frozen=True)
class LayoutSettings:
    """Everything a rendered layout depends on; ``None`` takes the layout's default (:data:`DEFAULTS`).

    ``subjects``: BP4D/DISFA subjects, up to all 41/27 published ids; Aff-Wild2 persons (two of
    them share the two-person video). ``sequences``: tasks per BP4D subject (1-8), videos per
    Aff-Wild2 person; DISFA has one video per subject. ``frames``: labelled frames per sequence
    (BP4D's coded segment, DISFA's label lines, Aff-Wild2's annotation lines). ``width`` and
    ``height``: the scene (BP4D images, DISFA video frames, the scene Aff-Wild2 crops come from).
    ``fps``: DISFA's videos. ``crop``: Aff-Wild2's face crops, in px.
    """

    layout: str = "bp4d"
    seed: int = 0
    subjects: int | None = None
    sequences: int | None = None
    frames: int | None = None
    width: int = 320
    height: int = 240
    fps: float = 20.0
    crop: int = 112
    version: int = LAYOUT_VERSION

    def resolved(self) -> LayoutSettings:
        """These settings with the layout's defaults filled in, checked; a ``ValueError`` says what is wrong."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: not one of {', '.join(LAYOUTS)}")
        values = {k: DEFAULTS[self.layout][k] if getattr(self, k) is None else int(getattr(self, k))
                  for k in ("subjects", "sequences", "frames")}
        limit = {"bp4d": len(PROTOCOLS["bp4d-3fold"].subjects), "disfa": len(PROTOCOLS["disfa-3fold"].subjects)}
        if values["subjects"] < 1 or values["subjects"] > limit.get(self.layout, 10_000):
            raise ValueError(f"{self.layout}: subjects must be 1 to {limit.get(self.layout, 10_000)}, "
                             f"got {values['subjects']}")
        most = {"bp4d": len(BP4D_TASKS), "disfa": 1}.get(self.layout, 100)
        if not 1 <= values["sequences"] <= most:
            raise ValueError(f"{self.layout}: sequences per subject must be 1 to {most}, got {values['sequences']}")
        if values["frames"] < 4:
            raise ValueError(f"{self.layout}: at least 4 frames per sequence, got {values['frames']}")
        if min(self.width, self.height) < 64 or self.crop < 16 or self.fps <= 0:
            raise ValueError(f"width and height must be at least 64, crop at least 16 and fps positive, got "
                             f"{self.width}x{self.height}, crop {self.crop}, fps {self.fps}")
        return replace(self, **values)


def facs_level(v: float) -> int:
    """The FACS intensity level 0-5 (0: absent, A-E = 1-5) of a rendered intensity ``v`` in 0..1.

    >>> tuple(facs_level(v) for v in (0.0, 0.09, 0.1, 0.3, 0.5, 0.7, 0.82, 1.0))
    (0, 0, 1, 2, 3, 4, 5, 5)
    """
    return int(np.searchsorted(LEVEL_EDGES, v, side="right"))


def layout_subjects(layout: str, count: int | None = None) -> list[str]:
    """The first ``count`` (default all) subject ids of BP4D or DISFA, taken from the published
    protocol's three parts in turn (part 1's first, part 2's first, part 3's first, part 1's
    second...), so that a small tree still has test subjects in every fold.

    >>> layout_subjects("disfa", 4)
    ['SN002', 'SN013', 'SN003', 'SN010']
    """
    parts = PROTOCOLS[f"{layout}-3fold"].parts
    order = [part[i] for i in range(max(map(len, parts))) for part in parts if i < len(part)]
    return order[:len(order) if count is None else count]


@dataclass(frozen=True)
class AUEvent:
    """One AU event: from frame ``start`` the AUs rise over ``onset`` frames to ``peak`` (0..1 per AU),
    hold for ``apex`` frames and fall back over ``offset`` frames. ``unilateral``: contempt's
    one-sided lip-corner pull."""

    start: int
    onset: int
    apex: int
    offset: int
    peak: dict[int, float]
    unilateral: bool = False
    expression: str = ""

    def weight(self, t: int) -> float:
        """The share of the peak at frame ``t``: 0 before and after, rising, 1 at the apex, falling.

        >>> tuple(round(AUEvent(1, 2, 1, 2, {}).weight(t), 2) for t in range(7))
        (0.0, 0.33, 0.67, 1.0, 0.67, 0.33, 0.0)
        """
        k = t - self.start
        if k < 0:
            return 0.0
        if k < self.onset:
            return (k + 1) / (self.onset + 1)
        k -= self.onset
        if k < self.apex:
            return 1.0
        k -= self.apex
        return 1 - (k + 1) / (self.offset + 1) if k < self.offset else 0.0


def sample_events(rng: np.random.Generator, frames: int) -> list[AUEvent]:
    """AU events over a sequence of ``frames``: one per :data:`EVENT_EVERY` frames (at least two),
    each an expression of :func:`datamodules.synthau.labels.sample_aus` (head movements left out,
    neutral faces drawn again) scaled to a peak of 0.3-1.0, so that every FACS level occurs."""
    events = []
    for _ in range(max(2, math.ceil(frames / EVENT_EVERY))):
        for _try in range(20):
            expression, intensity, unilateral = sample_aus(rng)
            peak = {au: v for au, v in intensity.items() if au not in HEAD_AUS}
            if peak:
                break
        scale = rng.uniform(0.45, 1.0)
        onset = int(rng.integers(1, min(12, max(1, frames // 5)) + 1))
        apex = int(rng.integers(1, min(30, max(1, frames // 4)) + 1))
        offset = int(rng.integers(1, min(12, max(1, frames // 5)) + 1))
        start = int(rng.integers(-onset, frames))
        events.append(AUEvent(start, onset, apex, offset, {au: round(v * scale, 3) for au, v in peak.items()},
                              unilateral, expression))
    return events


def frame_aus(events: Sequence[AUEvent], t: int) -> tuple[dict[int, float], bool]:
    """What the renderer draws at frame ``t``: the intensity of each AU at level A or more (the
    strongest event wins; of two AUs that cannot show together, the stronger) and whether the lip
    corners pull on one side only (a contempt event stronger than any smile)."""
    both: dict[int, float] = {}
    one_sided = 0.0
    for event in events:
        w = event.weight(t)
        if w <= 0:
            continue
        for au, peak in event.peak.items():
            if event.unilateral and au == 12:
                one_sided = max(one_sided, peak * w)
            else:
                both[au] = max(both.get(au, 0.0), peak * w)
    unilateral = one_sided > both.get(12, 0.0)
    if unilateral:
        both[12] = one_sided
    for a, b in EXCLUSIVE:
        if a in both and b in both:
            del both[b if both[a] >= both[b] else a]
    lips = [au for au in (18, 25, 26) if au in both]
    if 28 in both and lips:  # sucked lips are neither puckered nor parted
        if both[28] >= max(both[au] for au in lips):
            for au in lips:
                del both[au]
        else:
            del both[28]
    drawn = {au: round(v, 3) for au, v in sorted(both.items()) if facs_level(v) > 0}
    return drawn, unilateral and 12 in drawn


def label_intensity(drawn: dict[int, float], unilateral: bool, au: int) -> float:
    """The intensity an AU's label follows: the renderer's own, or for an AU it does not draw the
    rendered AU with its look (AU7 = max(AU6, AU4), AU14 = one-sided AU12, AU23 = AU24)."""
    if au == 7:
        return max(drawn.get(6, 0.0), drawn.get(4, 0.0))
    if au == 14:
        return drawn.get(12, 0.0) if unilateral else 0.0
    if au == 23:
        return drawn.get(24, 0.0)
    return drawn.get(au, 0.0)


def label_aus(layout: str) -> tuple[int, ...]:
    """The AU columns of a layout's label files, in order (BP4D: its 22 coded AUs)."""
    return {"bp4d": BP4D_CODED_AUS, "disfa": DISFA_AUS, "affwild2": AFFWILD2_AUS}[layout]


def layout_aus(layout: str) -> tuple[int, ...]:
    """The 12 AUs the field scores on a layout's data set."""
    return {"bp4d": BP4D_AUS, "disfa": DISFA_AUS, "affwild2": AFFWILD2_AUS}[layout]


# ----------------------------------------------------------------------------------------------
# What each job renders: one BP4D task, one DISFA subject (both cameras), one Aff-Wild2 video.


@dataclass(frozen=True)
class _Track:
    """One person's frames in one sequence, and the names the data set gives them."""

    subject: str  # as the label files name it: F001, SN001, an Aff-Wild2 annotation file's stem
    identity: int  # which SynthAU identity: the subject's place in the data set's full list, or the person
    sequence: str  # T1, the video
    index: int  # the sequence's number for this identity, from 0


@dataclass(frozen=True)
class _Job:
    settings: LayoutSettings
    out: str
    tracks: tuple[_Track, ...]
    split: str | None = None  # Aff-Wild2's Train_Set / Validation_Set
    video: str = ""  # Aff-Wild2: the video (two-person videos hold two tracks)
    first: bool = False  # the tree's first job carries every quirk
    short: bool = False  # DISFA: the subject whose label files are one line short


def _key(settings: LayoutSettings, *key: int) -> list[int]:
    """A generator's seed: no part is 0, since a seed ending in zeros draws what the same seed without them draws."""
    return [settings.seed, _CODE[settings.layout], *(k + 1 for k in key)]


def _rng(settings: LayoutSettings, *key: int) -> np.random.Generator:
    return np.random.default_rng(_key(settings, *key))


def _identity(settings: LayoutSettings, track: _Track) -> Identity:
    ident = sample_identity(_rng(settings, 3_000_000 + track.identity))
    return replace(ident, beard=0.0) if track.subject.startswith("F") and settings.layout == "bp4d" else ident


def _scene(rng: np.random.Generator, settings: LayoutSettings, wild: bool) -> Shot:
    backdrop = background(rng, settings.height, settings.width)
    az = rng.uniform(-1.1, 1.1) if wild else rng.uniform(-0.4, 0.4)
    el = rng.uniform(-0.3, 0.9) if wild else rng.uniform(0.1, 0.5)
    light = light_from(az, el)
    ambient = rng.uniform(0.3, 0.7) if wild else rng.uniform(0.45, 0.65)
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, 3) if wild else np.ones(3)
    return Shot(backdrop, light, ambient, gain, rng.uniform(1.0, 5.0) if wild else 1.5)


@dataclass
class _Plan:
    """One track's frames: AU events, head pose and place over time."""

    identity: Identity
    events: list[AUEvent]
    pose: np.ndarray  # (frames, 3): yaw, pitch, roll in degrees
    center: np.ndarray  # (frames, 2): the face's center in px
    head: float


def _drift(rng: np.random.Generator, n: int, dims: int, step: float, limit: float) -> np.ndarray:
    """A slow random walk around 0, within +-limit."""
    walk = np.cumsum(rng.normal(0, step, (n, dims)), 0)
    return np.clip(walk - walk.mean(0), -limit, limit)


def _plan(settings: LayoutSettings, track: _Track, frames: int, wild: bool, slot: tuple[int, int] = (0, 1)) -> _Plan:
    """A track's events and motion, from its own generator (the same whatever else is rendered).
    ``slot``: the face's place among the faces of its video (two-person videos side by side)."""
    rng = _rng(settings, track.identity, track.index)
    events = sample_events(rng, frames)
    w, h = settings.width, settings.height
    base = rng.uniform([-15, -10, -10], [15, 10, 10]) if wild else rng.uniform([-5, -4, -4], [5, 4, 4])
    pose = base + _drift(rng, frames, 3, 1.0 if wild else 0.5, 8.0 if wild else 3.0)
    head = h * (rng.uniform(0.35, 0.45) if slot[1] > 1 else rng.uniform(0.4, 0.6) if wild else rng.uniform(0.5, 0.6))
    cx = w * (slot[0] + 0.5) / slot[1] + rng.uniform(-0.05, 0.05) * w / slot[1]
    cy = h * rng.uniform(0.45, 0.55)
    center = np.array([cx, cy]) + _drift(rng, frames, 2, 1.5 if wild else 0.7, 8.0 if wild else 3.0)
    margin = 0.45 * head
    center[:, 0] = np.clip(center[:, 0], margin, w - margin)
    center[:, 1] = np.clip(center[:, 1], margin, h - margin)
    return _Plan(_identity(settings, track), events, pose, center, float(head))


def _placed(settings: LayoutSettings, track: _Track, plan: _Plan, t: int,
            yaw: float = 0.0, dx: float = 0.0) -> tuple[PlacedFace, dict[int, float], bool]:
    drawn, unilateral = frame_aus(plan.events, t)
    yw, pitch, roll = plan.pose[t]
    spec = FaceSpec(plan.identity, drawn, yaw=float(yw + yaw), pitch=float(pitch), roll=float(roll),
                    unilateral=unilateral)
    # The detail seed is the sequence's, so AU17's dimples stay put from frame to frame.
    seed = _key(settings, track.identity, track.index, 17)
    center = (float(plan.center[t, 0] + dx), float(plan.center[t, 1]))
    return PlacedFace(spec, center, plan.head, seed), drawn, unilateral


def _imwrite(path: Path, bgr: np.ndarray, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"could not write {path}")


def _levels(layout: str, drawn: dict[int, float], unilateral: bool) -> dict[str, int]:
    return {str(au): facs_level(label_intensity(drawn, unilateral, au)) for au in label_aus(layout)}


def _span(rng: np.random.Generator, frames: int, longest: int) -> range:
    length = int(rng.integers(1, max(1, min(longest, frames // 4)) + 1))
    start = int(rng.integers(0, frames - length + 1))
    return range(start, start + length)


def _render_bp4d(job: _Job) -> dict:
    """One task: every frame on disk as a JPEG, the coded segment's labels (with a few 9s)."""
    s, (track,) = job.settings, job.tracks
    before, after = BP4D_UNCODED
    total = before + s.frames + after
    scene = _scene(_rng(s, track.identity, 900), s, wild=False)  # one lab set-up per subject
    plan = _plan(s, track, total, wild=False)
    quirks = _rng(s, track.identity, track.index, 7)
    first = int(quirks.integers(1 + before, 5000))  # the coded segment starts mid-task
    unknown: dict[int, tuple[int, ...]] = {}
    if job.first or quirks.uniform() < UNKNOWN_SPAN_RATE:
        aus = BP4D_CODED_AUS if quirks.uniform() < 0.5 else tuple(
            int(a) for a in quirks.choice(BP4D_AUS, int(quirks.integers(1, 3)), replace=False))
        unknown = {k: aus for k in _span(quirks, s.frames, 3)}
    rows = []
    folder = Path(job.out) / BP4D_IMAGES / track.subject / track.sequence
    for t in range(total):
        placed, drawn, unilateral = _placed(s, track, plan, t)
        img, faces = render_posed_scene(scene.backdrop, [placed], scene.light, scene.ambient)
        frame = first - before + t
        name = f"{frame:04d}.jpg"
        _imwrite(folder / name, expose(img, scene, _rng(s, track.identity, track.index, 1000 + t)), 92)
        k = t - before
        if 0 <= k < s.frames:
            levels = _levels(s.layout, drawn, unilateral)
            labels = {au: BP4D_UNKNOWN if int(au) in unknown.get(k, ()) else int(v > 0) for au, v in levels.items()}
            rows.append(_row(track, frame, f"{BP4D_IMAGES}/{track.subject}/{track.sequence}/{name}", labels, levels,
                             drawn, unilateral, placed, faces[0]))
    return {"rows": rows, "images": total, "uncoded": total - s.frames}


def _open_video(path: Path, settings: LayoutSettings) -> cv2.VideoWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), settings.fps,
                             (settings.width, settings.height))
    if not writer.isOpened():
        raise OSError(f"could not open a video writer for {path}")
    return writer


def _render_disfa(job: _Job) -> dict:
    """One subject: both cameras' videos, frame by frame (a frame is written as soon as it is drawn);
    the right camera sees the face turned the other way, from a little further left."""
    s, (track,) = job.settings, job.tracks
    scene = _scene(_rng(s, track.identity, 900), s, wild=False)
    plan = _plan(s, track, s.frames, wild=False)
    shift = 0.06 * s.width
    right_backdrop = cv2.warpAffine(scene.backdrop, np.float32([[1, 0, -shift], [0, 1, 0]]), (s.width, s.height),
                                    borderMode=cv2.BORDER_REFLECT)
    right_scene = replace(scene, backdrop=right_backdrop)
    lines = s.frames - 1 if job.short else s.frames
    left_path = Path(job.out) / DISFA_LEFT / f"LeftVideo{track.subject}_comp.avi"
    right_path = Path(job.out) / DISFA_RIGHT / f"RightVideo{track.subject}_Comp.avi"
    rows = []
    left, right = _open_video(left_path, s), _open_video(right_path, s)
    try:
        for t in range(s.frames):
            placed, drawn, unilateral = _placed(s, track, plan, t, yaw=-DISFA_CAMERA_YAW)
            img, faces = render_posed_scene(scene.backdrop, [placed], scene.light, scene.ambient)
            left.write(expose(img, scene, _rng(s, track.identity, track.index, 1000 + t)))
            placed_r, _, _ = _placed(s, track, plan, t, yaw=DISFA_CAMERA_YAW, dx=-shift)
            img_r, _ = render_posed_scene(right_backdrop, [placed_r], scene.light, scene.ambient)
            right.write(expose(img_r, right_scene, _rng(s, track.identity, track.index, 2000 + t)))
            if t < lines:
                levels = _levels(s.layout, drawn, unilateral)
                row = _row(track, t + 1, None, levels, levels, drawn, unilateral, placed, faces[0])
                row.update(video=f"{DISFA_LEFT}/{left_path.name}", right_video=f"{DISFA_RIGHT}/{right_path.name}",
                           video_frame=t)
                rows.append(row)
    finally:
        left.release()
        right.release()
    return {"rows": rows, "images": 0, "videos": 2, "video_frames": s.frames}


def _aligned_crop(img: np.ndarray, face: dict, size: int) -> np.ndarray:
    """A face crop as Aff-Wild2 ships them: eyes level, the face centered with a margin around its box."""
    lm = np.array(face["landmarks"])
    box = np.array(face["box"])
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    angle = math.degrees(math.atan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0]))
    M = cv2.getRotationMatrix2D(center, angle, size / (AFFWILD2_CROP_MARGIN * (box[2] - box[0])))
    M[:, 2] += np.array([size / 2 - center[0], size / 2 - center[1]])
    return cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def _render_affwild2(job: _Job) -> dict:
    """One video: every person's crops (one or two per frame), annotation lines with -1 runs, and
    a few annotated lines whose crop is missing."""
    s = job.settings
    lead = job.tracks[0]
    scene = _scene(_rng(s, lead.identity, lead.index, 900), s, wild=True)
    plans = [_plan(s, tr, s.frames, wild=True, slot=(i, len(job.tracks))) for i, tr in enumerate(job.tracks)]
    unannotated, missing = [], []
    for i, track in enumerate(job.tracks):
        quirks = _rng(s, track.identity, track.index, 7)
        forced = job.first and i == 0
        span = _span(quirks, s.frames, 3) if forced or quirks.uniform() < UNANNOTATED_SPAN_RATE else range(0)
        free = [t for t in range(s.frames) if t not in span]
        gone = {t for t in free if quirks.uniform() < MISSING_CROP_RATE}
        if forced and not gone:
            gone = {free[int(quirks.integers(len(free)))]}
        unannotated.append(set(span))
        missing.append(gone)
    rows = []
    for t in range(s.frames):
        frame = [_placed(s, tr, plan, t) for tr, plan in zip(job.tracks, plans)]
        img, faces = render_posed_scene(scene.backdrop, [f[0] for f in frame], scene.light, scene.ambient)
        bgr = expose(img, scene, _rng(s, lead.identity, lead.index, 1000 + t))
        for i, (track, (placed, drawn, unilateral)) in enumerate(zip(job.tracks, frame)):
            name = f"{AFFWILD2_IMAGES}/{track.subject}/{t + 1:05d}.jpg"
            if t not in missing[i]:
                _imwrite(Path(job.out) / name, _aligned_crop(bgr, faces[i], s.crop), 90)
            levels = _levels(s.layout, drawn, unilateral)
            labels = {au: AFFWILD2_UNANNOTATED if t in unannotated[i] else int(v > 0) for au, v in levels.items()}
            row = _row(track, t + 1, None if t in missing[i] else name, labels, levels, drawn, unilateral, placed,
                       faces[i])
            row.update(split=job.split, video=job.video)
            rows.append(row)
    return {"rows": rows, "images": sum(s.frames - len(m) for m in missing)}


def _row(track: _Track, frame: int, image: str | None, labels: dict[str, int], levels: dict[str, int],
         drawn: dict[int, float], unilateral: bool, placed: PlacedFace, face: dict) -> dict:
    spec = placed.spec
    return {"subject": track.subject, "sequence": track.sequence, "frame": frame, "image": image,
            "labels": labels, "intensity": levels, "rendered": {str(k): v for k, v in drawn.items()},
            "unilateral": unilateral, "identity": track.identity,
            "pose": {"yaw": round(spec.yaw, 2), "pitch": round(spec.pitch, 2), "roll": round(spec.roll, 2)},
            "box": face["box"]}


_RENDER = {"bp4d": _render_bp4d, "disfa": _render_disfa, "affwild2": _render_affwild2}


def _render_job(job: _Job) -> dict:
    return _RENDER[job.settings.layout](job)


def _jobs(settings: LayoutSettings, out: str) -> list[_Job]:
    s = settings
    if s.layout in ("bp4d", "disfa"):
        everyone = sorted(PROTOCOLS[f"{s.layout}-3fold"].subjects)
        chosen = layout_subjects(s.layout, s.subjects)
        short = DISFA_SHORT_SUBJECT if DISFA_SHORT_SUBJECT in chosen else chosen[-1]
        tracks = [_Track(subject, everyone.index(subject), task if s.layout == "bp4d" else subject, q)
                  for subject in chosen for q, task in enumerate(BP4D_TASKS[:s.sequences])]
        return [_Job(s, out, (tr,), first=i == 0, short=s.layout == "disfa" and tr.subject == short)
                for i, tr in enumerate(tracks)]
    # Aff-Wild2: persons 0 and 1 share the first video, named <video>_left / <video>_right; the last
    # quarter of the persons are the validation set's.
    validation = s.subjects - math.ceil(s.subjects / 4) if s.subjects > 2 else s.subjects
    jobs = []
    for person in range(s.subjects):
        for q in range(s.sequences):
            if person == 1 and q == 0:
                continue
            number = len(jobs) + 1
            video = f"video{number}" if number % 4 == 0 else f"{number}-30-{s.width}x{s.height}"
            split = AFFWILD2_SPLITS[person >= validation]
            if person == 0 and q == 0 and s.subjects > 1:
                tracks = (_Track(f"{video}_left", 0, video, 0), _Track(f"{video}_right", 1, video, 0))
            else:
                tracks = (_Track(video, person, video, q),)
            jobs.append(_Job(s, out, tracks, split=split, video=video, first=not jobs))
    return jobs


def _write_labels(root: Path, settings: LayoutSettings, jobs: list[_Job], results: list[dict]) -> None:
    """The data set's own label files, from the rows the jobs rendered."""
    aus = [str(a) for a in label_aus(settings.layout)]
    by_track: dict[_Track, list[dict]] = {}
    for job, result in zip(jobs, results):
        for track in job.tracks:
            by_track[track] = [r for r in result["rows"] if r["subject"] == track.subject
                               and r["sequence"] == track.sequence]
    for job in jobs:
        for track in job.tracks:
            rows = by_track[track]
            if settings.layout == "bp4d":
                lines = ["0," + ",".join(aus)]
                lines += [",".join([str(r["frame"])] + [str(r["labels"][a]) for a in aus]) for r in rows]
                path = root / BP4D_LABELS / f"{track.subject}_{track.sequence}.csv"
                _write_lines(path, lines)
            elif settings.layout == "disfa":
                for a in aus:
                    _write_lines(root / DISFA_LABELS / track.subject / f"{track.subject}_au{a}.txt",
                                 [f"{r['frame']},{r['labels'][a]}" for r in rows])
            else:
                lines = [",".join(au_column_name(int(a)) for a in aus)]
                lines += [",".join(str(r["labels"][a]) for a in aus) for r in rows]
                _write_lines(root / AFFWILD2_ANNOTATIONS / str(job.split) / f"{track.subject}.txt", lines)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _summary(settings: LayoutSettings, jobs: list[_Job], results: list[dict]) -> dict:
    rows = [r for result in results for r in result["rows"]]
    aus = layout_aus(settings.layout)
    rates = {}
    for au in aus:
        values = [r["labels"][str(au)] for r in rows]
        if settings.layout == "disfa":  # the field's rule: level 2 or more is present
            known = [v >= 2 for v in values]
        else:
            known = [v == 1 for v in values if v in (0, 1)]
        rates[au_column_name(au)] = round(sum(known) / max(1, len(known)), 4)
    subjects = list(dict.fromkeys(tr.subject for job in jobs for tr in job.tracks))
    summary = {
        "settings": asdict(settings),
        "layout": settings.layout,
        "subjects": subjects,
        "identities": len({tr.identity for job in jobs for tr in job.tracks}),
        "sequences": sum(len(job.tracks) for job in jobs),
        "labelled_frames": len(rows),
        "images": sum(result["images"] for result in results),
        "aus": [au_column_name(a) for a in aus],
        "label_columns": [au_column_name(a) for a in label_aus(settings.layout)],
        "positive_rate": rates,
    }
    if settings.layout == "bp4d":
        summary["quirks"] = {
            "unknown_labels": sum(v == BP4D_UNKNOWN for r in rows for v in r["labels"].values()),
            "frames_with_unknown": sum(BP4D_UNKNOWN in r["labels"].values() for r in rows),
            "uncoded_images": sum(result["uncoded"] for result in results),
        }
    elif settings.layout == "disfa":
        summary["videos"] = sum(result["videos"] for result in results)
        short = next(job.tracks[0].subject for job in jobs if job.short)
        summary["quirks"] = {"short_subject": short, "short_by": 1}
    else:
        summary["videos"] = len(jobs)
        summary["splits"] = {split: sum(job.split == split for job in jobs) for split in AFFWILD2_SPLITS}
        summary["quirks"] = {
            "unannotated_rows": sum(AFFWILD2_UNANNOTATED in r["labels"].values() for r in rows),
            "missing_crops": sum(r["image"] is None for r in rows),
            "two_person_video": next((job.video for job in jobs if len(job.tracks) > 1), None),
        }
    return summary


def layout_is_complete(root: str | Path, settings: LayoutSettings) -> bool:
    """Whether ``root`` holds a complete tree rendered with these settings (defaults filled in)."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["settings"] == asdict(settings.resolved())
    except (ValueError, KeyError):
        return False


def render_layout(root: str | Path, settings: LayoutSettings = LayoutSettings(), workers: int | None = None,
                  force: bool = False) -> dict:
    """Render SynthAU into ``root`` in the folders and files of ``settings.layout`` (see the module).

    Deterministic: every sequence draws from its own generators, seeded by (seed, layout, subject,
    sequence), so the same settings give the same files whatever the number of workers. The tree
    is written to a temporary folder beside ``root`` that replaces it only once complete; the
    marker ``synthau_layout.json`` is written last, and a second call with the same settings does
    nothing (``force``: render again). A ``root`` that holds anything but a rendered layout is left
    alone (``FileExistsError``). Returns the summary stored in the marker.
    """
    settings = settings.resolved()
    root = Path(root)
    if not force and layout_is_complete(root, settings):
        return json.loads((root / MARKER).read_text())
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).is_file())):
        raise FileExistsError(f"{root} holds files that are not a rendered layout; choose another root or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        jobs = _jobs(settings, str(tmp))
        workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_render_job, jobs))
        else:
            results = [_render_job(job) for job in jobs]
        _write_labels(tmp, settings, jobs, results)
        with open(tmp / TRUTH, "w") as f:
            for result in results:
                for row in result["rows"]:
                    f.write(json.dumps(row) + "\n")
        summary = _summary(settings, jobs, results)
        (tmp / MARKER).write_text(json.dumps(summary, indent=2))
        files.replace_folder(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary

