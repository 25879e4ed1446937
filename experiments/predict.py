"""``au-detect predict``: a trained detector on photos, folders, globs, manifests and videos, to CSV.

    au-detect predict --model runs/demo/.../best.ckpt --input photos/ clip.mp4 --out aus.csv
    au-detect predict --model runs:/<run id>/model --input "shots/**/*.jpg" --every 5

One CSV row per face per frame: the source, frame index and time (videos), face index (largest
first), in videos the person (an id that follows someone across frames, through crossings and
exits: :mod:`lightning_modules.serving.people`), box, five landmarks, detection confidence, then per AU its probability (``AU12_prob``)
and its decision at the fitted threshold (``AU12``: 0/1). A frame without a face gets one row
with status ``no_face``; an input that cannot be read gets one row with its status (``missing``,
``empty``, ``unreadable``, ``too_large``, ``too_costly``, ``broken_video``) and a message, and the run goes on.

Frames are batched across images and across a video's frames; image files are decoded in
threads while the previous batch is being classified.

The CSV is written whole or not at all. Rows go, as batches finish, to ``<out>.partial`` beside
``--out``, which is renamed onto ``--out`` when the run ends: a reader of ``--out`` never sees half
a run. An interrupted run leaves ``<out>.partial`` holding the rows it did and, saved every few
seconds, ``<out>.resume.json`` saying where it stood (:class:`Standing`): the same command run
again goes on from there and ends with the rows of an uninterrupted run. A second ``au-detect predict`` on the same ``--out``
while one runs is refused, with a one-line message: the file lock on ``<out>.partial`` is the
operating system's, so it goes with the process that held it, killed or not.

Text cells that a spreadsheet would run as a formula (those starting with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return: a file named ``=HYPERLINK(...).jpg``) are written with a
single quote in front, as OWASP recommends for CSV injection; numbers stay numbers.
``--csv_formulas keep`` writes them as they are, for pipelines that read the CSV as data.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, is_dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from datamodules.io.files import write_text
from datamodules.io.images import DEFAULT_MAX_PIXELS
from datamodules.io.manifest import au_column_name
from datamodules.io.sources import BATCH_PIXELS, InputError, Source, expand, frames, open_video
from experiments.annotation import Annotator
from experiments.prediction_outputs import (EVENT_COLUMNS, PARTIAL_SUFFIX, RESUME_SUFFIX, CsvFormulas,
                                            PredictionSummary, commit, curves_path, events_path, neutralise,
                                            open_partial, people_path, resume_path, row_header,
                                            write_table)
from experiments.predict_ranks import PredictTrainer, predict_on_ranks
from experiments.tracking import use_for_model_uri
from lightning_modules.serving.onnx_model import Backend, load_predictor
from lightning_modules.serving.people import PeopleTracker, TrackerSettings
from lightning_modules.serving.signals import (SmoothingSettings, VideoSignals, restore_video_signals,
                                               video_signals_state)
from lightning_modules.serving.predictor import AUPredictor, Precision, frame_records

log = logging.getLogger(__name__)


# People drawn in a video's AU-curve picture at most (those seen longest; every one is in the
# CSVs): a panel each, so a long video with many people would otherwise draw a picture of
# unbounded height (130 MB of canvas for 100 people).
CURVES_DRAWN = 12


class Videos:
    """What a video adds to its rows, one video at a time (frames of a video come one after another,
    so memory does not grow with the number of videos): person ids (:class:`PeopleTracker`) and,
    with ``smoothing``, each person's smoothed AU signals and events (:class:`VideoSignals`).
    Closed videos' events and per-person summaries wait in ``events`` and ``people``."""

    def __init__(self, aus: list[str], thresholds: np.ndarray, people: TrackerSettings = TrackerSettings(),
                 smoothing: SmoothingSettings | None = SmoothingSettings(), curves: Path | None = None):
        self.aus, self.thresholds, self.people_settings, self.smoothing = aus, thresholds, people, smoothing
        self.curves, self.pictures = curves, set()  # a PNG of AU curves per video, when smoothed
        self.source, self.source_index = None, None
        self.tracker: PeopleTracker | None = None
        self.last_ids: list[int | None] = []  # the person of each face of the frame before
        self.signals: VideoSignals | None = None
        self.events: list[dict] = []
        self.people: list[dict] = []

    def state(self) -> dict:
        """The open video's people and held rows, and what closed videos left, JSON-ready."""
        return {"source": self.source_index, "tracker": self.tracker.state() if self.tracker else None,
                "signals": video_signals_state(self.signals) if self.signals is not None else None,
                "events": self.events, "people": self.people, "pictures": sorted(self.pictures)}

    def restore(self, state: dict, sources: list) -> None:
        """Go on from :meth:`state` (``sources``: the run's inputs, expanded as before)."""
        self.events, self.people, self.pictures = list(state["events"]), list(state["people"]), set(state["pictures"])
        if state["source"] is not None:
            self.source, self.source_index = sources[state["source"]], state["source"]
            self.tracker = PeopleTracker.from_state(state["tracker"])
            if state["signals"] is not None:
                self.signals = restore_video_signals(state["signals"], self.aus, self.thresholds, self.smoothing)

    def _draw(self, label: str, events: list[dict]) -> None:
        """The video's AU curves per person as ``<curves>/<video name>.png`` (numbered when two
        videos share a name), written whole."""
        import matplotlib.pyplot as plt

        from callbacks.plots import au_curves_figure

        name, n = f"{Path(label).name}.png", 2
        while name.casefold() in self.pictures:
            name, n = f"{Path(label).name}-{n}.png", n + 1
        self.pictures.add(name.casefold())
        self.curves.mkdir(parents=True, exist_ok=True)
        fig = au_curves_figure(self.signals.curves(CURVES_DRAWN), events, self.aus, self.thresholds, Path(label).name,
                               gap_s=self.smoothing.max_gap_s, people_total=len(self.signals.people))
        tmp = self.curves / f".{name}.partial.png"
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, self.curves / name)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)

    def begin(self, frame, index: int | None = None) -> list[dict]:
        """Called first for each frame (``index``: its input's place among the run's): when it
        starts another input, the previous video is over (its held rows are returned, to be
        written before this frame's) and a new one may begin."""
        if frame.source is self.source:
            return []
        held = self.finish()
        if frame.frame is not None:
            self.source, self.source_index = frame.source, index
            self.tracker = PeopleTracker(self.people_settings)
            if self.smoothing is not None:
                self.signals = VideoSignals(self.aus, self.thresholds, self.smoothing)
        return held

    def person_ids(self, frame, faces) -> list[int | None] | None:
        """The person id of each face of ``frame``; None for a photo (no ``person`` there). A face
        followed from the frame before (``Face.follows``) continues that face's person."""
        last, self.last_ids = self.last_ids, []
        if frame.frame is None or not faces or self.tracker is None:
            return None
        boxes = np.stack([f.box for f in faces])
        embeddings = None
        if any(f.embedding is not None for f in faces):
            width = next(len(f.embedding) for f in faces if f.embedding is not None)
            embeddings = np.stack([f.embedding if f.embedding is not None else np.full(width, np.nan) for f in faces])
        continues = [last[f.follows] if f.follows is not None and f.follows < len(last) else None for f in faces]
        self.last_ids = self.tracker.update(frame.time_s, boxes, embeddings, continues)
        return self.last_ids

    def rows(self, frame, rows: list[dict]) -> list[dict]:
        """The rows ready to write once ``frame``'s rows are in: a video's rows are held until
        their smoothed values are known (half the window)."""
        if frame.frame is None or self.signals is None:
            return rows
        return self.signals.add(rows)

    def finish(self) -> list[dict]:
        """The current video's held rows; its events and summaries move to ``events``/``people``."""
        out = []
        if self.signals is not None:
            out = self.signals.finish()
            label = self.source.label
            events = self.signals.events()
            self.events += [{"source": label, **e} for e in events]
            self.people += [{"source": label, **p} for p in self.signals.summary()]
            if self.curves is not None:
                self._draw(str(label), events)
        self.source, self.source_index, self.tracker, self.signals = None, None, None, None
        return out


def expected_frames(sources, every: int, start_s: float | None, end_s: float | None) -> int | None:
    """How many frames a run will see, from the images and the videos' declared frame counts and
    rates (None when a video declares none): what the progress line's time left rests on."""
    total = 0
    for src in sources:
        if src.error is not None:
            continue
        if src.kind != "video":
            total += 1
            continue
        try:
            cap, info = open_video(src.path)
            cap.release()
        except InputError:
            continue
        if info.frames <= 0 or info.fps <= 0:
            return None
        first = 0 if start_s is None else math.ceil(start_s * info.fps - 1e-9)
        last = info.frames if end_s is None else min(info.frames, math.ceil(end_s * info.fps - 1e-9))
        total += max(0, math.ceil((last - first) / every))
    return total


def progress_line(done: int, expected: int | None, faces: int, seconds: float, fresh: int | None = None) -> str:
    """``1200/7200 frames (16.7%), 2410 faces, 9.8 frames/s, about 10 min 12 s left``; ``fresh``:
    the frames this process did in ``seconds`` (after a resume, fewer than ``done``).

    >>> progress_line(300, 1200, 310, 30.0)
    '300/1200 frames (25.0%), 310 faces, 10.0 frames/s, about 1 min 30 s left'
    """
    rate = (done if fresh is None else fresh) / max(seconds, 1e-9)
    if not expected:
        return f"{done} frames, {faces} faces, {rate:.1f} frames/s"
    left = max(expected - done, 0) / max(rate, 1e-9)
    minutes, secs = divmod(int(round(left)), 60)
    when = f"{minutes} min {secs} s" if minutes else f"{secs} s"
    return (f"{done}/{expected} frames ({100 * done / expected:.1f}%), {faces} faces, {rate:.1f} frames/s, "
            f"about {when} left")


# How often a run saves where it stands: redoing up to this much after a kill, for a small file.
CHECKPOINT_S = 5.0


class Standing:
    """Where a run stands, saved beside ``<out>.partial`` (whole or not at all, after the rows it
    counts are on disk): the partial file's length, the next input and video frame, the counts,
    and each open video's people and held rows. A run that finds one written by the same inputs
    and options (``signature``) goes on from it; any other is set aside and the run starts over."""

    def __init__(self, path: Path, signature: dict):
        self.path, self.signature = path, json.loads(json.dumps(signature))

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        partial = self.path.with_name(self.path.name.removesuffix(RESUME_SUFFIX) + PARTIAL_SUFFIX)
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            fits = (saved.get("version") == 1 and saved.get("signature") == self.signature and partial.is_file()
                    and partial.stat().st_size >= saved["offset"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable (%s); starting over", self.path, e)
            return None
        if not fits:
            log.warning("%s: written by a run with other inputs or options (or its rows are gone); starting over",
                        self.path)
            return None
        return saved

    def write(self, offset: int, source: int, frame: int, summary: PredictionSummary, videos: "Videos") -> None:
        state = {"version": 1, "signature": self.signature, "offset": offset, "source": source, "frame": frame,
                 "frames": summary.frames, "faces": summary.faces, "statuses": dict(summary.statuses),
                 "videos": videos.state()}
        write_text(self.path, json.dumps(state))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def video_smoothing(sources: list[Source], smoothing: SmoothingSettings | None) -> SmoothingSettings | None:
    """The smoothing a run of ``sources`` applies (its columns, events, people and pictures): none
    without a video among them or with a window of 0."""
    has_video = any(src.kind == "video" for src in sources)
    return smoothing if smoothing is not None and smoothing.window_s > 0 and has_video else None


def run(predictor: AUPredictor, inputs: list[str], out: str, every: int = 1, batch_frames: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2, annotate_dir: str | None = None,
        progress: bool = True, batch_pixels: int = BATCH_PIXELS, csv_formulas: CsvFormulas = "escape",
        people: TrackerSettings = TrackerSettings(), smoothing: SmoothingSettings | None = SmoothingSettings(),
        start_s: float | None = None, end_s: float | None = None, checkpoint_s: float = CHECKPOINT_S,
        sources: list[Source] | None = None, journal: CsvFormulas | None = None) -> PredictionSummary:
    """Predict on the inputs with a loaded predictor and write the CSV (see the module's docstring);
    ``people``: how faces are followed across a video's frames (the ``person`` column);
    ``smoothing``: how each person's AU signals are smoothed (None: not at all); ``checkpoint_s``:
    how often (seconds) where the run stands is saved beside ``<out>.partial``, so that a run
    stopped midway and started again with the same inputs and options goes on from there;
    ``sources``: the inputs already expanded (a rank's share of a run), else ``expand(inputs)``;
    ``journal``: how the rows' text cells are written (default ``csv_formulas``; ``keep`` for Parquet)."""
    if csv_formulas not in ("escape", "keep"):
        raise ValueError(f"--csv_formulas {csv_formulas!r}: expected 'escape' or 'keep'")
    for name, value in (("--start", start_s), ("--end", end_s)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} {value}: expected seconds >= 0")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise ValueError(f"--end {end_s} is not after --start {start_s}")
    parquet = Path(out).suffix.lower() == ".parquet"
    # Parquet holds data, not formulas
    journal_formulas: CsvFormulas = journal or ("keep" if parquet else csv_formulas)
    sources = expand(inputs) if sources is None else sources
    expected = expected_frames(sources, every, start_s, end_s) if progress else None
    aus = predictor.aus
    summary = PredictionSummary(out)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = [au_column_name(a) for a in aus]
    has_video = any(src.kind == "video" for src in sources)
    smoothing = video_smoothing(sources, smoothing)
    videos = Videos(names, predictor.thresholds, people, smoothing, curves_path(out_path) if smoothing else None)
    header = row_header(predictor, smoothing is not None)
    stand = Standing(resume_path(out_path), {
        "inputs": list(inputs), "sources": [src.path for src in sources], "every": every, "start_s": start_s,
        "end_s": end_s, "header": header, "thresholds": [float(t) for t in predictor.thresholds],
        "net": predictor.spec, "detect_every": predictor.detector.every, "people": asdict(people), "smoothing": None if smoothing is None else asdict(smoothing)})
    # an annotated video cannot be appended to: with --annotate a run starts over
    saved = stand.read() if annotate_dir is None else None
    partial, f = open_partial(out_path, keep=saved["offset"] if saved else None)
    if saved:
        summary.frames, summary.faces = saved["frames"], saved["faces"]
        summary.statuses.update(saved["statuses"])
        videos.restore(saved["videos"], sources)
        print(f"Resuming {partial}: {summary.frames} frames done before; going on from input "
              f"{saved['source'] + 1} of {len(sources)}" + (f", frame {saved['frame']}" if saved["frame"] else ""))
    first_source, resume_at = (saved["source"], saved["frame"]) if saved else (0, 0)
    annotator = Annotator(annotate_dir, inputs, sources, every) if annotate_dir else None
    start = time.perf_counter()
    place = {id(src): i for i, src in enumerate(sources)}
    try:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        if not saved:
            writer.writeheader()

        def write(rows: list[dict]) -> None:
            writer.writerows(map(neutralise, rows) if journal_formulas == "escape" else rows)

        # A whole next batch decodes while this one is classified, or the next would wait for it.
        decoded = frames(sources[first_source:], every, max_pixels, workers, predictor.detection_copy,
                         ahead=batch_frames + 2 * max(1, workers), budget=batch_pixels, start_s=start_s, end_s=end_s,
                         resume_at=resume_at)
        done, fresh, saved_at = summary.frames, summary.frames, time.monotonic()
        for batch in predictor.predict_batches(decoded, batch_frames, batch_pixels, embed=has_video):
            for frame, faces in batch:
                write(videos.begin(frame, place[id(frame.source)]))
                rows = frame_records(frame, faces, aus, videos.person_ids(frame, faces))
                if frame.error is not None:
                    log.warning("%s", frame.error)
                else:
                    summary.frames += 1
                    summary.faces += len(faces)
                    if annotator is not None:
                        annotator.add(frame, faces, aus, [r.get("person") for r in rows] if faces else None)
                for row in rows:
                    summary.statuses[row["status"]] += 1
                write(videos.rows(frame, rows))
            last = batch[-1][0]
            if last.frame is not None and last.error is None:  # inside a video: on from its next frame
                first_source, resume_at = place[id(last.source)], last.frame + 1
            else:
                first_source, resume_at = place[id(last.source)] + 1, 0
            if checkpoint_s is not None and time.monotonic() - saved_at >= checkpoint_s:
                f.flush()
                os.fsync(f.fileno())  # the rows first: the standing never points past them
                stand.write(f.tell(), first_source, resume_at, summary, videos)
                saved_at = time.monotonic()
            if summary.frames >= done + batch_frames:  # a batch went through: rows to disk, progress
                done = summary.frames
                f.flush()
                if progress:
                    print("  " + progress_line(summary.frames, expected, summary.faces, time.perf_counter() - start,
                                               summary.frames - fresh), flush=True)
        write(videos.finish())
        if smoothing is not None:  # beside the CSV, before it: a whole --out comes with its events
            summary.events = write_table(events_path(out_path), EVENT_COLUMNS, videos.events, csv_formulas)
            write_table(people_path(out_path), ["source", "person", "seen_s", *[f"{n}_active_share" for n in names]],
                        videos.people, csv_formulas)
        commit(f, partial, out_path, header)
        stand.remove()
    except BaseException:
        log.warning("prediction stopped: the rows written so far are in %s; the same command goes on from "
                    "where it last saved its place", partial)
        raise
    finally:
        f.close()
        if annotator is not None:
            annotator.close()
    summary.seconds = time.perf_counter() - start
    return summary


def predict(model: str, input: list[str] | None = None, out: str = "predictions.csv", every: int = 1,
            batch_frames: int = 32, batch_size: int = 64, annotate: str | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2, device: str | None = None,
            precision: Precision = "32-true", min_face_size: int | None = None, detect_max_side: int | None = None,
            batch_pixels: int = BATCH_PIXELS, mlflow: str = "mlflow.yaml", backend: Backend = "torch",
            describe: bool = False, csv_formulas: CsvFormulas = "escape", people: int | None = None,
            smooth_s: float = 0.5, smoothing: Literal["zero_phase", "causal"] = "zero_phase",
            hysteresis: float = 0.3, identity_weights: str | None = None, start: float | None = None,
            end: float | None = None, checkpoint_s: float = CHECKPOINT_S, detect_every: int = 10,
            trainer: PredictTrainer = PredictTrainer(), share_images: int = 256) -> None:
    """Detect every face in images and videos and write its AUs to a CSV.

    Args:
        model: a checkpoint of ``au-detect fit``, or an MLflow model URI (``runs:/<id>/model``,
            ``models:/<name>/<version>``, ``models:/<name>@champion``), read from the tracking
            server of ``--mlflow``; with
            ``--backend onnxruntime``, a folder of ``au-detect export``.
        input: images, folders (recursive), quoted globs (``"shots/**/*.jpg"``), manifests
            (``.tsv``/``.csv``/``.txt`` with an ``image`` column or paths in the first) and videos.
        out: the CSV to write, whole or not at all: rows go to ``<out>.partial`` as batches
            finish and it is renamed onto ``out`` at the end; an interrupted run leaves
            ``<out>.partial`` with the rows it did. A second run on an ``out`` being written is
            refused. ``rows.parquet``: the same columns, typed, in Parquet row groups (the CSV
            journal streamed into it at the end; readable by pandas, Spark, DuckDB).
        every: in videos, predict on every N-th frame.
        batch_frames: frames detected together (fewer when they hold ``batch_pixels``).
        batch_size: faces per forward pass of the network.
        annotate: a folder for annotated copies, each face's AUs with their probabilities beside it
            (images as JPEG; videos as H.264 MP4, else VP9 WebM, as this OpenCV build can encode).
        max_pixels: images declaring more pixels are refused undecoded (decompression bombs).
        workers: image decoding threads.
        device: torch device (default: cuda when available).
        precision: ``32-true``, or ``bf16-mixed``/``16-mixed``: the network under autocast, several
            times faster on GPUs and on CPUs with AMX (probabilities move by about 1e-3).
        min_face_size: override the training's smallest face (pixels of the detection copy).
        detect_max_side: override the training's detection copy size (larger finds smaller faces).
        batch_pixels: decoded pixels a batch holds at most, and again those decoded ahead of it:
            what bounds memory (64 MP: about 200 MB of RGB each).
        mlflow: MLflow settings file, for MLflow model URIs (MLFLOW_TRACKING_URI wins if set).
        backend: what runs the AU network: ``torch``, or ``onnxruntime`` (the exported ONNX file;
            detection and alignment stay the same code).
        describe: print the model's card (data, AUs, thresholds and which fell back, figures,
            known limits) and stop; ``--input`` is not needed.
        csv_formulas: ``escape``: a text cell a spreadsheet would run as a formula (``source``
            or ``message`` starting with ``=``, ``+``, ``-``, ``@``, tab or CR, from a file's name)
            gets a ``'`` in front (OWASP's advice on CSV injection); ``keep``: written as it is,
            for programs that read the CSV as data.
        people: in videos, how many people there are, when known: the ``person`` ids never
            exceed it (a face that matches no one goes to the most similar person not in the frame).
        smooth_s: in videos, each person's AU probabilities smoothed over this many seconds
            (``AU12_smooth_prob``, decided with hysteresis as ``AU12_smooth``; raw values stay),
            and AU events written to ``<out stem>.events.csv`` (person, AU, onset, apex, offset,
            duration, peak), each person's share of time per AU to ``<out stem>.people.csv`` and
            a picture of each video's AU curves per person to ``<out stem>.curves/<video>.png``;
            0: none of these.
        smoothing: ``zero_phase`` (files: no delay, rows held half a window) or ``causal``
            (streams: an exponential average, answers at once with a lag).
        hysteresis: an AU switches on at its threshold and, once on, off only below ``(1 -
            hysteresis)`` times it: an event needs clear evidence to end.
        identity_weights: in videos, tell people apart with this face-recognition backbone (the
            checkpoint ``au-detect pretrain-face`` wrote, e.g. checkpoints/face_resnet18.pt)
            rather than the model's face branch, which the AU fit tuned for AUs and which tells
            people apart less well. With the ONNX backend too (the backbone runs in PyTorch);
            without it that backend follows people by their boxes alone.
        start: in videos, begin at this time (seconds; frame numbers and times stay the video's).
        end: in videos, stop before this time (seconds).
        checkpoint_s: how often (seconds) the run saves where it stands in ``<out>.resume.json``,
            so that the same command run again after a kill goes on from there (0: after every
            batch of frames).
        detect_every: in videos, run MTCNN's whole cascade on every N-th frame (and on the first
            of each batch of frames, and where a known face is not found again); on the frames
            between, each face of the frame before is looked for where it was (a few R- and O-net
            crops instead of the dozens P-net puts around it), and only P-net's candidates away
            from the known faces (someone entering) go through the whole cascade. 1: the whole
            cascade every frame.
        trainer: more than one device or node (``--trainer.devices 4``, ``--trainer.num_nodes 2``,
            ``--trainer.strategy``, ``--trainer.accelerator``; or started by torchrun or SLURM):
            Lightning's predict loop, each rank predicting shares of the inputs on its own device,
            joined in input order into ``out`` (:mod:`experiments.predict_ranks`); a killed job run
            again predicts only the shares not done. One process when left as it is.
        share_images: with several ranks, photos per share a rank takes at a time (videos go whole).
    """
    if detect_every < 1:
        raise ValueError(f"--detect_every must be at least 1 (1: detect in every whole frame), got {detect_every}")
    if not describe and not input:
        raise ValueError("--input: give images, folders, globs, manifests or videos to predict on "
                         "(or --describe to read the model's card)")
    if backend == "onnxruntime" and precision != "32-true":
        raise ValueError(f"--precision {precision}: the onnxruntime backend runs the exported float32 graph")
    use_for_model_uri(model, mlflow)
    if describe:
        predictor = load_predictor(model, device, backend, min_face_size=min_face_size, detect_max_side=detect_max_side)
        print(getattr(predictor, "card", None) or f"{model}: no model card (a model logged by au-detect before "
              "0.3.0, or a checkpoint of a fit that was not tracked); its AUs: "
              + ", ".join(au_column_name(a) for a in predictor.aus))
        return
    load = partial(configured_predictor, model, backend=backend, batch_size=batch_size, precision=precision,
                   detect_every=detect_every, identity_weights=identity_weights, min_face_size=min_face_size,
                   detect_max_side=detect_max_side)
    options = dict(every=every, batch_frames=batch_frames, max_pixels=max_pixels, workers=workers,
                   batch_pixels=batch_pixels, csv_formulas=csv_formulas, people=TrackerSettings(people=people),
                   smoothing=SmoothingSettings(window_s=smooth_s, mode=smoothing, hysteresis=hysteresis),
                   start_s=start, end_s=end, checkpoint_s=checkpoint_s)
    if trainer.distributed:
        if annotate:
            raise ValueError("--annotate: annotated copies are made by one process (their names depend on every "
                             "input); leave --trainer.devices and --trainer.num_nodes at 1")
        if device:
            raise ValueError(f"--device {device}: with --trainer.devices, Lightning places each rank on its "
                             "device; choose the kind with --trainer.accelerator")
        summary = predict_in_shares(load, input, Path(out), trainer, share_images, options, model)
        if summary is not None:
            print(summary)
        return
    print(run(load(device), input, out, annotate_dir=annotate, **options))


def configured_predictor(model: str, device: str | None, backend: Backend = "torch", batch_size: int = 64,
                         precision: Precision = "32-true", detect_every: int = 10, identity_weights: str | None = None,
                         **detection) -> AUPredictor:
    """The predictor of ``model`` on ``device``, set up as :func:`predict`'s options say."""
    predictor = load_predictor(model, device, backend, **detection)
    predictor.batch_size, predictor.precision = batch_size, precision
    predictor.detector.every = detect_every
    if identity_weights:
        print(f"People told apart by {identity_weights}: {predictor.use_identity_weights(identity_weights)}")
    print(f"Model {model}: {len(predictor.aus)} AUs, {predictor.spec['backbone']} x {len(predictor.spec['branches'])}"
          f" branches, crops {predictor.alignment.crop_size} px, on {predictor.device} ({precision}, {backend})")
    return predictor


def predict_in_shares(load, inputs: list[str], out: Path, trainer: PredictTrainer, share_images: int,
                      options: dict, model: str) -> PredictionSummary | None:
    """:func:`run` over Lightning's ranks, a share of ``inputs`` at a time (:mod:`experiments.predict_ranks`)."""
    sources = expand(inputs)
    smoothed = video_smoothing(sources, options["smoothing"]) is not None
    # Shares are CSV; rows bound for Parquet are data, not formulas (as one process journals them).
    journal = "keep" if out.suffix.lower() == ".parquet" else options["csv_formulas"]

    def predict_share(predictor: AUPredictor, share: list[Source], share_out: Path) -> PredictionSummary:
        return run(predictor, [src.path for src in share], str(share_out), progress=False, sources=share,
                   journal=journal, **options)

    signature = {"model": model, "inputs": list(inputs), "share_images": share_images, "out": out.suffix.lower(),
                 **{k: asdict(v) if is_dataclass(v) else v for k, v in options.items()}}
    return predict_on_ranks(trainer, load, predict_share, sources, out, share_images, signature,
                            smoothed)
