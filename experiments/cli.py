"""``au-detect``: the command line of the project, one command per job.

``au-detect`` (or ``--help``) lists the commands; ``au-detect <command> --help`` gives every option
of one (all come from signatures, through jsonargparse: ``--config file.yaml`` and
``--print_config`` work everywhere). Training commands are LightningCLIs
(:mod:`experiments.lightning_cli`); the others are functions with a parser made from their
signatures.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from callbacks.tracking.spool import TrackingServerUnreachable
from datamodules.io.manifest import ManifestError
from experiments import data
from experiments.ablation.run import main as ablation
from experiments.pipeline import main as pipeline
from experiments.lightning_cli import AUDetectCLI, PretrainCLI
from experiments.compare import compare
from experiments.export import export
from experiments.predict import predict
from experiments.sweep import sweep
from experiments.registry import promote
from experiments.tracking import sync_tracking
from lightning_modules.backbones import WeightsError
from lightning_modules.checkpoints import CheckpointError


@dataclass(frozen=True)
class Command:
    group: str
    help: str
    run: Callable[[list[str]], object]


def _function_command(name: str) -> Callable[[list[str]], object]:
    """A command made from a function's signature (see :func:`function_parser`)."""
    def run(args: list[str]) -> object:
        parser = function_parser()
        config = parser.parse_args([name, *args])
        init = parser.instantiate_classes(config)[name]
        init.pop("config", None)
        return FUNCTIONS[name](**init)
    return run


COMMANDS: dict[str, Command] = {
    "fit": Command("training", "train the AU detector: balancing, soft thresholds, the run and model in MLflow",
                   lambda args: AUDetectCLI(args=["fit", *args])),
    "validate": Command("training", "validate a checkpoint (thresholds fitted again, into its MLflow run)",
                        lambda args: AUDetectCLI(args=["validate", *args])),
    "test": Command("training", "test a checkpoint at its fitted thresholds (into its MLflow run)",
                    lambda args: AUDetectCLI(args=["test", *args])),
    "pretrain-face": Command("training", "pretrain the face branch: ArcFace on identities, verification",
                             lambda args: PretrainCLI("pretrain-face", args=args)),
    "pretrain-expression": Command("training", "pretrain the expression branch: basic emotions",
                                   lambda args: PretrainCLI("pretrain-expression", args=args)),
    "pipeline": Command("training", "the whole method: data, both branches pretrained, the AU fit and test; "
                        "one MLflow parent run", pipeline),
    "ablation": Command("training", "the paper's Table 2 over seeds, every row an MLflow run", ablation),
    "sweep": Command("training", "an Optuna study over fit options, every trial an MLflow run; resumable, "
                     "several processes on one study", _function_command("sweep")),
    "sync-tracking": Command("training", "send to MLflow what a fit kept on disk while its tracking server "
                             "was unreachable", _function_command("sync-tracking")),
    "predict": Command("using a trained detector", "every face of photos, folders, lists and videos to CSV",
                       _function_command("predict")),
    "export": Command("using a trained detector", "the AU network as ONNX (onnxruntime, C++, C#, browsers), "
                      "checked against PyTorch", _function_command("export")),
    "promote": Command("using a trained detector", "point a registry alias (champion) at a model version: "
                       "models:/<name>@<alias>", _function_command("promote")),
    "compare": Command("training", "runs side by side per AU (F1, thresholds, change vs a baseline): "
                       "table, heat map, an MLflow run", _function_command("compare")),
    "synth": Command("data", "render SynthAU (images, EmotioNet-form manifests, contact sheet)",
                     _function_command("synth")),
    "download": Command("data", "fetch the images of URL manifests (EmotioNet), resumable, with a report",
                        _function_command("download")),
    "align": Command("data", "detect and align the faces of manifests into crop caches, with a report",
                     _function_command("align")),
    "prepare": Command("data", "what a training config prepares: generate or download, align, report",
                       data.prepare),
}
FUNCTIONS = {"predict": predict, "export": export, "synth": data.synth, "download": data.download, "align": data.align,
             "sync-tracking": sync_tracking, "promote": promote, "compare": compare, "sweep": sweep}
# Options given as lists on the shell (--input a.jpg photos/ clip.mp4) and flags without a value.
LISTS = {"predict": ("input", "images, folders, globs, lists of images, videos"),
         "download": ("manifest", "manifests whose images are URLs"),
         "compare": ("runs", "run ids, the first the baseline (or --filter)", False)}
FLAGS = {"download": ("retry_failed",)}


def function_parser() -> ArgumentParser:
    """One parser with a subcommand per function command, its options from the signature."""
    parser = ArgumentParser(prog="au-detect")
    commands = parser.add_subcommands(dest="command")
    for name, fn in FUNCTIONS.items():
        sub = ArgumentParser(prog=f"au-detect {name}", description=fn.__doc__)
        sub.add_argument("--config", action=ActionConfigFile)
        skip = set(FLAGS.get(name, ()))
        if name in LISTS:
            option, help_text, *required = LISTS[name]  # a third item False: the list may be left out
            sub.add_argument(f"--{option}", nargs="+", required=required[0] if required else True, help=help_text)
            skip.add(option)
        for flag in FLAGS.get(name, ()):
            sub.add_argument(f"--{flag}", action=ActionYesNo, default=False, help=_arg_doc(fn, flag))
        sub.add_function_arguments(fn, as_group=False, skip=skip or None)
        commands.add_subcommand(name, sub, help=COMMANDS[name].help)
    return parser


def _arg_doc(fn: Callable, name: str) -> str:
    """The line(s) of a Google-style docstring that document argument ``name``."""
    lines = (fn.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")), None)
    if start is None:
        return ""
    indent = len(lines[start]) - len(lines[start].lstrip())
    text = [lines[start].strip()[len(name) + 1:].strip()]
    for line in lines[start + 1:]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        text.append(line.strip())
    return " ".join(text)


def usage() -> str:
    """What ``au-detect`` alone prints: every command with what it does."""
    lines = ["usage: au-detect <command> [options]      (au-detect <command> --help: its options;"
             " au-detect --version)", "",
             "Facial Action Unit detection in the wild: MTCNN alignment, a dual-transfer ResNet, multilabel",
             "balanced training, tracked in MLflow.", ""]
    width = max(map(len, COMMANDS))
    for group in dict.fromkeys(c.group for c in COMMANDS.values()):
        lines.append(f"{group}:")
        lines += [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items() if c.group == group]
        lines.append("")
    return "\n".join(lines)


def version() -> str:
    """The installed project's version (``pyproject.toml``; see CHANGELOG.md)."""
    try:
        return importlib.metadata.version("au-detect")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``au-detect``; ``args`` defaults to the command line (tests pass a list).

    From the command line, a file that is refused (a checkpoint that is not data, a malformed
    manifest) ends the command with its message, not a traceback.
    """
    from_shell = args is None
    args = list(sys.argv[1:] if from_shell else args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] in ("-V", "--version"):
        print(f"au-detect {version()}")
        return
    command = COMMANDS.get(args[0])
    if command is None:
        raise SystemExit(f"au-detect: unknown command {args[0]!r}\n\n{usage()}")
    # LightningCLI warns when it is given args while sys.argv has some too: here they are the
    # command line's own (DDP relaunches the same command line on the other ranks).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        command.run(args[1:])
    except (CheckpointError, WeightsError, ManifestError, TrackingServerUnreachable) as e:
        if not from_shell:
            raise
        raise SystemExit(f"au-detect: error: {e}") from None


if __name__ == "__main__":
    main()
