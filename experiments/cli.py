"""``au-detect``: the command line of the project.

Data commands:
    au-detect synth    render SynthAU (images, EmotioNet-form manifests, contact sheet)
    au-detect align    align the faces of manifests into crop caches, with a report
    au-detect prepare  what a training run prepares from a config: generate, align, report

Every option comes from a function signature (jsonargparse), so ``--help`` lists them all and
``--config file.yaml`` takes them from YAML.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.alignment import AlignedSplit, AlignmentSettings, align_manifest, summarize
from datamodules.au_datamodule import AUDataModule
from datamodules.manifest import EMOTIONET_AUS, read_manifest
from datamodules.synthetic import SynthAUSettings, generate_synthau


def synth(root: str = "data/synthau", num_images: int = 2000, seed: int = 0, num_identities: int = 120,
          width: int = 640, height: int = 480, val_fraction: float = 0.1, test_fraction: float = 0.1,
          workers: int | None = None, force: bool = False) -> None:
    """Render the SynthAU data set.

    Args:
        root: output folder (images/, train.tsv, val.tsv, test.tsv, faces.jsonl, contact_sheet.png).
        num_images: scenes in all splits together.
        seed: the data set is a pure function of its settings and this seed.
        num_identities: synthetic people.
        width: scene width in pixels.
        height: scene height in pixels.
        val_fraction: share of scenes in the validation split.
        test_fraction: share of scenes in the test split.
        workers: rendering processes (default: up to 4).
        force: render again even if ``root`` holds a complete data set with these settings.
    """
    settings = SynthAUSettings(num_images=num_images, seed=seed, num_identities=num_identities, width=width,
                               height=height, val_fraction=val_fraction, test_fraction=test_fraction)
    summary = generate_synthau(root, settings, workers=workers, force=force)
    print(f"SynthAU in {root}: {summary['counts']}, {summary['identities']} identities, "
          f"{len(summary['expressions'])} expressions")
    print(f"  AUs under 5% positive: {summary['aus_under_5pct']}, over 20%: {summary['aus_over_20pct']}, "
          f"unlabelled (999): {100 * summary['unlabelled_share']:.1f}%")
    print(f"  contact sheet: {Path(root) / 'contact_sheet.png'}, AU gallery: {Path(root) / 'au_gallery.png'}")


def align(manifests: list[str], cache_dir: str = "data/cache", image_root: str | None = None,
          aus: list[int] = list(EMOTIONET_AUS), alignment: AlignmentSettings = AlignmentSettings(),
          workers: int = 0, device: str | None = None) -> None:
    """Detect, align and cache the faces of one or more manifests.

    Args:
        manifests: manifest files (EmotioNet form, TSV or CSV with a header).
        cache_dir: where the crop caches go (one folder per manifest, keyed by content and settings).
        image_root: folder that relative image paths start from (default: the manifest's folder).
        aus: AU columns to read.
        alignment: detection and crop settings.
        workers: image decoding processes (0: decode in this process, fastest on a small CPU).
        device: torch device for MTCNN (default: cuda when available).
    """
    for path in manifests:
        manifest = read_manifest(path, aus=aus, root=image_root)
        folder = align_manifest(manifest, cache_dir, alignment, root=image_root, workers=workers, device=device,
                                progress=True)
        _print_report(AlignedSplit.open(folder).report, folder)


def prepare(data: AUDataModule) -> None:
    """Prepare the data of a training config: generate SynthAU if used, align every split, report."""
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="au-detect", description=__doc__)
    commands = parser.add_subcommands(dest="command")
    for name, fn in (("synth", synth), ("align", align)):
        sub = ArgumentParser(description=fn.__doc__)
        sub.add_argument("--config", action=ActionConfigFile)
        sub.add_function_arguments(fn, as_group=False)
        commands.add_subcommand(name, sub, help=fn.__doc__.splitlines()[0])
    # prepare reads the same YAML as training: its data section builds the AUDataModule.
    sub = ArgumentParser(description=prepare.__doc__)
    sub.add_argument("--config", action=ActionConfigFile, help="a training config with a data section")
    sub.add_class_arguments(AUDataModule, "data")
    commands.add_subcommand("prepare", sub, help=prepare.__doc__.splitlines()[0])
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``au-detect``; ``args`` defaults to the command line (tests pass a list)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if args is None else args))
    command = cfg.command
    init = parser.instantiate_classes(cfg)[command]
    init.pop("config", None)
    {"synth": synth, "align": align, "prepare": prepare}[command](**init)


if __name__ == "__main__":
    main()
