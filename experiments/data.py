"""The data commands of ``au-detect``: render SynthAU, download EmotioNet's images, align, prepare.

    au-detect synth    --root data/synthau --num_images 2000
    au-detect synth    --layout bp4d --root data/synthau_bp4d     (SynthAU as BP4D, DISFA or Aff-Wild2 ship)
    au-detect synth    --video true --root data/synthau_video     (clips of people who cross, leave and return)
    au-detect download --manifest train.tsv val.tsv --out data/emotionet
    au-detect align    --manifests '[data/synthau/train.tsv]'
    torchrun --nproc_per_node 8 --no-python au-detect align --manifests ...   (the images shared by 8 processes)
    au-detect prepare  --config experiments/configs/demo.yaml
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from datamodules.alignment.align import AlignmentSettings
from datamodules.alignment.crop_cache import AlignedSplit, align_manifest, summarize
from datamodules.download.downloader import DownloadInterrupted, DownloadSettings, download_manifests
from datamodules.io.manifest import EMOTIONET_AUS, read_manifest
from datamodules.alignment.ranks import Ranks
from datamodules.synthau.generate import SynthAUSettings, generate_synthau
from datamodules.synthau.layouts import LAYOUTS, LayoutSettings, render_layout
from datamodules.synthau.video import VideoSettings, render_videos
from experiments.lightning_cli import AUDetectCLI


def synth(root: str | None = None, num_images: int = 2000, seed: int = 0, num_identities: int = 120,
          width: int | None = None, height: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
          workers: int | None = None, force: bool = False, layout: str | None = None, subjects: int | None = None,
          sequences: int | None = None, frames: int | None = None, fps: float | None = None, crop: int = 112,
          video: bool = False, clips: int = 3, seconds: float = 12.0, people: str = "2-4") -> None:
    """Render the SynthAU data set, SynthAU in the folders and label files of BP4D, DISFA or Aff-Wild2,
    or SynthAU video clips with per-frame ground truth.

    Args:
        root: output folder (default ``data/synthau``, ``data/synthau_<layout>`` with ``layout``,
            ``data/synthau_video`` with ``video``). SynthAU: images/, train.tsv, val.tsv, test.tsv,
            faces.jsonl, contact_sheet.png; a layout: the data set's own tree, truth.jsonl and
            synthau_layout.json; video: clip_000.avi, clip_000.truth.jsonl... and videos.json.
        num_images: scenes in all splits together (SynthAU).
        seed: the data set is a pure function of its settings and this seed.
        num_identities: synthetic people (SynthAU).
        width: scene width in pixels (default 640; 320 for a layout; 480 for video).
        height: scene height in pixels (default 480; 240 for a layout; 360 for video).
        val_fraction: share of scenes in the validation split (SynthAU).
        test_fraction: share of scenes in the test split (SynthAU).
        workers: rendering processes (default: up to 4).
        force: render again even if ``root`` holds a complete data set with these settings.
        layout: left out for SynthAU itself; ``bp4d``, ``disfa`` or ``affwild2`` to render SynthAU as
            that data set is distributed, for ``au-detect import`` and ``au-detect crossval``
            (see datamodules.synthau.layouts).
        subjects: a layout's subjects (default: all 41 of BP4D, all 27 of DISFA, with the published
            ids; 20 Aff-Wild2 persons).
        sequences: BP4D tasks per subject (default 2, at most 8), Aff-Wild2 videos per person
            (default 1); DISFA has one video per subject.
        frames: labelled frames per sequence (default: BP4D 10, DISFA 20, Aff-Wild2 30).
        fps: frame rate of DISFA's videos (default 20) or of the video clips (default 10).
        crop: side of Aff-Wild2's face crops in pixels.
        video: true to render video clips in which 2-4 people walk, cross, leave the frame and come
            back, each frame's faces, person ids and AUs in a truth file (see datamodules.synthau.video).
        clips: how many video clips.
        seconds: length of each video clip (at least 3).
        people: people per video clip, a range ``2-4`` or a number ``3`` (2 to 6).
    """
    if video:
        _synth_video(root or "data/synthau_video", seed, width or 480, height or 360, 10.0 if fps is None else fps,
                     clips, seconds, people, workers, force)
        return
    if layout is not None:
        _synth_layout(layout, root or f"data/synthau_{layout}", seed, width or 320, height or 240, workers, force,
                      subjects, sequences, frames, 20.0 if fps is None else fps, crop)
        return
    root = root or "data/synthau"
    settings = SynthAUSettings(num_images=num_images, seed=seed, num_identities=num_identities, width=width or 640,
                               height=height or 480, val_fraction=val_fraction, test_fraction=test_fraction)
    summary = generate_synthau(root, settings, workers=workers, force=force)
    print(f"SynthAU in {root}: {summary['counts']}, {summary['identities']} identities, "
          f"{len(summary['expressions'])} expressions")
    print(f"  AUs under 5% positive: {summary['aus_under_5pct']}, over 20%: {summary['aus_over_20pct']}, "
          f"unlabelled (999): {100 * summary['unlabelled_share']:.1f}%")
    print(f"  contact sheet: {Path(root) / 'contact_sheet.png'}, AU gallery: {Path(root) / 'au_gallery.png'}")


def _synth_layout(layout: str, root: str, seed: int, width: int, height: int, workers: int | None, force: bool,
                  subjects: int | None, sequences: int | None, frames: int | None, fps: float, crop: int) -> None:
    if layout not in LAYOUTS:
        raise SystemExit(f"au-detect synth: --layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    try:
        settings = LayoutSettings(layout=layout, seed=seed, subjects=subjects, sequences=sequences, frames=frames,
                                  width=width, height=height, fps=fps, crop=crop).resolved()
    except ValueError as e:
        raise SystemExit(f"au-detect synth: {e}") from None
    started = time.monotonic()
    try:
        summary = render_layout(root, settings, workers=workers, force=force)
    except FileExistsError as e:
        raise SystemExit(f"au-detect synth: {e}") from None
    seconds = time.monotonic() - started
    what = {"bp4d": "tasks", "disfa": "videos per camera", "affwild2": "annotation files"}[layout]
    print(f"SynthAU as {layout} in {root} ({seconds:.1f} s): {len(summary['subjects'])} subjects, "
          f"{summary['sequences']} {what}, {summary['labelled_frames']} labelled frames")
    print(f"  quirks: {', '.join(f'{k} {v}' for k, v in summary['quirks'].items())}")
    print(f"  ground truth: {Path(root) / 'truth.jsonl'}")
    out = Path(root).with_name(f"{Path(root).name}_manifest")
    print(f"  next: au-detect import {layout} --root {root} --out {out}")


def _synth_video(root: str, seed: int, width: int, height: int, fps: float, clips: int, seconds: float, people: str,
                 workers: int | None, force: bool) -> None:
    low, _, high = str(people).partition("-")
    if not (low.strip().isdigit() and (high.strip().isdigit() or not high)):
        raise SystemExit(f"au-detect synth: --people {people!r}: a range such as 2-4, or a number")
    try:
        settings = VideoSettings(clips=clips, people=(int(low), int(high or low)), seconds=seconds, fps=fps,
                                 width=width, height=height, seed=seed).checked()
    except ValueError as e:
        raise SystemExit(f"au-detect synth: {e}") from None
    started = time.monotonic()
    try:
        summary = render_videos(root, settings, workers=workers, force=force)
    except FileExistsError as e:
        raise SystemExit(f"au-detect synth: {e}") from None
    total = summary["totals"]
    print(f"SynthAU video in {root} ({time.monotonic() - started:.1f} s): {total['clips']} clips, "
          f"{total['people']} people, {total['frames']} frames, {total['crossings']} frames with crossing faces, "
          f"{total['exits']} exits, {total['returns']} returns")


def align(manifests: list[str], cache_dir: str = "data/cache", image_root: str | None = None,
          aus: Sequence[int] = EMOTIONET_AUS, alignment: AlignmentSettings = AlignmentSettings(),
          workers: int = 0, device: str | None = None, checkpoint_every: int = 1024) -> None:
    """Detect, align and cache the faces of one or more manifests.

    Args:
        manifests: manifest files (EmotioNet form, TSV or CSV with a header).
        cache_dir: where the crop caches go (one folder per manifest, keyed by content and settings).
        image_root: folder that relative image paths start from (default: the manifest's folder).
        aus: AU columns to read.
        alignment: detection and crop settings.
        workers: image decoding threads (0: decode in turn with detection, fastest on a small CPU).
        device: torch device for MTCNN (default: each process's GPU when there are GPUs).
        checkpoint_every: images between flushes of the crops and the journal (what a killed
            alignment keeps).

    Started by torchrun (``torchrun --nproc_per_node N [--nnodes M ...] --no-python au-detect
    align ...``), the processes share out each manifest's images and write the one cache a single
    process would; ``cache_dir`` must then be on a filesystem every node sees.
    """
    ranks = Ranks.from_env()
    if ranks.distributed and ranks.rank == 0:
        print(f"aligning with {ranks.world} processes")
    for path in manifests:
        manifest = read_manifest(path, aus=aus, root=image_root)
        folder = align_manifest(manifest, cache_dir, alignment, root=image_root, workers=workers, device=device,
                                progress=ranks.rank == 0, checkpoint_every=checkpoint_every, ranks=ranks)
        if ranks.rank == 0:
            _print_report(AlignedSplit.open(folder).report, folder)


def download(manifest: list[str], out: str = "data/emotionet", settings: DownloadSettings = DownloadSettings(),
             aus: Sequence[int] = EMOTIONET_AUS, has_header: bool = True, progress: bool = True,
             retry_failed: bool = False) -> None:
    """Download the images of manifests that reference URLs (EmotioNet), resumably.

    Args:
        manifest: manifests whose image column holds http(s) URLs.
        out: folder for images/, the <name>.local.tsv manifests and download_report.json.
        settings: concurrency, the deadline of each file's whole transfer (settings.timeout, retries
            included), retries and size limits.
        aus: AU columns of the manifests.
        has_header: False for EmotioNet's raw header-less files.
        progress: show a progress bar.
        retry_failed: request again the URLs whose failure the previous download_report.json lists
            as permanent (HTTP 404, not an image, too large...); by default they are not asked again.
    """
    try:
        report = download_manifests(manifest, out, settings, aus=aus, progress=progress, has_header=has_header,
                                    retry_failed=retry_failed)
    except DownloadInterrupted as e:  # Ctrl-C: say what was saved, exit as an interrupted command does
        if e.report is not None:
            print(e.report.summary())
        raise SystemExit(130) from None
    print(report.summary())
    for source, local in report.local_manifests.items():
        print(f"  {source} -> {local or 'no row left'}")
    if not report.rows_kept:
        raise SystemExit(1)


def prepare(args: Sequence[str] | dict) -> None:
    """Prepare the data of a training config: generate SynthAU or download, align every split, report.

    ``args`` are those of ``au-detect fit`` (``--config experiments/configs/demo.yaml``, overrides), or a
    config's content as a dict: the
    config is parsed by the same LightningCLI, without tracking or branch weights (the data need
    neither, and pretrained branches may not exist yet), and only its data module does anything.
    """
    if isinstance(args, dict):  # a config's content (what the chained commands hand over)
        config = {**args, "trainer": {**args.get("trainer", {}), "logger": False},
                  "model": {**args.get("model", {}), "face_weights": None, "emotion_weights": None}}
        cli = AUDetectCLI(args=config, run=False)
    else:
        cli = AUDetectCLI(args=[*args, "--trainer.logger=false", "--model.face_weights=null",
                                "--model.emotion_weights=null"], run=False)
    data = cli.datamodule
    data.prepare_data()
    data.setup()
    for stage, report in data.reports.items():
        _print_report(report, data.splits[stage].path if stage in data.splits else None)


def _print_report(report: dict, folder: Path | None) -> None:
    print(summarize(report))
    if folder is not None:
        print(f"  cache: {folder}  (report.json, aligned_sheet.png)")
    for row in report["skipped_rows"][:10]:
        print(f"  skipped line {row['line']}: {row['image']}: {row['error']}")
    if len(report["skipped_rows"]) > 10:
        print(f"  ... {len(report['skipped_rows']) - 10} more in report.json")
