"""``au-detect predict`` over many devices and nodes: Lightning's predict loop, a share of the inputs per rank.

    au-detect predict --model best.ckpt --input archive/ --out aus.parquet --trainer.devices 4
    torchrun --nnodes 2 --nproc-per-node 8 -m experiments.cli predict ... --trainer.devices 8 --trainer.num_nodes 2

The inputs, expanded as one process expands them, are cut into shares in input order:
consecutive photos (and inputs that cannot be opened) ``share_images`` at a time, and each video
whole. Videos are not cut in time: person ids, smoothing and events run across the whole video,
and a video cut at a time would start its people afresh there. Lightning's distributed sampler
deals the shares to the ranks (every world-th one); a rank predicts a share with the one-process
code, on its own device, into ``<out>.shares/<share>.csv`` (a partial file and a saved place of
its own, so a share cut by a kill goes on from where it stood), and :class:`ShareWriter`, a
``BasePredictionWriter``, records it done. When every rank is through, rank 0 joins the shares in
input order into ``--out``, whole or not at all: the rows, their order, the events, people and
AU-curve pictures of one process; then the shares go.

The same command run again after a kill keeps the shares recorded done and predicts the others,
on whichever rank the sampler now deals them (the number of ranks may change). Shares of other
inputs, options or model (``plan.json``) are set aside. The shares folder must be one that every
rank sees: a filesystem the nodes share.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from datamodules.io.files import write_text
from datamodules.io.sources import Source
from experiments.prediction_outputs import (EVENT_COLUMNS, PredictionSummary, commit, curves_path, events_path,
                                            open_partial, people_path, resume_path, row_header)

log = logging.getLogger(__name__)

SHARES_SUFFIX = ".shares"
PLAN = "plan.json"


@dataclass
class PredictTrainer:
    """Where ``au-detect predict`` runs, in Lightning's words (as ``au-detect fit`` takes them):
    more than one device or node predicts in shares across ranks (:mod:`experiments.predict_ranks`);
    one device (the default) is one process.

    Args:
        accelerator: ``cpu``, ``gpu``, ``auto``...
        devices: devices (processes) per node, or ``auto``.
        num_nodes: nodes of the job (started by torchrun or SLURM on each).
        strategy: ``auto`` (``ddp`` with several devices), ``ddp``...
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"

    @property
    def distributed(self) -> bool:
        """Whether predict runs in Lightning's processes rather than as one (also when started by
        torchrun or SLURM with several processes, whatever ``devices`` says)."""
        return (str(self.devices) != "1" or self.num_nodes != 1
                or int(os.environ.get("WORLD_SIZE", "1")) > 1)


@dataclass
class Share:
    """A piece of a run's inputs that one rank predicts at a time: photos, or one video."""

    sources: list[Source]

    @property
    def video(self) -> bool:
        return len(self.sources) == 1 and self.sources[0].kind == "video" and self.sources[0].error is None


def cut_shares(sources: list[Source], share_images: int) -> list[Share]:
    """``sources`` in input order, as shares: each video alone, the inputs between videos
    ``share_images`` at a time."""
    if share_images < 1:
        raise ValueError(f"--share_images must be at least 1, got {share_images}")
    shares: list[Share] = []
    photos: list[Source] = []
    for src in sources:
        if src.kind == "video" and src.error is None:
            if photos:
                shares.append(Share(photos))
                photos = []
            shares.append(Share([src]))
            continue
        photos.append(src)
        if len(photos) == share_images:
            shares.append(Share(photos))
            photos = []
    if photos:
        shares.append(Share(photos))
    return shares


class SharePlan:
    """A distributed run's shares on disk: ``<out>.shares/`` holds ``plan.json`` (what the shares
    were cut from), each share's CSV (``000012.csv``, with its partial file, saved place, events,
    people and pictures) and, once it is whole, its record (``000012.done.json``: its counts)."""

    def __init__(self, out: Path, shares: list[Share], signature: dict, smoothed: bool):
        self.out, self.shares, self.smoothed = out, shares, smoothed
        self.folder = out.with_name(out.name + SHARES_SUFFIX)
        self.signature = json.loads(json.dumps({**signature, "shares": [[s.path for s in sh.sources] for sh in shares]}))
        self.lock: tuple[Path, IO[str]] | None = None  # rank 0's hold on <out>.partial

    def header(self, predictor) -> list[str]:
        """The joined run's columns (a share of photos alone has no smoothed ones)."""
        return row_header(predictor, self.smoothed)

    def share_out(self, index: int) -> Path:
        return self.folder / f"{index:06d}.csv"

    def _record(self, index: int) -> Path:
        return self.folder / f"{index:06d}.done.json"

    def prepare(self, predictor) -> None:
        """On rank 0, before any share: hold ``<out>.partial`` (a second run on the same ``--out``
        is refused), and set aside shares cut from other inputs, options or model."""
        self.signature.update(json.loads(json.dumps({"thresholds": [float(t) for t in predictor.thresholds],
                                                     "net": predictor.spec, "header": self.header(predictor)})))
        self.lock = open_partial(self.out)
        resume_path(self.out).unlink(missing_ok=True)  # a one-process run's place: not this run's
        plan = self.folder / PLAN
        try:
            fits = json.loads(plan.read_text(encoding="utf-8")) == self.signature
        except FileNotFoundError:
            fits = False
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); starting over", plan, e)
            fits = False
        if not fits and self.folder.exists():
            log.warning("%s: shares of other inputs, options or model; starting over", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not fits:
            write_text(plan, json.dumps(self.signature))
        done = sum(self.done(i) is not None for i in range(len(self.shares)))
        if done:
            print(f"Resuming {self.folder}: {done} of {len(self.shares)} shares done before", flush=True)

    def done(self, index: int) -> dict | None:
        """The record of share ``index`` when it is whole, else None."""
        try:
            record = json.loads(self._record(index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and self.share_out(index).is_file() else None

    def record(self, index: int, summary: PredictionSummary, rank: int) -> None:
        """Share ``index`` is whole: its counts, for the joined run's summary."""
        write_text(self._record(index), json.dumps({"frames": summary.frames, "faces": summary.faces,
                                                    "statuses": dict(summary.statuses), "events": summary.events,
                                                    "seconds": summary.seconds, "rank": rank}))

    def join(self, header: list[str], seconds: float) -> PredictionSummary:
        """Every share, in input order, into ``--out`` (and its events, people and pictures beside
        it, before it, as one process writes them); the shares removed. On rank 0, holding the lock."""
        records = [self.done(i) for i in range(len(self.shares))]
        missing = [i for i, record in enumerate(records) if record is None]
        if missing:
            raise RuntimeError(f"{self.folder}: shares {missing[:10]} are not done; run the same command again")
        smoothed = self.smoothed
        summary = PredictionSummary(str(self.out), Counter(), events=0 if smoothed else None)
        for record in records:
            summary.frames += record["frames"]
            summary.faces += record["faces"]
            summary.statuses.update(record["statuses"])
            if smoothed:
                summary.events += record["events"] or 0
        if smoothed:
            for table, columns in ((events_path, EVENT_COLUMNS), (people_path, None)):
                parts = [table(self.share_out(i)) for i in range(len(self.shares))]
                _join_tables([p for p in parts if p.is_file()], table(self.out), columns)
            self._join_pictures()
        partial, f = self.lock
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for i in range(len(self.shares)):
            _append_rows(self.share_out(i), f, header)
        commit(f, partial, self.out, header)
        f.close()
        self.lock = None
        shutil.rmtree(self.folder)
        summary.seconds = seconds
        return summary

    def _join_pictures(self) -> None:
        """Each video's AU-curve picture into ``<out stem>.curves/``, numbered when two videos share a
        name (as one process numbers them: in input order)."""
        into, taken = curves_path(self.out), set()
        for i in range(len(self.shares)):
            for picture in sorted(curves_path(self.share_out(i)).glob("*.png")):
                stem, n = picture.stem, 2
                name = picture.name
                while name.casefold() in taken:
                    name, n = f"{stem}-{n}.png", n + 1
                taken.add(name.casefold())
                into.mkdir(parents=True, exist_ok=True)
                os.replace(picture, into / name)


def _append_rows(share: Path, f: IO[str], header: list[str]) -> None:
    """A share's rows (after its header) onto ``f``: byte for byte when its columns are the run's;
    else (photos without a video's smoothed columns) column by column, the missing ones empty."""
    with open(share, newline="", encoding="utf-8") as part:
        first = part.readline()
        if next(csv.reader([first])) == header:
            shutil.copyfileobj(part, f)
            return
        part.seek(0)
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writerows(csv.DictReader(part))


def _join_tables(parts: list[Path], into: Path, columns: list[str] | None) -> None:
    """CSV tables with one header, in order, as ``into`` (whole or not at all)."""
    tmp = into.with_name(into.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if parts:
            with open(parts[0], newline="", encoding="utf-8") as first:
                f.write(first.readline())
        elif columns is not None:
            csv.writer(f).writerow(columns)
        for part in parts:
            with open(part, newline="", encoding="utf-8") as p:
                p.readline()
                shutil.copyfileobj(p, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, into)


def _one(batch: list[int]) -> int:
    return batch[0]


class SharePredictor(LightningModule):
    """Lightning's side of a distributed predict: the predictor loaded on the rank's device
    (``load(device)``), and each share the sampler deals this rank predicted by
    ``predict_share(predictor, sources, out)`` (the one-process run)."""

    def __init__(self, load: Callable[[str], Any], predict_share: Callable[..., PredictionSummary],
                 plan: SharePlan):
        super().__init__()
        self.load, self.predict_share, self.plan = load, predict_share, plan
        self.predictor = None

    def setup(self, stage: str) -> None:
        self.predictor = self.load(str(self.trainer.strategy.root_device))
        if self.trainer.is_global_zero:
            self.plan.prepare(self.predictor)
        self.trainer.strategy.barrier("predict shares planned")

    def predict_step(self, index: int) -> tuple[int, PredictionSummary] | None:
        if index >= len(self.plan.shares) or self.plan.done(index) is not None:  # idle, or done before a kill
            return None
        sources = self.plan.shares[index].sources
        return index, self.predict_share(self.predictor, sources, self.plan.share_out(index))


class ShareWriter(BasePredictionWriter):
    """Records each share a rank finishes; when every rank is through, rank 0 joins them."""

    def __init__(self, plan: SharePlan):
        super().__init__(write_interval="batch")
        self.plan = plan
        self.summary: PredictionSummary | None = None
        self.start = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if prediction is None:
            return
        index, summary = prediction
        self.plan.record(index, summary, trainer.global_rank)
        kind = "video" if self.plan.shares[index].video else f"{len(self.plan.shares[index].sources)} inputs"
        print(f"[rank {trainer.global_rank}] share {index + 1}/{len(self.plan.shares)} ({kind}): {summary.frames} "
              f"frames, {summary.faces} faces in {summary.seconds:.1f} s", flush=True)

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("predict shares done")
        if trainer.is_global_zero:
            self.summary = self.plan.join(self.plan.header(pl_module.predictor), time.perf_counter() - self.start)


def predict_on_ranks(settings: PredictTrainer, load: Callable[[str], Any],
                     predict_share: Callable[..., PredictionSummary], sources: list[Source], out: Path,
                     share_images: int, signature: dict, smoothed: bool) -> PredictionSummary | None:
    """Predict ``sources`` in shares over Lightning's ranks into ``out``; the joined run's summary
    on rank 0, None on the others."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = SharePlan(out, cut_shares(sources, share_images), signature, smoothed)
    writer = ShareWriter(plan)
    trainer = Trainer(accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes,
                      strategy=settings.strategy, logger=False, callbacks=[writer], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    # Lightning's sampler gives every rank at least one item: fewer shares than ranks, the rest idle
    shares = DataLoader(range(max(len(plan.shares), trainer.world_size)), batch_size=1, collate_fn=_one)
    try:
        trainer.predict(SharePredictor(load, predict_share, plan), dataloaders=shares, return_predictions=False)
    finally:
        if plan.lock is not None:
            plan.lock[1].close()
    return writer.summary
