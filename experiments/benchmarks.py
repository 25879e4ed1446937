"""``au-detect import``: BP4D, DISFA or Aff-Wild2 from their files as distributed to a manifest with
``subject``, ``sequence`` and ``frame`` columns, and a report of every row left out.

``au-detect import bp4d --root /data/BP4D --out data/bp4d`` writes ``data/bp4d/bp4d.tsv`` and
``data/bp4d/import_report.json``; ``au-detect import <data set> --help`` lists the options of one.
The manifests feed ``au-detect crossval`` (the published subject-exclusive folds) and ``au-detect fit``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.benchmarks.report import REPORT_NAME, ImportReport

# Data set -> its importer, imported when the command runs.
IMPORTERS = {
    "bp4d": ("datamodules.benchmarks.bp4d:import_bp4d", "BP4D-Spontaneous: AU_OCC/<subject>_<task>.csv and "
                                                        "<subject>/<task>/<frame>.jpg"),
    "disfa": ("datamodules.benchmarks.disfa:import_disfa", "DISFA: ActionUnit_Labels/SN###/SN###_au<n>.txt "
                                                           "and the left or right camera's videos"),
    "affwild2": ("datamodules.benchmarks.affwild2:import_affwild2", "Aff-Wild2, ABAW AU Detection Challenge: "
                                                                    "AU_Detection_Challenge/*_Set/*.txt and "
                                                                    "cropped_aligned/<video>/"),
}


def importers() -> dict[str, tuple[Callable[..., ImportReport], str]]:
    """The importers by data set, with what each reads (imported here: the command needs one)."""
    found = {}
    for name, (target, help_text) in IMPORTERS.items():
        module, _, attribute = target.partition(":")
        found[name] = (getattr(importlib.import_module(module), attribute), help_text)
    return found


def build_parser(available: dict[str, tuple[Callable[..., ImportReport], str]] | None = None) -> ArgumentParser:
    """``au-detect import``: a subcommand per data set, its options from the importer's signature."""
    available = importers() if available is None else available
    parser = ArgumentParser(prog="au-detect import", description=_summary(__doc__),
                            allow_abbrev=False)
    commands = parser.add_subcommands(dest="dataset", required=True)
    for name, (fn, help_text) in available.items():
        sub = ArgumentParser(prog=f"au-detect import {name}", description=_summary(fn.__doc__), allow_abbrev=False)
        sub.add_argument("--config", action=ActionConfigFile)
        sub.add_function_arguments(fn, as_group=False)
        commands.add_subcommand(name, sub, help=help_text)
    return parser


def _summary(doc: str | None) -> str:
    """A docstring without its ``Args:`` block: each argument's text is the help of its option."""
    return inspect.cleandoc(doc or "").split("\nArgs:")[0].strip()


def main(args: Sequence[str] | None = None) -> ImportReport:
    """Run ``au-detect import <data set> --root DIR --out DIR [options]``; ``args`` defaults to the
    command line. Prints the report's summary; exits 1 when no frame was imported.
    """
    available = importers()
    parser = build_parser(available)
    config = parser.parse_args(list(sys.argv[1:] if args is None else args))
    dataset = config.dataset
    init = parser.instantiate_classes(config)[dataset]
    init.pop("config", None)
    report = available[dataset][0](**init)
    print(report.summary())
    if report.frames == 0:
        print(f"au-detect import: error: no frame imported from {report.root}; the rows left out are in "
              f"{os.path.join(init['out'], REPORT_NAME)}", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
