"""AU signals over time, per person: smoothed probabilities, decisions with hysteresis, AU events.

Per-frame decisions flicker: a smile held for two seconds crosses its threshold back and forth
with the detector's noise. A person's probabilities are smoothed over a window in **seconds**
(not frames, so the frame rate and ``--every`` do not change what it means), and decided with
hysteresis around each AU's fitted threshold.

- ``zero_phase`` (files): each frame's value is the Hann-weighted mean of the person's values
  within half a window before and after it: no delay, an event's onset stays where it is. The
  frame is answered once the video has gone half a window past it, so rows are held that long,
  never longer (memory bounded by the window, not the video).
- ``causal`` (streams): an exponential moving average with time constant half the window,
  exact for uneven frame times; answers at once, with a lag of about that time constant.

A person who is not seen for longer than ``max_gap_s`` starts a new stretch: nothing is smoothed
across the gap (they may have left the frame).

Decisions are a Schmitt trigger: an AU switches on when its smoothed probability reaches its
fitted threshold, as a single frame's decision would, and off only when it falls below
``(1 - hysteresis)`` times the threshold (relative, since thresholds range from 0.1 to 0.9).
Once an event has started it takes clear evidence to end it: a held smile whose probability dips
for a few frames stays one event. On SynthAU clips this is what raises per-frame F1 over the raw
decisions (benchmarks/video_people.py); averaging alone removes flicker but shortens events. An **event** is a run of on-decisions of one AU for one
person: onset and offset times (its first and last frame), apex (the time of its highest smoothed
probability), duration, peak probability.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import numpy as np

Mode = Literal["zero_phase", "causal"]


@dataclass(frozen=True)
class SmoothingSettings:
    """How AU signals are smoothed and decided (see the module's docstring).

    Args:
        window_s: the smoothing window in seconds (0: no smoothing).
        mode: ``zero_phase`` for files, ``causal`` for streams.
        hysteresis: an AU on stays on until its probability falls below ``(1 - hysteresis)``
            times its threshold (0: plain thresholding).
        max_gap_s: a person unseen for longer starts a new stretch.
    """

    window_s: float = 0.5
    mode: Mode = "zero_phase"
    hysteresis: float = 0.3
    max_gap_s: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.window_s) or self.window_s < 0:
            raise ValueError(f"--smooth_s {self.window_s}: expected seconds >= 0")
        if self.mode not in ("zero_phase", "causal"):
            raise ValueError(f"smoothing mode {self.mode!r}: expected 'zero_phase' or 'causal'")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"--hysteresis {self.hysteresis}: expected a share of the threshold in [0, 1)")


def hann_weights(offsets: np.ndarray, half: float) -> np.ndarray:
    """Hann window weights of time offsets within +-``half`` seconds (1 at 0, 0 at the ends).

    >>> hann_weights(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), 1.0).round(3).tolist()
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if half <= 0:
        return (offsets == 0).astype(np.float64)
    return np.where(np.abs(offsets) <= half, 0.5 * (1 + np.cos(np.pi * offsets / half)), 0.0)


def smooth_series(times: Sequence[float], values: np.ndarray, settings: SmoothingSettings) -> np.ndarray:
    """A whole series at once (T,) or (T,K), for one person: what :class:`PersonSignal` streams.
    Used to check the streaming version and for series already in memory."""
    t = np.asarray(times, np.float64)
    v = np.asarray(values, np.float64)
    out = np.empty_like(v)
    start = 0
    for i in range(1, len(t) + 1):  # stretches between gaps
        if i == len(t) or t[i] - t[i - 1] > settings.max_gap_s:
            out[start:i] = _smooth_stretch(t[start:i], v[start:i], settings)
            start = i
    return out


def _smooth_stretch(t: np.ndarray, v: np.ndarray, settings: SmoothingSettings) -> np.ndarray:
    if settings.window_s == 0 or len(t) == 0:
        return v.copy()
    if settings.mode == "causal":
        tau = settings.window_s / 2
        out = np.empty_like(v)
        out[0] = v[0]
        for i in range(1, len(t)):
            a = 1 - math.exp(-(t[i] - t[i - 1]) / tau)
            out[i] = out[i - 1] + a * (v[i] - out[i - 1])
        return out
    half = settings.window_s / 2
    w = hann_weights(t[None, :] - t[:, None], half)  # (T, T): row i weighs frame j
    w = w / w.sum(1, keepdims=True)
    return w @ v


def hysteresis_decisions(values: np.ndarray, thresholds: np.ndarray, hysteresis: float,
                         state: np.ndarray | None = None) -> np.ndarray:
    """On/off per frame (T,K) of smoothed probabilities: on at ``threshold``, off below
    ``(1 - hysteresis) * threshold``, unchanged between; ``state`` the decisions before the first
    frame (None: off)."""
    v = np.atleast_2d(values)
    on = np.zeros(v.shape[1], bool) if state is None else state.copy()
    out = np.empty(v.shape, bool)
    for i, row in enumerate(v):
        on = switched(on, row, thresholds, hysteresis)
        out[i] = on
    return out


def switched(on: np.ndarray, values: np.ndarray, thresholds: np.ndarray, hysteresis: float) -> np.ndarray:
    """The Schmitt trigger's next state: an AU off turns on at its threshold, one on stays on down
    to ``(1 - hysteresis)`` times it."""
    return np.where(on, values >= thresholds * (1 - hysteresis), values >= thresholds)


@dataclass
class Event:
    """One AU active for one person: first and last frame's times, the time and smoothed
    probability of its highest frame."""

    person: int
    au: str
    onset_s: float
    apex_s: float
    offset_s: float
    peak: float

    @property
    def duration_s(self) -> float:
        return self.offset_s - self.onset_s

    def record(self) -> dict:
        return {"person": self.person, "au": self.au, "onset_s": round(self.onset_s, 4),
                "apex_s": round(self.apex_s, 4), "offset_s": round(self.offset_s, 4),
                "duration_s": round(self.duration_s, 4), "peak_prob": round(self.peak, 5)}


@dataclass
class Curve:
    """A person's smoothed probabilities over time for a picture, in bounded memory: past
    ``max_points`` neighbouring points are averaged in pairs, so a two-hour video keeps as many
    points as a two-minute one, each the mean of a longer span."""

    max_points: int = 2000
    times: list = field(default_factory=list)
    values: list = field(default_factory=list)
    counts: list = field(default_factory=list)  # frames each point stands for

    def add(self, time_s: float, values: np.ndarray) -> None:
        self.times.append(float(time_s))
        self.values.append(np.asarray(values, np.float64))
        self.counts.append(1)
        if len(self.times) > self.max_points:  # pairs merged, each the mean of the frames it stands for
            n = len(self.times) // 2 * 2
            t, v, c = np.asarray(self.times[:n]), np.stack(self.values[:n]), np.asarray(self.counts[:n], float)
            w = c[0::2] + c[1::2]
            self.times = list((t[0::2] * c[0::2] + t[1::2] * c[1::2]) / w) + self.times[n:]
            self.values = list((v[0::2] * c[0::2, None] + v[1::2] * c[1::2, None]) / w[:, None]) + self.values[n:]
            self.counts = [int(x) for x in w] + self.counts[n:]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.times), (np.stack(self.values) if self.values else np.zeros((0, 0), np.float32))


@dataclass
class _Pending:
    time_s: float
    raw: np.ndarray
    key: object  # the caller's handle of the row


@dataclass
class PersonSignal:
    """One person's AU probabilities streamed in, smoothed values and decisions streamed out
    (see the module's docstring). ``push`` a frame, then take what is ready from ``ready``."""

    aus: Sequence[str]
    thresholds: np.ndarray
    settings: SmoothingSettings
    person: int = 0
    history: deque = field(default_factory=deque)  # (time, raw) within half a window of what is pending
    pending: deque = field(default_factory=deque)
    ema: np.ndarray | None = None
    last_s: float | None = None
    state: np.ndarray | None = None
    open_events: dict = field(default_factory=dict)  # au index -> Event
    events: list = field(default_factory=list)
    active_s: np.ndarray | None = None  # seconds each AU was on
    seen_s: float = 0.0  # seconds the person was seen (sum of frame spans)
    _decided_s: float = 0.0
    curve: Curve = field(default_factory=Curve)

    def push(self, time_s: float, probs: np.ndarray, key) -> list[tuple[object, np.ndarray, np.ndarray]]:
        """Add a frame; returns the frames now ready: (key, smoothed probabilities, decisions)."""
        out = []
        if self.last_s is not None and time_s - self.last_s > self.settings.max_gap_s:
            out += self.flush()  # a new stretch: the old one ends here
        probs = np.asarray(probs, np.float64)
        if self.settings.mode == "causal" or self.settings.window_s == 0:
            if self.ema is None or self.settings.window_s == 0:
                self.ema = probs.copy()
            else:
                a = 1 - math.exp(-(time_s - self.last_s) / (self.settings.window_s / 2))
                self.ema = self.ema + a * (probs - self.ema)
            self.last_s = time_s
            return out + [self._decide(time_s, key, self.ema.copy())]
        self.history.append((time_s, probs))
        self.pending.append(_Pending(time_s, probs, key))
        self.last_s = time_s
        return out + self.advance(time_s)

    def advance(self, now_s: float) -> list[tuple[object, np.ndarray, np.ndarray]]:
        """The held frames the video's clock ``now_s`` has gone half a window past: whatever this
        person shows later weighs nothing in them, so they are final (a person out of sight does
        not hold the rows back)."""
        out = []
        half = self.settings.window_s / 2
        while self.pending and now_s - self.pending[0].time_s >= half:
            out.append(self._answer(self.pending.popleft()))
        return out

    def flush(self) -> list[tuple[object, np.ndarray, np.ndarray]]:
        """Everything still held (end of the video, or of a stretch), and the stretch closed."""
        out = [self._answer(p) for p in list(self.pending)] if self.settings.mode == "zero_phase" else []
        self.pending.clear()
        self.history.clear()
        self.ema, self.last_s, self.state = None, None, None
        for i in list(self.open_events):
            self.events.append(self.open_events.pop(i))
        return out

    def _answer(self, p: _Pending) -> tuple[object, np.ndarray, np.ndarray]:
        half = self.settings.window_s / 2
        while self.history and self.history[0][0] < p.time_s - half:
            self.history.popleft()  # nothing pending needs it any more (pending are in time order)
        times = np.array([h[0] for h in self.history])
        values = np.stack([h[1] for h in self.history])
        w = hann_weights(times - p.time_s, half)
        return self._decide(p.time_s, p.key, w @ values / w.sum())

    def _decide(self, time_s: float, key, smoothed: np.ndarray) -> tuple[object, np.ndarray, np.ndarray]:
        before = np.zeros(len(self.thresholds), bool) if self.state is None else self.state
        on = switched(before, smoothed, self.thresholds, self.settings.hysteresis)
        span = 0.0 if self.state is None else time_s - self._decided_s
        if self.active_s is None:
            self.active_s = np.zeros(len(self.thresholds))
        if self.state is not None:  # the span since the last frame counts as that frame's state
            self.active_s += span * self.state
            self.seen_s += span
        for i in np.nonzero(on)[0]:
            event = self.open_events.get(i)
            if event is None:
                self.open_events[i] = Event(self.person, self.aus[i], time_s, time_s, time_s, float(smoothed[i]))
            else:
                event.offset_s = time_s
                if smoothed[i] > event.peak:
                    event.peak, event.apex_s = float(smoothed[i]), time_s
        for i in [i for i in self.open_events if not on[i]]:
            self.events.append(self.open_events.pop(i))
        self.state, self._decided_s = on, time_s
        self.curve.add(time_s, smoothed)
        return key, smoothed, on

    def take_events(self) -> Iterator[Event]:
        """The events closed so far, each given once."""
        while self.events:
            yield self.events.pop(0)


def smooth_columns(aus: Sequence[str]) -> list[str]:
    """The CSV columns of the smoothed signals: each AU's smoothed probability, then its decision."""
    return [f"{a}_smooth_prob" for a in aus] + [f"{a}_smooth" for a in aus]


class VideoSignals:
    """The rows of one video, smoothed per person and given back in their order once answered
    (see the module's docstring); events and each person's share of time per AU at the end.

    ``add`` takes one frame's rows (dicts with ``time_s``, ``person``, ``status`` and
    ``AU<n>_prob``) and returns the rows, of this frame or earlier ones, now ready to write, with
    ``AU<n>_smooth_prob`` and ``AU<n>_smooth`` filled in for faces with a person; ``finish`` returns
    the rest."""

    def __init__(self, aus: Sequence[str], thresholds: np.ndarray, settings: SmoothingSettings):
        self.aus, self.thresholds, self.settings = list(aus), np.asarray(thresholds, np.float64), settings
        self.people: dict[int, PersonSignal] = {}
        self.queue: deque = deque()  # rows in order, each waiting for its smoothed values or not
        self.waiting: set[int] = set()  # id() of the queued rows still waiting

    def add(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            self.queue.append(row)
            person = row.get("person")
            if row.get("status") != "ok" or person is None or person == "":
                continue
            signal = self.people.get(person)
            if signal is None:
                signal = self.people[person] = PersonSignal(self.aus, self.thresholds, self.settings, person)
            self.waiting.add(id(row))
            probs = np.array([row[f"{a}_prob"] for a in self.aus], np.float64)
            self._fill(signal.push(float(row["time_s"]), probs, row))
        times = [float(r["time_s"]) for r in rows if r.get("time_s") is not None]
        if times:
            for signal in self.people.values():
                self._fill(signal.advance(max(times)))
        return self._ready()

    def finish(self) -> list[dict]:
        for signal in self.people.values():
            self._fill(signal.flush())
        return self._ready()

    def _fill(self, answers) -> None:
        for row, smoothed, on in answers:
            for a, p, d in zip(self.aus, smoothed, on):
                row[f"{a}_smooth_prob"] = round(float(p), 5)
                row[f"{a}_smooth"] = int(d)
            self.waiting.discard(id(row))

    def _ready(self) -> list[dict]:
        out = []
        while self.queue and id(self.queue[0]) not in self.waiting:
            out.append(self.queue.popleft())
        return out

    def events(self) -> list[dict]:
        """Every event of the video so far (all of them after ``finish``), by person and onset."""
        found = [e.record() for s in self.people.values() for e in s.take_events()]
        return sorted(found, key=lambda e: (e["person"], e["onset_s"], e["au"]))

    def curves(self, most: int | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per person, times and smoothed probabilities (T,K) for a picture (:class:`Curve`);
        with ``most``, only that many people, those seen longest (by id)."""
        people = sorted(self.people.items())
        if most is not None and len(people) > most:
            longest = {p for p, _ in sorted(people, key=lambda item: -item[1].seen_s)[:most]}
            people = [(p, s) for p, s in people if p in longest]
        return {person: s.curve.arrays() for person, s in people}

    def summary(self) -> list[dict]:
        """Per person: seconds seen and the share of them each AU was active."""
        out = []
        for person, s in sorted(self.people.items()):
            seen = s.seen_s
            row = {"person": person, "seen_s": round(seen, 4)}
            for a, active in zip(self.aus, s.active_s if s.active_s is not None else np.zeros(len(self.aus))):
                row[f"{a}_active_share"] = round(float(active / seen), 4) if seen > 0 else None
            out.append(row)
        return out


# -- resuming: the whole state of a video's signals as JSON-ready values ------------------------

def _array(values) -> np.ndarray | None:
    return None if values is None else np.asarray(values, np.float64)


def signal_state(signal: PersonSignal, rows: dict[int, int]) -> dict:
    """A :class:`PersonSignal` as JSON-ready values; ``rows`` maps ``id()`` of each held row to
    its place in the video's queue (held rows are saved once, with the queue)."""
    return {"person": signal.person,
            "history": [[t, v.tolist()] for t, v in signal.history],
            "pending": [[p.time_s, p.raw.tolist(), rows[id(p.key)]] for p in signal.pending],
            "ema": None if signal.ema is None else signal.ema.tolist(), "last_s": signal.last_s,
            "state": None if signal.state is None else signal.state.tolist(),
            "open_events": [[int(i), vars(e)] for i, e in signal.open_events.items()],
            "events": [vars(e) for e in signal.events],
            "active_s": None if signal.active_s is None else signal.active_s.tolist(),
            "seen_s": signal.seen_s, "decided_s": signal._decided_s,
            "curve": {"max_points": signal.curve.max_points, "times": list(signal.curve.times),
                      "values": [v.tolist() for v in signal.curve.values], "counts": list(signal.curve.counts)}}


def video_signals_state(video: VideoSignals) -> dict:
    """Everything a :class:`VideoSignals` holds (rows waiting included), for :func:`restore_video_signals`."""
    rows = {id(r): i for i, r in enumerate(video.queue)}
    return {"queue": list(video.queue), "waiting": sorted(rows[i] for i in video.waiting),
            "people": [signal_state(s, rows) for s in video.people.values()]}


def restore_video_signals(state: dict, aus: Sequence[str], thresholds: np.ndarray,
                          settings: SmoothingSettings) -> VideoSignals:
    """The :class:`VideoSignals` that :func:`video_signals_state` saved, held rows and all."""
    video = VideoSignals(aus, thresholds, settings)
    video.queue = deque(dict(r) for r in state["queue"])
    rows = list(video.queue)
    video.waiting = {id(rows[i]) for i in state["waiting"]}
    for s in state["people"]:
        signal = PersonSignal(video.aus, video.thresholds, settings, s["person"])
        signal.history = deque((t, np.asarray(v, np.float64)) for t, v in s["history"])
        signal.pending = deque(_Pending(t, np.asarray(v, np.float64), rows[i]) for t, v, i in s["pending"])
        signal.ema, signal.last_s = _array(s["ema"]), s["last_s"]
        signal.state = None if s["state"] is None else np.asarray(s["state"], bool)
        signal.open_events = {i: Event(**e) for i, e in s["open_events"]}
        signal.events = [Event(**e) for e in s["events"]]
        signal.active_s, signal.seen_s, signal._decided_s = _array(s["active_s"]), s["seen_s"], s["decided_s"]
        c = s["curve"]
        signal.curve = Curve(c["max_points"], list(c["times"]), [np.asarray(v, np.float64) for v in c["values"]],
                             list(c["counts"]))
        video.people[s["person"]] = signal
    return video
