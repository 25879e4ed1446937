"""SynthAU video clips: people who walk, cross, leave and come back, with per-frame ground truth.

The test bed of a face tracker (a ``person`` id that stays with its face from frame to frame,
scored with IDF1) and of AU signals smoothed over time (``au-detect synth --video``). Each clip
is a fixed scene (backdrop, light, camera gain and noise, moderately wild) in which 2 to 4 people
(:attr:`VideoSettings.people`), each a distinct SynthAU identity, walk about while their AU events
rise, hold and fall (:func:`datamodules.synthau.layouts.sample_events`) and their heads turn
(yaw up to 30 degrees at times, with slow pitch and roll drift). Every clip's plan holds:

* a crossing: two people walk towards each other and swap sides, one near the camera (a larger
  head), one far; their face boxes overlap for a few frames and the nearer face hides the other.
  Faces are always drawn far to near (smaller heads first), so the nearer one occludes;
* an exit and return: one of the two walks on out of the frame (its face wholly outside, neither
  drawn nor listed, for at least :data:`MIN_ABSENCE_S` seconds), turns and comes back in on the
  same side, at another depth, with the same ``person`` id;
* the others (a third and fourth person) enter late, leave early for good, or walk towards the
  camera and grow (head height follows depth: 22% to 44% of the frame's height, 79-158 px at
  480x360, sizes MTCNN finds).

Each clip is ``clip_000.avi`` (the frames, MJPG at :attr:`VideoSettings.quality`, OpenCV's own
AVI writer) and ``clip_000.truth.jsonl``, one JSON line per video frame, in order:

```text
{"frame": 0, "time_s": 0.0, "people": [{"person": 0, "identity": 3, "box": [x0, y0, x1, y1],
  "landmarks": [[x, y], ...5], "visible": true, "in_frame": 1.0, "occluded": 0.0,
  "pose": {"yaw": -4.1, "pitch": 2.0, "roll": 0.3}, "unilateral": false,
  "intensity": {"AU12": 0.83}, "levels": {"AU1": 0, ...}, "labels": {"AU1": 0, ...}}]}
```

``person`` numbers the clip's people from 0 and never changes; ``identity`` is the SynthAU
identity drawn (numbered across all clips, none shared between clips). ``box`` (brows to chin, as
MTCNN draws it) and the five ``landmarks`` (eyes, nose tip, mouth corners) are the renderer's, in
frame pixels, not clipped to the frame. ``intensity`` holds the drawn AUs only (0..1); ``levels``
the FACS level 0-5 of every EmotioNet AU (:data:`datamodules.io.manifest.EMOTIONET_AUS`) as
SynthAU's manifests write it (:func:`datamodules.synthau.layouts.facs_level` of
:func:`datamodules.synthau.layouts.label_intensity`: AU7, AU14 and AU23 from the AUs with their
look), and ``labels`` 1 where the level is 1 or more. ``pose`` is the head's, in degrees;
``unilateral``: the lip corners pull on one side only (AU14's look).

At the frame's edges: a person is listed while any part of the face box lies inside the frame and
is absent from the line otherwise. ``in_frame`` is the share of the box inside the frame, and
``visible`` is true when it is at least :data:`VISIBLE_SHARE` (0.6): a face half out of the
picture is drawn, cut by the edge as a camera cuts it, and listed with ``"visible": false``, a
face no detector is expected to find. ``occluded`` is the share of the box covered by the boxes of
nearer faces drawn over it; ``visible`` says nothing about occlusion.

``videos.json``, written last, holds the settings and per clip its files, frames, people (role,
first and last visible frame, visible frames, the frames where they exit and where they return,
the longest absence between two visible frames in seconds), ``crossings`` (the number of frames in
which two visible boxes overlap, IoU > 0) and the pairs of people that crossed, with ``totals``
over the clips.

Every file is written under a temporary name beside its own (``.clip_000.<tag>.tmp.avi``) and
renamed into place, ``videos.json`` last: a folder without it (an interrupted render) is rendered
again, one with it and the same settings is not. The same settings and seed give the same frames
and byte-identical truth files, whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from datamodules.io import files
from datamodules.io.manifest import EMOTIONET_AUS, au_column_name
from datamodules.synthau.face import FaceSpec, Identity, sample_identity
from datamodules.synthau.layouts import AUEvent, facs_level, frame_aus, label_intensity, sample_events
from datamodules.synthau.scene import PlacedFace, Shot, background, expose, light_from, render_posed_scene

VIDEO_VERSION = 1  # bump when a change to the plan or the renderer changes the clips
SUMMARY = "videos.json"
VISIBLE_SHARE = 0.6  # share of a face box inside the frame from which a detector should find it
MIN_ABSENCE_S = 1.2  # the leaver's face is wholly out of the frame at least this long
HEAD = (0.22, 0.44)  # head height / frame height, far (depth 0) to near (depth 1)
OUTSIDE = 1.0  # an exited face's center lies this many head heights beyond the edge
CANVAS_HALF = 0.5 / 0.68  # half the drawn face canvas, in head heights (scene.py pastes head = 0.68 canvas)
MAX_YAW = 30.0
CANDIDATE_PATHS = 16  # paths drawn for each person beyond the crossers, the least crowded kept
MIN_SECONDS, MIN_FPS, MAX_PEOPLE = 3.0, 5.0, 6
_CODE = 7_200_001  # keeps the clips' random streams apart from SynthAU's and the layouts'
# What a render writes, temporary names included (``.clip_000.<tag>.tmp.avi``, ``.videos.json.<tag>.tmp``).
_OURS = re.compile(r"^(clip_\d+\.(avi|truth\.jsonl)|videos\.json"
                   r"|\.(clip_\d+(\.truth\.jsonl)?|videos\.json)\..*\.tmp(\.avi)?)$")


@dataclass(frozen=True)
class VideoSettings:
    """Everything the clips depend on.

    ``clips``: how many. ``people``: each clip draws from ``people[0]`` to ``people[1]`` people
    (2 to 6). ``seconds`` (at least 3) and ``fps`` (at least 5): each clip's length and frame rate.
    ``width`` and ``height``: the frames. ``seed``: the clips are a pure function of the settings
    and this seed. ``quality``: JPEG quality of the MJPG frames. ``version``: the renderer's.
    """

    clips: int = 3
    people: tuple[int, int] = (2, 4)
    seconds: float = 12.0
    fps: float = 10.0
    width: int = 480
    height: int = 360
    seed: int = 0
    quality: int = 90
    version: int = VIDEO_VERSION

    @property
    def frames(self) -> int:
        """Frames per clip.

        >>> VideoSettings(seconds=3, fps=8).frames
        24
        """
        return round(self.seconds * self.fps)

    def checked(self) -> VideoSettings:
        """These settings with ``people`` as a pair of ints, checked; a ``ValueError`` says what is wrong."""
        lo, hi = (int(v) for v in self.people)
        if not 2 <= lo <= hi <= MAX_PEOPLE:
            raise ValueError(f"people per clip must be a range within 2 to {MAX_PEOPLE} (a crossing takes two), "
                             f"got {lo} to {hi}")
        if self.clips < 1:
            raise ValueError(f"clips must be at least 1, got {self.clips}")
        if self.seconds < MIN_SECONDS or not MIN_FPS <= self.fps <= 120:
            raise ValueError(f"a clip needs at least {MIN_SECONDS:g} s (a crossing, then {MIN_ABSENCE_S:g} s out of "
                             f"the frame and back) and {MIN_FPS:g} to 120 fps, "
                             f"got {self.seconds:g} s at {self.fps:g} fps")
        if self.width < 160 or self.height < 120:
            raise ValueError(f"frames must be at least 160x120, got {self.width}x{self.height}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1 to 100, got {self.quality}")
        return replace(self, people=(lo, hi))


def clip_names(clip: int) -> tuple[str, str]:
    """A clip's video and truth file names.

    >>> clip_names(2)
    ('clip_002.avi', 'clip_002.truth.jsonl')
    """
    return f"clip_{clip:03d}.avi", f"clip_{clip:03d}.truth.jsonl"


# ----------------------------------------------------------------------------------------------
# The plan: who is where, looking where, showing which AUs, frame by frame


def _rng(settings: VideoSettings, *key: int) -> np.random.Generator:
    # No part of a seed is 0: a seed ending in zeros draws what the same seed without them draws.
    return np.random.default_rng([settings.seed, _CODE, *(k + 1 for k in key)])


@dataclass
class _Walker:
    """One person of a clip, planned over all its frames (also those it spends out of the frame)."""

    person: int
    identity: int
    role: str
    look: Identity
    events: list[AUEvent]
    pose: np.ndarray  # (frames, 3): yaw, pitch, roll in degrees
    center: np.ndarray  # (frames, 2): the face's center in px
    head: np.ndarray  # (frames,): head height in px


def _clip_scene(rng: np.random.Generator, s: VideoSettings) -> Shot:
    """Moderately wild: light from the side or above, a camera's colour cast and sensor noise."""
    backdrop = background(rng, s.height, s.width)
    az, el = rng.uniform(-0.8, 0.8), rng.uniform(-0.2, 0.7)
    light = light_from(az, el)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.93, 1.07, 3)
    return Shot(backdrop, light, rng.uniform(0.4, 0.7), gain, rng.uniform(1.0, 3.5))


def _head(s: VideoSettings, depth: float | np.ndarray) -> float | np.ndarray:
    return s.height * (HEAD[0] + (HEAD[1] - HEAD[0]) * depth)


def _outside(s: VideoSettings, side: int, depth: float) -> float:
    """The x of a face center out of the frame on ``side`` (-1 left, 1 right): nothing of it is drawn."""
    far = OUTSIDE * _head(s, depth)
    return -far if side < 0 else s.width + far


def _wander(rng: np.random.Generator, n: int, dims: int, step: float, limit: float) -> np.ndarray:
    """A slow random walk around 0, within +-limit."""
    walk = np.cumsum(rng.normal(0, step, (n, dims)), 0)
    return np.clip(walk - walk.mean(0), -limit, limit)


_Key = tuple[int, float, float]  # (frame, x in px, depth 0..1): a person's path goes straight between keys


def _crossers(rng: np.random.Generator, s: VideoSettings) -> list[tuple[str, list[_Key]]]:
    """Two people who swap sides, one near and one far; the far one walks on out of the frame,
    stays out at least MIN_ABSENCE_S and comes back on the same side at another depth."""
    n, w, mid = s.frames, s.width, s.width / 2
    start = int(rng.choice([-1, 1]))  # the leaver starts on this side, the other person opposite
    cross = max(1, round(rng.uniform(0.12, 0.25) * n))
    walk_out = max(2, round(rng.uniform(0.1, 0.15) * n))
    gone = max(math.ceil(MIN_ABSENCE_S * s.fps), round(rng.uniform(0.15, 0.25) * n))
    walk_in = max(2, round(rng.uniform(0.08, 0.12) * n))
    exits, back = cross + walk_out, cross + walk_out + gone
    xc = w * rng.uniform(0.42, 0.58)
    near, far = rng.uniform(0.6, 0.85), rng.uniform(0.05, 0.3)  # depths far enough apart that one hides the other
    stay = mid + start * w * rng.uniform(0.15, 0.3)
    stayer = [(0, mid - start * w * rng.uniform(0.22, 0.35), near), (cross, xc, near), (cross + walk_out, stay, near),
              (n - 1, stay + w * rng.uniform(-0.05, 0.05), rng.uniform(0.35, 1.0))]
    depth = rng.uniform(0.2, 0.8)
    spot = mid - start * w * rng.uniform(0.12, 0.3)
    leaver = [(0, mid + start * w * rng.uniform(0.22, 0.35), far), (cross, xc, far),
              (exits, _outside(s, -start, far), far), (back, _outside(s, -start, depth), depth),
              (min(n - 1, back + walk_in), spot, depth), (n - 1, spot + w * rng.uniform(-0.05, 0.05), depth)]
    return [("crosses", stayer), ("crosses, exits and returns", leaver)]


def _extra(rng: np.random.Generator, s: VideoSettings, role: str) -> list[_Key]:
    """A third or later person: enters late, leaves early for good, or walks towards the camera."""
    n, w, mid = s.frames, s.width, s.width / 2
    side = int(rng.choice([-1, 1]))
    depth = rng.uniform(0.2, 0.8)
    spot = mid + side * w * rng.uniform(0.05, 0.4)
    walk = max(2, round(rng.uniform(0.08, 0.15) * n))
    out = _outside(s, side, depth)
    if role == "enters late":
        t = round(rng.uniform(0.3, 0.6) * n)
        return [(0, out, depth), (t, out, depth), (t + walk, spot, depth),
                (n - 1, spot + w * rng.uniform(-0.06, 0.06), depth)]
    if role == "leaves early":
        t = round(rng.uniform(0.45, 0.8) * n)
        return [(0, spot, depth), (t, spot + w * rng.uniform(-0.05, 0.05), depth), (t + walk, out, depth),
                (n - 1, out, depth)]
    x = mid + w * rng.uniform(-0.4, 0.4)  # walks towards the camera: its head grows 2x
    far, near = rng.uniform(0.0, 0.15), rng.uniform(0.75, 1.0)
    return [(0, x, far), (round(rng.uniform(0.05, 0.3) * n), x, far),
            (round(rng.uniform(0.65, 0.95) * n), x + w * rng.uniform(-0.1, 0.1), near), (n - 1, x, near)]


def _track(s: VideoSettings, keys: list[_Key]) -> tuple[np.ndarray, np.ndarray]:
    """Face center x and depth over the clip: straight walks between keys."""
    kept: list[_Key] = []
    for key in keys:  # a key no later than the one before is dropped (a walk cut short by the clip's end)
        if not kept or key[0] > kept[-1][0]:
            kept.append((min(key[0], s.frames - 1), key[1], key[2]))
    t = np.arange(s.frames)
    frames = [k[0] for k in kept]
    return np.interp(t, frames, [k[1] for k in kept]), np.clip(np.interp(t, frames, [k[2] for k in kept]), 0, 1)


def _path(s: VideoSettings, keys: list[_Key], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Face centers and head heights over the clip, with a little sway."""
    x, depth = _track(s, keys)
    y = s.height * (0.42 + 0.1 * depth)  # nearer people stand lower in the picture
    sway = _wander(rng, s.frames, 2, 0.004, 0.012) * np.array([s.width, s.height])
    return np.stack([x, y], 1) + sway, _head(s, depth)


def _crowding(s: VideoSettings, keys: list[_Key], others: list[list[_Key]]) -> float:
    """Frames in which a path's face would come close to another's (their boxes about to touch)."""
    x, depth = _track(s, keys)
    head = _head(s, depth)
    seen = (x > 0) & (x < s.width)
    total = 0.0
    for other in others:
        ox, od = _track(s, other)
        total += float(np.mean(seen & (ox > 0) & (ox < s.width) & (np.abs(x - ox) < 0.3 * (head + _head(s, od)))))
    return total


def _choreography(rng: np.random.Generator, s: VideoSettings, count: int) -> list[tuple[str, list[_Key]]]:
    """Every person's role and path: the crossers, then each other person on the least crowded of a
    few drawn paths, so that faces meet in crossings rather than stand on one another."""
    plans = _crossers(rng, s)
    for role in map(str, rng.choice(["enters late", "leaves early", "walks towards the camera"], count - 2,
                                    replace=count > 5)):
        drawn = [_extra(rng, s, role) for _ in range(CANDIDATE_PATHS)]
        crowding = [_crowding(s, keys, [k for _, k in plans]) for keys in drawn]
        plans.append((role, drawn[int(np.argmin(crowding))]))
    return plans


def _pose(rng: np.random.Generator, s: VideoSettings) -> np.ndarray:
    """Yaw, pitch and roll: a slow drift around a resting pose, and a few head turns of 18-30 degrees."""
    n = s.frames
    pose = rng.uniform([-8, -6, -6], [8, 6, 6]) + _wander(rng, n, 3, 0.6, 6.0)
    t = np.arange(n)
    for _ in range(int(rng.integers(1, 2 + int(s.seconds // 5)))):
        center, width = rng.uniform(0, n), rng.uniform(0.8, 2.0) * s.fps
        amplitude = rng.uniform(18, MAX_YAW) * rng.choice([-1, 1])
        k = np.clip(np.abs(t - center) / (width / 2), 0, 1)
        pose[:, 0] += amplitude * 0.5 * (1 + np.cos(np.pi * k))  # turn and back, smoothly
    pose[:, 0] = np.clip(pose[:, 0], -MAX_YAW, MAX_YAW)
    return pose


def _people(settings: VideoSettings, clip: int) -> tuple[int, np.random.Generator]:
    """How many people a clip shows, and the generator that goes on to draw their faces."""
    rng = _rng(settings, clip, 0)
    return int(rng.integers(settings.people[0], settings.people[1] + 1)), rng


def people_count(settings: VideoSettings, clip: int) -> int:
    """How many people a clip shows (drawn apart from the rest, so that identities can be numbered
    across clips before any clip is rendered)."""
    return _people(settings, clip)[0]


def _walkers(s: VideoSettings, clip: int, first_identity: int) -> list[_Walker]:
    """The clip's people: two crossers and the extras, their roles dealt out to person ids at random."""
    count, people_rng = _people(s, clip)
    looks = [sample_identity(people_rng) for _ in range(count)]
    plan_rng = _rng(s, clip, 2)
    plans = _choreography(plan_rng, s, count)
    order = plan_rng.permutation(count)
    walkers = []
    for person in range(count):
        role, keys = plans[order[person]]
        own = _rng(s, clip, 3, person)
        center, head = _path(s, keys, own)
        walkers.append(_Walker(person, first_identity + person, role, looks[person], sample_events(own, s.frames),
                               _pose(own, s), center, head))
    return walkers


# ----------------------------------------------------------------------------------------------
# Rendering a clip


@dataclass(frozen=True)
class _Job:
    settings: VideoSettings
    root: str
    clip: int
    first_identity: int


def _on_canvas(s: VideoSettings, walker: _Walker, t: int) -> bool:
    """Whether any of the face's drawn canvas falls in the frame (else drawing it would change nothing)."""
    (x, y), half = walker.center[t], CANVAS_HALF * walker.head[t]
    return x + half > 0 and x - half < s.width and y + half > 0 and y - half < s.height


def _in_frame(s: VideoSettings, box: list[float]) -> float:
    """The share of a box inside the frame."""
    x0, y0, x1, y1 = box
    inside = max(0.0, min(x1, s.width) - max(x0, 0)) * max(0.0, min(y1, s.height) - max(y0, 0))
    return inside / max(1e-9, (x1 - x0) * (y1 - y0))


def _occluded(box: list[float], over: list[list[float]]) -> float:
    """The share of ``box`` covered by the union of the boxes drawn over it (on a 1 px grid)."""
    if not over:
        return 0.0
    x0, y0, x1, y1 = box
    w, h = max(1, math.ceil(x1 - x0)), max(1, math.ceil(y1 - y0))
    covered = np.zeros((h, w), bool)
    for a0, b0, a1, b1 in over:
        c0, c1 = int(np.clip(round(a0 - x0), 0, w)), int(np.clip(round(a1 - x0), 0, w))
        r0, r1 = int(np.clip(round(b0 - y0), 0, h)), int(np.clip(round(b1 - y0), 0, h))
        covered[r0:r1, c0:c1] = True
    return float(covered.mean())


def _aus(drawn: dict[int, float], unilateral: bool) -> dict:
    levels = {au_column_name(au): facs_level(label_intensity(drawn, unilateral, au)) for au in EMOTIONET_AUS}
    return {"intensity": {au_column_name(au): v for au, v in drawn.items()}, "levels": levels,
            "labels": {au: int(level >= 1) for au, level in levels.items()}}


def _frame(s: VideoSettings, job: _Job, scene: Shot, walkers: list[_Walker], t: int) -> tuple[np.ndarray, dict]:
    """One frame (BGR) and its truth line."""
    drawn_people = sorted((w for w in walkers if _on_canvas(s, w, t)), key=lambda w: (w.head[t], w.person))
    placed, shown = [], []
    for w in drawn_people:  # far to near: the nearer face is drawn over the farther
        drawn, unilateral = frame_aus(w.events, t)
        yaw, pitch, roll = (float(v) for v in w.pose[t])
        spec = FaceSpec(w.look, drawn, yaw=yaw, pitch=pitch, roll=roll, unilateral=unilateral)
        # The detail seed is the person's, so AU17's dimples stay put from frame to frame.
        seed = [s.seed, _CODE, job.clip + 1, w.person + 1, 17]
        placed.append(PlacedFace(spec, (float(w.center[t, 0]), float(w.center[t, 1])), float(w.head[t]), seed))
        shown.append((drawn, unilateral))
    img, faces = render_posed_scene(scene.backdrop, placed, scene.light, scene.ambient)
    people = []
    for i, (w, face, p, (drawn, unilateral)) in enumerate(zip(drawn_people, faces, placed, shown)):
        share = _in_frame(s, face["box"])
        if share <= 0:
            continue
        people.append({"person": w.person, "identity": w.identity, "box": face["box"], "landmarks": face["landmarks"],
                       "visible": share >= VISIBLE_SHARE, "in_frame": round(share, 3),
                       "occluded": round(_occluded(face["box"], [f["box"] for f in faces[i + 1:]]), 3),
                       "pose": {"yaw": round(p.spec.yaw, 2), "pitch": round(p.spec.pitch, 2),
                                "roll": round(p.spec.roll, 2)},
                       "unilateral": unilateral, **_aus(drawn, unilateral)})
    people.sort(key=lambda row: row["person"])
    line = {"frame": t, "time_s": round(t / s.fps, 4), "people": people}
    return expose(img, scene, _rng(s, job.clip, 1_000_000 + t)), line


def _temp(path: Path) -> Path:
    """A name beside ``path`` for writing it, ending in its extension (OpenCV picks the container by it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def _open_video(path: Path, s: VideoSettings) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), s.fps,
                             (s.width, s.height))
    if not writer.isOpened():
        raise OSError(f"could not open a video writer for {path}")
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, s.quality)  # the writer ignores it when given to the constructor
    return writer


def _render_clip(job: _Job) -> dict:
    """One clip: the video frame by frame, then its truth file; returns the clip's summary."""
    s = job.settings
    scene = _clip_scene(_rng(s, job.clip, 1), s)
    walkers = _walkers(s, job.clip, job.first_identity)
    video_name, truth_name = clip_names(job.clip)
    video = Path(job.root) / video_name
    tmp = _temp(video)
    lines = []
    try:
        writer = _open_video(tmp, s)
        try:
            for t in range(s.frames):
                bgr, line = _frame(s, job, scene, walkers, t)
                writer.write(bgr)
                lines.append(line)
        finally:
            writer.release()
        files.sync(tmp)
        os.replace(tmp, video)
    finally:
        tmp.unlink(missing_ok=True)
    files.write_text(Path(job.root) / truth_name, "".join(json.dumps(line) + "\n" for line in lines))
    return _clip_summary(s, job.clip, walkers, lines)


# ----------------------------------------------------------------------------------------------
# Summary, completeness, reading


def _presence(walker: _Walker, lines: list[dict], fps: float) -> dict:
    """When a person is visible: first and last frame, exits, returns and the longest absence between."""
    seen = [any(p["person"] == walker.person and p["visible"] for p in line["people"]) for line in lines]
    frames = [t for t, v in enumerate(seen) if v]
    exits = [t for t in range(1, len(seen)) if seen[t - 1] and not seen[t]]
    returns = [t for t in range(1, len(seen)) if seen[t] and not seen[t - 1] and frames and t > frames[0]]
    gaps = [b - a for a, b in zip(frames, frames[1:])]
    return {"person": walker.person, "identity": walker.identity, "role": walker.role,
            "first_visible": frames[0] if frames else None, "last_visible": frames[-1] if frames else None,
            "visible_frames": len(frames), "exits": exits, "returns": returns,
            "longest_absence_s": round((max(gaps, default=1) - 1) / fps, 4)}


def _overlaps(a: list[float], b: list[float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _clip_summary(s: VideoSettings, clip: int, walkers: list[_Walker], lines: list[dict]) -> dict:
    crossings, pairs = 0, set()
    for line in lines:
        shown = [p for p in line["people"] if p["visible"]]
        found = {(p["person"], q["person"]) for i, p in enumerate(shown) for q in shown[i + 1:]
                 if _overlaps(p["box"], q["box"])}
        crossings += bool(found)
        pairs |= found
    video, truth = clip_names(clip)
    return {"clip": clip, "video": video, "truth": truth, "frames": len(lines),
            "people": [_presence(w, lines, s.fps) for w in walkers],
            "crossings": crossings, "crossing_pairs": sorted([list(p) for p in pairs])}


def _summary(s: VideoSettings, clips: list[dict]) -> dict:
    people = [p for c in clips for p in c["people"]]
    totals = {"clips": len(clips), "people": len(people), "frames": sum(c["frames"] for c in clips),
              "crossings": sum(c["crossings"] for c in clips), "exits": sum(len(p["exits"]) for p in people),
              "returns": sum(len(p["returns"]) for p in people)}
    return json.loads(json.dumps({"settings": asdict(s), "clips": clips, "totals": totals}))


def is_complete(root: str | Path, settings: VideoSettings) -> bool:
    """Whether ``root`` holds every clip of a finished render with these settings."""
    marker = Path(root) / SUMMARY
    try:
        summary = json.loads(marker.read_text())
        same = summary["settings"] == json.loads(json.dumps(asdict(settings.checked())))
        return same and all((Path(root) / c[k]).is_file() for c in summary["clips"] for k in ("video", "truth"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _clear(root: Path, clips: int) -> None:
    """Make ``root`` ready for a render: no marker (until the render ends), no temporary files, no
    clips beyond this render's. A folder that holds anything else and no marker is left alone."""
    if not root.exists():
        root.mkdir(parents=True)
        return
    if not root.is_dir():
        raise FileExistsError(f"{root} is not a folder")
    names = [p.name for p in root.iterdir()]
    if SUMMARY not in names and any(not _OURS.match(name) for name in names):
        raise FileExistsError(f"{root} holds files that are not rendered clips; choose another root or remove it")
    (root / SUMMARY).unlink(missing_ok=True)  # first: a render cut short must not look complete
    keep = {name for c in range(clips) for name in clip_names(c)}  # rendered again, each replaced whole
    for name in names:
        if _OURS.match(name) and name != SUMMARY and name not in keep:
            (root / name).unlink(missing_ok=True)


def render_videos(root: str | Path, settings: VideoSettings = VideoSettings(), workers: int | None = None,
                  force: bool = False) -> dict:
    """Render ``settings.clips`` clips into ``root`` (see the module): videos, truth files, ``videos.json``.

    A complete folder with the same settings is not rendered again (``force``: render anyway);
    its summary is returned. ``workers``: processes rendering clips side by side (default: up to
    4); the files do not depend on it. Returns the summary written to ``videos.json``.
    """
    settings = settings.checked()
    root = Path(root)
    if not force and is_complete(root, settings):
        return json.loads((root / SUMMARY).read_text())
    _clear(root, settings.clips)
    counts = [people_count(settings, c) for c in range(settings.clips)]
    jobs = [_Job(settings, str(root), c, sum(counts[:c])) for c in range(settings.clips)]
    workers = min(settings.clips, workers if workers is not None else min(4, os.cpu_count() or 1))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            clips = list(pool.map(_render_clip, jobs))
    else:
        clips = [_render_clip(job) for job in jobs]
    summary = _summary(settings, clips)
    files.write_text(root / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def read_truth(path: str | Path) -> list[dict]:
    """The lines of a clip's truth file, one dict per frame; a ``ValueError`` names the file and
    line of the first line that is not a frame's truth (bad JSON, missing fields, frames out of order)."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            try:
                row = json.loads(text)
                _check_line(row, len(rows))
            except ValueError as e:  # json.JSONDecodeError is one
                raise ValueError(f"{path}, line {number}: {e}") from None
            rows.append(row)
    return rows


def _check_line(row: object, expected: int) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("people"), list):
        raise ValueError("not a frame's truth (a JSON object with 'frame', 'time_s' and 'people')")
    if row.get("frame") != expected:
        raise ValueError(f"frame {row.get('frame')!r} where frame {expected} was expected")
    for p in row["people"]:
        missing = [k for k in ("person", "identity", "box", "visible", "levels", "labels")
                   if not isinstance(p, dict) or k not in p]
        if missing:
            raise ValueError(f"a person without {', '.join(missing)}")
