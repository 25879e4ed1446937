"""``au-detect predict``: a trained detector on photos, folders, globs, manifests and videos, to CSV.

    au-detect predict --model runs/demo/.../best.ckpt --input photos/ clip.mp4 --out aus.csv
    au-detect predict --model runs:/<run id>/model --input "shots/**/*.jpg" --every 5

One CSV row per face per frame: the source, frame index and time (videos), face index (largest
first), box, five landmarks, detection confidence, then per AU its probability (``AU12_prob``)
and its decision at the fitted threshold (``AU12``: 0/1). A frame without a face gets one row
with status ``no_face``; an input that cannot be read gets one row with its status (``missing``,
``empty``, ``unreadable``, ``too_large``, ``broken_video``) and a message, and the run goes on.

Frames are batched across images and across a video's frames; image files are decoded in
threads while the previous batch is being classified. Rows are written as batches finish, so
an interrupted run keeps what it did.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np

from datamodules.alignment import detection_copy
from datamodules.manifest import au_column_name
from datamodules.images import DEFAULT_MAX_PIXELS, InputError, read_image
from datamodules.sources import Source, expand, video_frames
from lightning_modules.predictor import (MLFLOW_SCHEMES, AUPredictor, Face, Precision, columns, frame_records,
                                         status_record)

log = logging.getLogger(__name__)

# Frames of a batch, and frames decoded ahead, are capped by pixels as well as by count: a folder
# of 50 MP photos (150 MB each as RGB) holds a few at a time, not a batch's worth.
BATCH_PIXELS = 64_000_000


@dataclass
class _Item:
    """A frame on its way through a batch, or an input that failed (``error``)."""

    source: str
    frame: int | None = None
    time_s: float | None = None
    pixels: np.ndarray | None = None
    error: InputError | None = None
    copy: tuple[np.ndarray, float] | None = None  # the detection copy, when made while decoding


def _decode(path: str, max_pixels: int, detect_max_side: int) -> tuple[np.ndarray, tuple[np.ndarray, float]]:
    pixels = read_image(path, max_pixels)
    return pixels, detection_copy(pixels, detect_max_side)


def _items(sources: list[Source], every: int, max_pixels: int, workers: int,
           detect_max_side: int, ahead: int) -> Iterator[_Item]:
    """Frames of every source in order; image files decoded (and downscaled for detection) ahead
    in threads, at most ``ahead`` or :data:`BATCH_PIXELS` of them, while the main thread detects
    and classifies."""
    pool = ThreadPoolExecutor(max(1, workers))
    pending: list = []  # (source, future) for images in flight, in order

    last = 0  # pixels of the latest decoded image: the guess for those still queued

    def held() -> int:
        """Pixels decoded ahead, counting the queued images at the latest size seen."""
        nonlocal last
        decoded = [f.result()[0] for _, f in pending if f.done() and f.exception() is None]
        queued = [f for _, f in pending if not f.done()]
        if decoded:
            last = decoded[-1].shape[0] * decoded[-1].shape[1]
        elif not last and queued:
            wait(queued, return_when=FIRST_COMPLETED)  # a size to go by before queueing more
            return held()
        return sum(a.shape[0] * a.shape[1] for a in decoded) + len(queued) * last

    def drain(limit: int) -> Iterator[_Item]:
        while len(pending) > limit or (len(pending) > 1 and held() > BATCH_PIXELS):
            src, fut = pending.pop(0)
            try:
                pixels, copy = fut.result()
                yield _Item(src.path, pixels=pixels, copy=copy)
            except InputError as e:
                yield _Item(src.path, error=e)

    try:
        for src in sources:
            if src.error is not None:
                yield from drain(0)
                yield _Item(src.path, error=src.error)
            elif src.kind == "video":
                yield from drain(0)
                try:
                    for index, t, rgb in video_frames(src.path, every):
                        yield _Item(src.path, index, t, rgb)
                except InputError as e:
                    yield _Item(src.path, error=e)
            else:
                pending.append((src, pool.submit(_decode, src.path, max_pixels, detect_max_side)))
                yield from drain(ahead)
        yield from drain(0)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _batches(items: Iterable[_Item], size: int, pixels: int) -> Iterator[list[_Item]]:
    """Items in batches of ``size`` frames, or fewer once they hold ``pixels`` pixels."""
    batch: list[_Item] = []
    frames = held = 0
    for item in items:
        batch.append(item)
        if item.pixels is not None:
            frames, held = frames + 1, held + item.pixels.shape[0] * item.pixels.shape[1]
        if frames >= size or held >= pixels:
            yield batch
            batch, frames, held = [], 0, 0
    if batch:
        yield batch


@dataclass
class PredictionSummary:
    """What a prediction run did: counts by status, faces, frames and speed."""

    out: str
    statuses: Counter = field(default_factory=Counter)
    faces: int = 0
    frames: int = 0
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.frames} frames, {self.faces} faces in {self.seconds:.1f} s "
                f"({self.frames_per_second:.1f} frames/s); rows by status: {counts}; written to {self.out}")


def annotate(frame: np.ndarray, faces: list[Face], aus: Sequence[int]) -> np.ndarray:
    """BGR copy of a frame with each face's box, landmarks and active AUs drawn."""
    image = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    scale = max(1.0, max(image.shape[:2]) / 640)
    for face in faces:
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        cv2.rectangle(image, (x0, y0), (x1, y1), (0, 220, 0), max(1, int(2 * scale)))
        for x, y in face.landmarks:
            cv2.circle(image, (int(x), int(y)), max(1, int(2 * scale)), (0, 200, 255), -1)
        active = [au_column_name(a) for a, d in zip(aus, face.decisions) if d]
        for k in range(0, len(active), 4):  # four AUs a line
            cv2.putText(image, " ".join(active[k:k + 4]), (x0, y1 + int((14 + 14 * k // 4) * scale)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, (0, 220, 0), max(1, int(scale)), cv2.LINE_AA)
    return image


class _Annotator:
    """Annotated copies under a folder: one image per image, one video per video."""

    def __init__(self, folder: str, inputs_root: Path | None):
        self.folder, self.root = Path(folder), inputs_root
        self.writers: dict[str, cv2.VideoWriter] = {}

    def _target(self, source: str, suffix: str) -> Path:
        p = Path(source).resolve()
        try:
            rel = p.relative_to(self.root) if self.root else Path(p.name)
        except ValueError:
            rel = Path(p.name)
        target = (self.folder / rel).with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add(self, item: _Item, faces: list[Face], aus, fps: float | None) -> None:
        image = annotate(item.pixels, faces, aus)
        if item.frame is None:
            cv2.imwrite(str(self._target(item.source, ".jpg")), image)
            return
        writer = self.writers.get(item.source)
        if writer is None:
            h, w = image.shape[:2]
            writer = cv2.VideoWriter(str(self._target(item.source, ".mp4")), cv2.VideoWriter_fourcc(*"mp4v"),
                                     fps or 25.0, (w, h))
            self.writers[item.source] = writer
        writer.write(image)

    def close(self) -> None:
        for w in self.writers.values():
            w.release()


def run(predictor: AUPredictor, inputs: list[str], out: str, every: int = 1, batch_frames: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2, annotate_dir: str | None = None,
        progress: bool = True) -> PredictionSummary:
    """Predict on the inputs with a loaded predictor and write the CSV (see the module's docstring)."""
    sources = expand(inputs)
    aus = predictor.aus
    summary = PredictionSummary(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    single_dir = Path(inputs[0]).resolve() if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    annotator = _Annotator(annotate_dir, single_dir) if annotate_dir else None
    fps_of: dict[str, float] = {}
    start = time.perf_counter()
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(aus), restval="")
        writer.writeheader()
        # A whole next batch decodes while this one is classified, or the next would wait for it.
        items = _items(sources, every, max_pixels, workers, predictor.alignment.detect_max_side,
                       ahead=batch_frames + 2 * max(1, workers))
        for batch in _batches(items, batch_frames, BATCH_PIXELS):
            frames = [i for i in batch if i.pixels is not None]
            results = iter(predictor.predict([i.pixels for i in frames], [i.copy for i in frames]))
            for item in batch:
                if item.error is not None:
                    rows = [status_record(item.source, item.error.status, str(item.error))]
                    log.warning("%s", item.error)
                else:
                    faces = next(results)
                    rows = frame_records(item.source, item.frame, item.time_s, faces, aus)
                    summary.frames += 1
                    summary.faces += len(faces)
                    if annotator is not None:
                        if item.frame is not None and item.source not in fps_of:
                            fps_of[item.source] = _fps(item.source) / every
                        annotator.add(item, faces, aus, fps_of.get(item.source))
                for row in rows:
                    summary.statuses[row["status"]] += 1
                writer.writerows(rows)
            f.flush()
            if progress:
                rate = summary.frames / max(time.perf_counter() - start, 1e-9)
                print(f"  {summary.frames} frames, {summary.faces} faces ({rate:.1f} frames/s)", flush=True)
    if annotator is not None:
        annotator.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _fps(path: str) -> float:
    cap = cv2.VideoCapture(path)
    try:
        return cap.get(cv2.CAP_PROP_FPS) or 25.0
    finally:
        cap.release()


def predict(model: str, input: list[str], out: str = "predictions.csv", every: int = 1, batch_frames: int = 32,
            batch_size: int = 64, annotate: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            workers: int = 2, device: str | None = None, precision: Precision = "32-true",
            min_face_size: int | None = None, detect_max_side: int | None = None,
            mlflow: str = "mlflow.yaml") -> None:
    """Detect every face in images and videos and write its AUs to a CSV.

    Args:
        model: a checkpoint of ``au-detect fit``, or an MLflow model URI (``runs:/<id>/model``,
            ``models:/<name>/<version>``), read from the tracking server of ``--mlflow``.
        input: images, folders (recursive), quoted globs (``"shots/**/*.jpg"``), manifests
            (``.tsv``/``.csv``/``.txt`` with an ``image`` column or paths in the first) and videos.
        out: the CSV to write.
        every: in videos, predict on every N-th frame.
        batch_frames: frames detected together (fewer when they are large: at most 64 MP a batch).
        batch_size: faces per forward pass of the network.
        annotate: a folder for annotated copies (images as JPEG, videos as MP4).
        max_pixels: images declaring more pixels are refused undecoded (decompression bombs).
        workers: image decoding threads.
        device: torch device (default: cuda when available).
        precision: ``32-true``, or ``bf16-mixed``/``16-mixed``: the network under autocast, several
            times faster on GPUs and on CPUs with AMX (probabilities move by about 1e-3).
        min_face_size: override the training's smallest face (pixels of the detection copy).
        detect_max_side: override the training's detection copy size (larger finds smaller faces).
        mlflow: MLflow settings file, for MLflow model URIs (MLFLOW_TRACKING_URI wins if set).
    """
    if model.startswith(MLFLOW_SCHEMES) and not os.environ.get("MLFLOW_TRACKING_URI") and Path(mlflow).is_file():
        import mlflow as mlflow_lib

        from experiments.tracking import TrackingSettings

        mlflow_lib.set_tracking_uri(TrackingSettings.read(mlflow).tracking_uri)
    predictor = AUPredictor.load(model, device, min_face_size=min_face_size, detect_max_side=detect_max_side)
    predictor.batch_size, predictor.precision = batch_size, precision
    print(f"Model {model}: {len(predictor.aus)} AUs, {predictor.spec['backbone']} x {len(predictor.spec['branches'])}"
          f" branches, crops {predictor.alignment.crop_size} px, on {predictor.device} ({precision})")
    summary = run(predictor, input, out, every, batch_frames, max_pixels, workers, annotate)
    print(summary)
