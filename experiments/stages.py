"""What the chained commands (``au-detect pipeline``, ``au-detect ablation``) share: their command
line (a function's signature, ``--config``), a config file with some keys changed, and a branch
pretrained unless its checkpoint is already there."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from callbacks.tracking.mlflow_run import mlflow_logger
from experiments.lightning_cli import AUDetectCLI, PretrainCLI

BRANCH_TASKS = {"face": "pretrain-face", "emotion": "pretrain-expression"}
STAGE_TAG = "au_detect.stage"  # which stage of a chained command a run is (data, pretrain-face, fit...)


def function_parser(fn: Callable, prog: str, description: str | None) -> ArgumentParser:
    """A command line made of ``fn``'s signature, with ``--config`` for a YAML file of its arguments."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(fn, as_group=False)
    return parser


def run_function(fn: Callable, parser: ArgumentParser, args: Sequence[str] | None) -> Any:
    """``fn`` called with what ``parser`` makes of ``args`` (default: the command line)."""
    init = parser.instantiate_classes(parser.parse_args(list(sys.argv[1:] if args is None else args)))
    init.pop("config", None)
    return fn(**init)


def with_overrides(config: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """A config file's content with dotted keys set in it: what LightningCLI takes as ``args``.

    >>> with_overrides("experiments/configs/demo.yaml", {"trainer.max_epochs": 2, "model.scheduler.init_args.T_max": 2,
    ...                                          "run_name": "a"})["model"]["scheduler"]["init_args"]["T_max"]
    2
    """
    content = yaml.safe_load(Path(config).read_text()) or {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = content
        for name in parents:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[last] = value
    return content


def pretrain_branch(branch: str, config: str, overrides: dict[str, Any], path: str | Path, mlflow_config: str,
                    run_name: str, tags: dict[str, str], prefix: str = "") -> tuple[str, bool]:
    """The branch's checkpoint at ``path``: pretrained now with its ``au-detect pretrain-*`` command on
    ``config`` (its backbone exported to ``path``), or reused when the file is there already.
    ``overrides`` change the pretraining config (where its checkpoints go: ``trainer.default_root_dir``).

    Returns the path and whether it was trained now.
    """
    path = Path(path)
    if path.is_file():
        print(f"{prefix}{branch} branch: reusing {path}")
        return str(path), False
    task = BRANCH_TASKS[branch]
    overrides = {**overrides, "export.path": str(path), "mlflow": mlflow_config, "run_name": run_name, "tags": tags}
    print(f"{prefix}au-detect {task} fit --config {config} with {overrides}")
    PretrainCLI(task, args={"fit": with_overrides(config, overrides)})
    return str(path), True


def fit_and_test(config: dict[str, Any]) -> dict[str, Any]:
    """``au-detect fit`` on a config's content, then ``au-detect test`` on its best checkpoint, which
    continues the fit's MLflow run (the checkpoint carries its id). Returns the run id, the
    checkpoint, the fit's and test's scalar ``val/`` and ``test/`` figures, a test photo, and the crop
    cache each split was read from."""
    fit = AUDetectCLI(args={"fit": config})
    logger = mlflow_logger(fit.trainer)
    best = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    test = AUDetectCLI(args={"test": {**config, "ckpt_path": best}})
    metrics = {k: float(v) for k, v in {**fit.trainer.callback_metrics, **test.trainer.callback_metrics}.items()
               if k.startswith(("test/", "val/")) and v.numel() == 1}
    caches = {stage: str(split.path) for cli in (fit, test) for stage, split in cli.datamodule.splits.items()}
    return {"run_id": logger.run_id if logger else None, "checkpoint": best, "metrics": metrics,
            "photo": fit.example_photo(), "caches": caches}
