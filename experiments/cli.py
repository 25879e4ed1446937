"""``au-detect``: the command line of the project, one command per job.

``au-detect`` (or ``--help``) lists the commands; ``au-detect <command> --help`` gives every option
of one (all come from signatures, through jsonargparse: ``--config file.yaml`` and
``--print_config`` work everywhere). Training commands are LightningCLIs
(:mod:`experiments.lightning_cli`); the others are functions with a parser made from their
signatures.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

# Only jsonargparse here: torch, Lightning and MLflow are imported by the command that runs, so that
# ``au-detect``, ``--help`` and ``--version`` answer at once.
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser


@dataclass(frozen=True)
class Command:
    group: str
    help: str
    target: str  # "module:attribute", imported only when the command runs
    kind: str = "main"  # "main": called with the args; "function": parsed from its signature; "cli": a LightningCLI

    def load(self) -> Callable:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def run(self, name: str, args: list[str]) -> object:
        if self.kind == "function":
            return _run_function(name, args)
        if self.kind == "cli":
            if name in ("fit", "validate", "test"):
                return self.load()(args=[name, *args], parser_kwargs={"prog": "au-detect"})
            return self.load()(name, args=args, parser_kwargs={"prog": f"au-detect {name}"})
        return self.load()(args)


def _run_function(name: str, args: list[str]) -> object:
    """A command made from a function's signature (see :func:`function_parser`)."""
    fn = FUNCTIONS[name]
    parser = _function_subparser(name, fn)
    try:
        config = parser.parse_args(args)
    except ArgumentError as e:
        _usage_exit(parser, e, args)
    init = parser.instantiate_classes(config)
    init.pop("config", None)
    return fn(**init)


COMMANDS: dict[str, Command] = {
    "fit": Command("training", "train the AU detector: balancing, soft thresholds, the run and model in MLflow",
                   "experiments.lightning_cli:AUDetectCLI", "cli"),
    "validate": Command("training", "validate a checkpoint (thresholds fitted again, into its MLflow run)",
                        "experiments.lightning_cli:AUDetectCLI", "cli"),
    "test": Command("training", "test a checkpoint at its fitted thresholds (into its MLflow run)",
                    "experiments.lightning_cli:AUDetectCLI", "cli"),
    "pretrain-face": Command("training", "pretrain the face branch: ArcFace on identities, verification",
                             "experiments.lightning_cli:PretrainCLI", "cli"),
    "pretrain-expression": Command("training", "pretrain the expression branch: basic emotions",
                                   "experiments.lightning_cli:PretrainCLI", "cli"),
    "pipeline": Command("training", "the whole method: data, both branches pretrained, the AU fit and test; "
                        "one MLflow parent run", "experiments.pipeline:main"),
    "ablation": Command("training", "the paper's Table 2 over seeds, every row an MLflow run",
                        "experiments.ablation.run:main"),
    "sweep": Command("training", "an Optuna study over fit options, every trial an MLflow run; resumable, "
                     "several processes on one study", "experiments.sweep:sweep", "function"),
    "sync-tracking": Command("training", "send to MLflow what a fit kept on disk while its tracking server "
                             "was unreachable", "experiments.tracking:sync_tracking", "function"),
    "predict": Command("using a trained detector", "every face of photos, folders, lists and videos to CSV",
                       "experiments.predict:predict", "function"),
    "export": Command("using a trained detector", "the AU network as ONNX (onnxruntime, C++, C#, browsers), "
                      "checked against PyTorch", "experiments.export:export", "function"),
    "serve": Command("using a trained detector", "serve a logged model over HTTP (MLflow's scoring server) "
                     "with worker, timeout and connection limits", "experiments.serve:serve", "function"),
    "verify": Command("using a trained detector", "check a logged model's code files against the hashes "
                      "recorded when it was logged", "experiments.registry:verify", "function"),
    "promote": Command("using a trained detector", "point a registry alias (champion) at a model version: "
                       "models:/<name>@<alias>", "experiments.registry:promote", "function"),
    "compare": Command("training", "runs side by side per AU (F1, thresholds, change vs a baseline): "
                       "table, heat map, an MLflow run", "experiments.compare:compare", "function"),
    "crossval": Command("training", "subject-exclusive k-fold (bp4d-3fold, disfa-3fold, random): a fit per fold, "
                        "one MLflow parent run with the field's table", "experiments.crossval:crossval", "function"),
    "synth": Command("data", "render SynthAU (images, EmotioNet-form manifests, contact sheet)",
                     "experiments.data:synth", "function"),
    "import": Command("data", "BP4D, DISFA or Aff-Wild2 from their files as distributed to a manifest with "
                      "subject, sequence and frame columns, with a report", "experiments.benchmarks:main"),
    "download": Command("data", "fetch the images of URL manifests (EmotioNet), resumable, with a report",
                        "experiments.data:download", "function"),
    "align": Command("data", "detect and align the faces of manifests into crop caches, with a report",
                     "experiments.data:align", "function"),
    "prepare": Command("data", "what a training config prepares: generate or download, align, report",
                       "experiments.data:prepare"),
}


class _Functions(Mapping):
    """The function commands by name, each imported when first looked up."""

    def __getitem__(self, name: str) -> Callable:
        command = COMMANDS.get(name)
        if command is None or command.kind != "function":
            raise KeyError(name)
        return command.load()

    def __iter__(self) -> Iterator[str]:
        return (name for name, c in COMMANDS.items() if c.kind == "function")

    def __len__(self) -> int:
        return sum(c.kind == "function" for c in COMMANDS.values())


FUNCTIONS: Mapping[str, Callable] = _Functions()
# Options given as lists on the shell (--input a.jpg photos/ clip.mp4) and flags without a value.
# predict's --input may be left out for --describe: predict() says when neither is given.
LISTS = {"predict": ("input", "images, folders, globs, lists of images, videos", False),
         "download": ("manifest", "manifests whose images are URLs"),
         "compare": ("runs", "run ids, the first the baseline (or --filter)", False),
         "export": ("calibration", "images, folders, globs or manifests of faces to calibrate --int8 on", False)}
FLAGS = {"download": ("retry_failed",), "predict": ("describe",), "export": ("int8",)}


def function_parser() -> ArgumentParser:
    """One parser with a subcommand per function command, its options from the signature."""
    parser = ArgumentParser(prog="au-detect", allow_abbrev=False)
    commands = parser.add_subcommands(dest="command")
    for name, fn in FUNCTIONS.items():
        commands.add_subcommand(name, _function_subparser(name, fn), help=COMMANDS[name].help)
    return parser


def _function_subparser(name: str, fn: Callable) -> ArgumentParser:
    """``au-detect <name>``'s parser: ``fn``'s summary, then an option per argument with its own help."""
    # Errors come back as exceptions, to be said in one line (_usage_exit), not after the usage.
    sub = ArgumentParser(prog=f"au-detect {name}", description=_summary(fn), allow_abbrev=False,
                         exit_on_error=False)
    sub.add_argument("--config", action=ActionConfigFile)
    parameters = inspect.signature(fn).parameters
    flags = [f for f in FLAGS.get(name, ()) if f in parameters]
    skip = set(flags)
    if name in LISTS:
        option, help_text, *required = LISTS[name]  # a third item False: the list may be left out
        # without --describe to take its place, predict still needs --input
        required = (required[0] if required else True) or (name == "predict" and "describe" not in parameters)
        sub.add_argument(f"--{option}", nargs="+", required=required, help=help_text)
        skip.add(option)
    for flag in flags:
        sub.add_argument(f"--{flag}", action=ActionYesNo, default=False, help=_arg_doc(fn, flag))
    sub.add_function_arguments(fn, as_group=False, skip=skip or None)
    return sub


def _summary(fn: Callable) -> str:
    """A docstring without its ``Args:`` block: each argument's text is the help of its option."""
    return inspect.cleandoc(fn.__doc__ or "").split("\nArgs:")[0].strip()


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


def _usage_exit(parser: ArgumentParser, error: ArgumentError, args: Sequence[str]) -> None:
    """Exit 2 with what the parser refused in one line (and where to see the options)."""
    from experiments.lightning_cli import TrackedCLI

    print(TrackedCLI.usage_error(parser, error, args), file=sys.stderr)
    raise SystemExit(2)


# Errors of what the user gave (a file, a model URI), said in one line from the shell, not a traceback.
USER_ERRORS = ("CheckpointError", "WeightsError", "ManifestError", "TrackingServerUnreachable", "ModelConfigError",
               "OutputBusy", "ModelCodeMismatch")


def _user_error(e: BaseException, command: str, args: Sequence[str]) -> tuple[int, str] | None:
    """``(exit code, line)`` for an error of what the user gave, ``None`` for a fault of the program."""
    if type(e).__name__ in USER_ERRORS or isinstance(e, FileNotFoundError):
        return 1, f"au-detect: error: {e}"
    if isinstance(e, ValueError) and "--input" in str(e):  # predict given neither --input nor --describe
        return 2, f"au-detect {command}: error: {e}"
    if isinstance(e, ValueError) and str(e).startswith("--"):  # a value an option was given, refused by name
        return 1, f"au-detect {command}: error: {e}"
    exceptions = sys.modules.get("mlflow.exceptions")  # imported by the command if it used MLflow
    if exceptions is not None and isinstance(e, exceptions.MlflowException) and (
            e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(e).lower()):
        model = next((b for a, b in zip(args, args[1:]) if a == "--model"), None)
        model = model or next((a.split("=", 1)[1] for a in args if a.startswith("--model=")), "the model")
        import mlflow

        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ("train one first (au-detect pipeline --config experiments/configs/pipeline_demo.yaml)"
                if model.startswith("models:/") else
                "the run ids are in the MLflow UI (mlflow ui), or pass --mlflow with the settings of its store")
        return 1, f"au-detect: error: {model}: {what} in {mlflow.get_tracking_uri()}: {hint}"
    return None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``au-detect``; ``args`` defaults to the command line (tests pass a list).

    A command line the parser refuses ends with one line and exit 2. From the command line, a
    file that is refused (a missing model, a checkpoint that is not data, a malformed manifest, a
    model URI MLflow does not have) ends the command with its message and exit 1, not a traceback.
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
        close = difflib.get_close_matches(args[0], COMMANDS, n=1)
        print(f"au-detect: error: unknown command {args[0]!r}" + (f"; did you mean {close[0]}?" if close else ""),
              "see: au-detect --help", sep="\n", file=sys.stderr)
        raise SystemExit(2)
    # LightningCLI warns when it is given args while sys.argv has some too: here they are the
    # command line's own (DDP relaunches the same command line on the other ranks).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        command.run(args[0], args[1:])
    except Exception as e:
        said = _user_error(e, args[0], args[1:]) if from_shell else None
        if said is None:
            raise
        print(said[1], file=sys.stderr)
        raise SystemExit(said[0]) from None


if __name__ == "__main__":
    main()
