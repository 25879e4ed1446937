"""The LightningCLIs of ``au-detect``: the AU detector and the two pretraining tasks, tracked in MLflow.

    au-detect fit|validate|test --config experiments/configs/demo.yaml          AUDetectCLI
    au-detect pretrain-face|pretrain-expression fit --config ...        PretrainCLI

Every option comes from a class signature (jsonargparse): ``--help`` lists them, ``--config
file.yaml`` takes them from YAML, ``--print_config`` shows the result. Runs go to the MLflow
tracking server of ``--mlflow`` (``mlflow.yaml``), one run per job; checkpoints carry the run id
and are read as data only (:mod:`lightning_modules.checkpoints`).
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Optional, Sequence

import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from callbacks.backbone_export import BackboneExport
from callbacks.mlflow_artifacts import MLflowArtifacts
from callbacks.preemption import AtomicCheckpointIO, Preemption, ResumableCheckpoint
from callbacks.tracking.mlflow_run import RUN_ID_KEY, mlflow_logger, open_client, run_id_from_checkpoint
from callbacks.soft_threshold import SoftThresholdCallback
from callbacks.tracking.system_metrics import SystemMetrics
from callbacks.tracking.spool import SPOOL_DIR, reachable
from datamodules.au_datamodule import AUDataModule
from datamodules.pretrain_datamodule import PretrainDataModule
from experiments.tracking import TrackingSettings, log_params_once, next_commands, registered_name
from lightning_modules.au_detector import AUDetector
from lightning_modules.checkpoints import CheckpointError, load_checkpoint
from lightning_modules.pretrain import ExpressionModule, FaceRecognitionModule

log = logging.getLogger(__name__)

# CLI-only keys: where and how a run is tracked, not what is trained.
NOT_PARAMS = ("ckpt_path", "config", "mlflow", "run_name", "tags")
# What runs are filtered and compared on: params even where they keep their default. Everything
# else is a param only where it differs from the default; config.yaml holds every value.
KEY_PARAMS = ("seed_everything", "trainer.max_epochs", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
              "trainer.precision", "model.backbone", "model.branches", "model.loss", "model.target_rate",
              "model.face_weights", "model.emotion_weights", "model.optimizer.class_path",
              "model.optimizer.init_args.lr", "data.batch_size", "data.balanced_sampling", "data.sampling_power",
              "data.augment", "data.alignment.method", "data.alignment.crop_size", "data.seed",
              "soft_threshold.criterion", "checkpoint.monitor")
COMMAND_TAG = "au_detect.command"


class MLflowSaveConfig(SaveConfigCallback):
    """Lightning's way to keep the config with the logger, for MLflow: the resolved config as the
    run's ``config.yaml``, and as params the values that tell runs apart (:func:`run_params`). A
    resumed run that changes a value (e.g. ``max_epochs``) gets a ``resumed_with/<key>`` tag
    instead, as MLflow params are immutable. The tag ``au_detect.command`` names the command that
    made the run: a ``test`` that continues a fit's run leaves it ``fit``, and its config goes to
    ``config_test.yaml``. Works for any tracking URI, where Lightning's file-writing default does not."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        text = self.parser.dump(self.config, skip_none=False)
        # Values linked from the data when the classes were made (the AU priors, the number of
        # classes) are not options: the model's hyperparameters say what it was built with.
        config = yaml.safe_load(text)
        model = config.get("model") or {}
        linked = {k: v for k, v in pl_module.hparams.items()
                  if k not in model and not k.startswith("_") and _plain(v)}  # not jsonargparse's _instantiator
        if linked:
            config["model"] = {**model, **linked}
            text = yaml.safe_dump(config, sort_keys=False)
        client, run_id = logger.experiment, logger.run_id
        command = getattr(stage, "value", stage)  # "fit", not TrainerFn.FITTING
        made_by = client.get_run(run_id).data.tags.get(COMMAND_TAG, command)
        client.log_text(run_id, text, "config.yaml" if made_by == command else f"config_{command}.yaml")
        log_params_once(client, run_id, run_params(config, self._defaults()))
        if made_by == command:
            client.set_tag(run_id, COMMAND_TAG, command)

    def _defaults(self) -> dict | None:
        """The parser's defaults as the config is dumped (None when they cannot be had: every value
        is then a param)."""
        try:
            return yaml.safe_load(self.parser.dump(self.parser.get_defaults(), skip_none=False, skip_validation=True))
        except Exception as e:  # a required option without default, a default the dump refuses
            log.warning("params: no defaults to compare with (%s); logging every value", e)
            return None


class TrackedCLI(LightningCLI):
    """A LightningCLI whose runs are tracked in MLflow.

    Runs go where ``--mlflow`` (``mlflow.yaml``) says, unless the config sets ``trainer.logger``
    itself; the resolved config goes to the run (:class:`MLflowSaveConfig`). Training never waits
    for the tracking server: the run's writes go through a spool on local disk
    (:mod:`callbacks.tracking.spool`); the server must answer when the job starts. A checkpoint
    written by a tracked run carries its run id, so ``--ckpt_path`` continues that run (and sends
    what its spool kept first); ``fit --ckpt_path last`` continues the newest interrupted run of
    the experiment.

    A fit stopped by SIGTERM or SIGINT saves ``last.ckpt``, marks its run KILLED and exits 143 or
    130 (:mod:`callbacks.preemption`); every checkpoint is written whole or not at all
    (:class:`~callbacks.preemption.AtomicCheckpointIO`, unless the config names a CheckpointIO
    plugin). Under SLURM, a requeued ``fit`` resumes Lightning's ``hpc_ckpt_<n>.ckpt`` and the run it names.
    """

    summary_metrics: tuple[str, ...] = ()

    def __init__(self, model_class, datamodule_class, args: Sequence[str] | None = None, **kwargs):
        self.tracking: TrackingSettings | None = None  # set when the CLI builds the MLflow logger itself
        self.resumed_run: str | None = None
        self.checkpoint_run: str | None = None  # the MLflow run the --ckpt_path file was written by
        # No abbreviations (--trainer.max_epoch is a mistake, not --trainer.max_epochs), and errors as
        # exceptions, which parse_arguments says in one line.
        strict = {"allow_abbrev": False, "exit_on_error": False}
        parser_kwargs = {**strict, **{name: strict for name in self.subcommands()}}
        for key, value in (kwargs.pop("parser_kwargs", None) or {}).items():
            parser_kwargs[key] = {**strict, **value} if key in self.subcommands() else value
        super().__init__(model_class, datamodule_class, save_config_callback=MLflowSaveConfig,
                         save_config_kwargs={"save_to_log_dir": False}, auto_configure_optimizers=False,
                         args=args, parser_kwargs=parser_kwargs, **kwargs)

    # Checkpoints are data: ``--ckpt_path`` is read with weights_only=True by every subcommand, so
    # weights_only is not an option (the file is checked here first, for an error that names it).
    # Prediction is ``au-detect predict`` (photos and videos in, CSV out), not Lightning's loop.
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()
                if name != "predict"}

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            # the subcommand's parser knows its options (for "did you mean")
            names = list(args) if isinstance(args, (list, tuple)) else list(args or {})
            command = next((a for a in names if a in self._subcommand_parsers), None)
            refused = self._subcommand_parsers[command] if command else parser
            print(self.usage_error(refused, e, args if isinstance(args, (list, tuple)) else ()), file=sys.stderr)
            raise SystemExit(2) from None
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        if command == "fit" and config.get("ckpt_path") == "last" and config.trainer.get("logger") is None:
            config.ckpt_path = self.last_interrupted_checkpoint(config)
        ckpt = config.get("ckpt_path")
        if command == "fit" and (ckpt == "hpc" or (ckpt is None and SLURMEnvironment.detect())):
            # Lightning resumes its SLURM requeue checkpoint itself: the run it names goes on too.
            ckpt = self.hpc_checkpoint(config.trainer.get("default_root_dir") or ".")
        if ckpt and Path(ckpt).is_file():
            self.checkpoint_run = run_id_from_checkpoint(ckpt)

    @staticmethod
    def hpc_checkpoint(root: str | Path) -> str | None:
        """The newest ``hpc_ckpt_<n>.ckpt`` in ``root`` (the one Lightning resumes under SLURM), if any."""
        numbered = [(int(m.group(1)), p) for p in Path(root).glob("hpc_ckpt_*.ckpt")
                    if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
        return str(max(numbered)[1]) if numbered else None

    @staticmethod
    def usage_error(parser, error: BaseException, args: Sequence[str] = ()) -> str:
        """What ``parser`` refused, in one line, and where to see its options: ``<prog>: error: ...``.

        An unknown option names the closest one; a config that is not YAML, its file, line and
        column; a value of the wrong type, the option, what it takes and what it got.
        """
        message = str(error)
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
        broken = TrackedCLI.yaml_problem(args) if "Problems parsing config" in message else None
        required = re.match(r"the following arguments are required: (.*)", message)
        if required:
            names = [n.strip() for n in required.group(1).split(",")]
            line = "missing " + ", ".join(n if n.startswith("-") else f"--{n}" for n in names)
        elif unknown:
            given = unknown.group(1).split("=", 1)[0]
            # the options as --help lists them (argparse keeps no public list of them)
            options = list(dict.fromkeys(re.findall(r"(--[\w.\-]+)", parser.format_help())))
            close = difflib.get_close_matches(given, options, n=1, cutoff=0.6)
            line = f"unknown option {given}" + (f"; did you mean {close[0]}?" if close else "")
        elif broken:
            line = broken
        elif key:
            name, detail = key.groups()
            expected = re.findall(r"Expected a <class '([\w.]+)'>", detail)
            given = re.search(r"Given value: (.*)", detail)
            if expected and given:
                names = ["None" if t == "NoneType" else t for t in dict.fromkeys(expected)]
                detail = f"expected {' or '.join(names)}, got {given.group(1).strip()!r}"
            line = f"--{name}: " + "; ".join(part.strip() for part in detail.splitlines() if part.strip())
        else:
            line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
        prog = parser.prog.replace(" [options]", "")
        return f"{prog}: error: {line[:500]}\nsee: {prog} --help"

    @staticmethod
    def yaml_problem(args: Sequence[str]) -> str | None:
        """``file: line L, column C: problem`` for the first ``--config`` file of ``args`` that is not YAML."""
        paths = [b for a, b in zip(args, args[1:]) if a in ("--config", "-c")]
        paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
        for path in paths:
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                return f"{path}: {where}not YAML: {getattr(e, 'problem', None) or e}"
            except OSError:
                continue
        return None

    @staticmethod
    def last_interrupted_checkpoint(config) -> str | None:
        """``fit --ckpt_path last``: the newest ``last.ckpt`` of a run of this experiment that did not finish.

        Lightning would look in ModelCheckpoint's folder, which is named after the MLflow run, so a new
        command never finds one. Here the folders of all the experiment's runs are searched
        (``<save dir>/<experiment id>/<run id>/checkpoints``, or ``checkpoint.dirpath`` when set), and
        a checkpoint counts when its run exists and is not FINISHED (killed, failed, or never marked).
        A ``last.ckpt`` that cannot be read (torn by a kill or a full disk) gives way to the newest
        readable full-state checkpoint beside it of the same run (:meth:`fallback_checkpoint`).
        Says which file it took, or that there is none and a new run starts.
        """
        from mlflow.exceptions import MlflowException

        tracking = TrackingSettings.read(config.mlflow)
        root = Path(tracking.logger().save_dir or config.trainer.get("default_root_dir") or ".")
        client = open_client(tracking.tracking_uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name)
        found: list[tuple[float, Path, str, str]] = []
        if experiment is not None:
            folders = list(root.glob(f"{experiment.experiment_id}/*/checkpoints"))
            dirpath = (config.get("checkpoint") or {}).get("dirpath")
            folders += [Path(dirpath)] if dirpath else []
            for last in (p for folder in folders for p in folder.glob("last*.ckpt")):
                path, note = last, ""
                try:
                    try:
                        run_id = run_id_from_checkpoint(last)
                    except CheckpointError as e:
                        # the run of a run's own folder (<experiment>/<run id>/checkpoints) is known
                        own = last.parent.parent.name if last.parent.parent.parent == root / experiment.experiment_id \
                            else None
                        fallback = TrackedCLI.fallback_checkpoint(last.parent, own)
                        if fallback is None:
                            raise
                        path, run_id, epoch = fallback
                        reason = str(e).removeprefix(f"checkpoint {last}: ")[:200]
                        note = (f"--ckpt_path last: {last} is damaged ({reason}); resuming MLflow run {run_id} "
                                f"from {path} (epoch {epoch}), the newest readable full-state checkpoint of that run")
                    run = client.get_run(run_id) if run_id else None
                except (CheckpointError, MlflowException) as e:  # a damaged file, a run deleted for good
                    log.warning("--ckpt_path last: skipping %s (%s)", last, e)
                    continue
                if (run is not None and run.info.experiment_id == experiment.experiment_id
                        and run.info.lifecycle_stage == "active" and run.info.status != "FINISHED"):
                    found.append((last.stat().st_mtime, path, run_id, note))
        if found:
            _, path, run_id, note = max(found)
            message = note or f"--ckpt_path last: resuming MLflow run {run_id} from {path}"
        else:
            path = None
            message = (f"--ckpt_path last: no interrupted run of experiment '{tracking.experiment_name}' "
                       f"under {root}; starting a new run")
        if rank_zero_only.rank == 0:  # DDP's other ranks resolve it too
            print(message)
        return None if path is None else str(path)

    @staticmethod
    def fallback_checkpoint(folder: Path, run_id: str | None = None) -> tuple[Path, str, int] | None:
        """The newest readable checkpoint in ``folder`` that a fit can resume (weights, optimizer
        state and loops) and that names an MLflow run (``run_id`` when given): ``(path, run id,
        epoch)``, or None. Newest: the furthest global step, then the latest file."""
        found = []
        for path in folder.glob("*.ckpt"):
            try:
                ckpt = load_checkpoint(path)
            except (CheckpointError, OSError):
                continue
            if not isinstance(ckpt, dict) or not {"state_dict", "optimizer_states", "loops"} <= set(ckpt):
                continue  # weights only: nothing to resume training from
            owner = ckpt.get(RUN_ID_KEY)
            if owner and (run_id is None or owner == run_id):
                found.append((int(ckpt.get("global_step") or 0), path.stat().st_mtime, path, owner,
                              int(ckpt.get("epoch") or 0)))
        if not found:
            return None
        _, _, path, owner, epoch = max(found)
        return path, owner, epoch

    def fit(self, **kwargs) -> None:
        try:
            self.trainer.fit(weights_only=True, **kwargs)
        except BaseException:
            # A SIGTERM or SIGINT (callbacks.preemption) ends the job as the signal would: 143 or 130.
            preemption = next((c for c in self.trainer.callbacks if isinstance(c, Preemption)), None)
            if preemption is None or preemption.exit_code is None:
                raise
            raise SystemExit(preemption.exit_code) from None

    def validate(self, **kwargs) -> None:
        self.trainer.validate(weights_only=True, **kwargs)

    def test(self, **kwargs) -> None:
        self.trainer.test(weights_only=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--mlflow", type=str, default="mlflow.yaml", help="MLflow settings (tracking URI, ...)")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="MLflow run name (default: <config>-<backbone>[-<loss>]-s<seed>, numbered when taken)")
        parser.add_argument("--tags", type=dict[str, str], default={},
                            help="MLflow tags of the run, over mlflow.yaml's (e.g. '{\"ablation\": \"t2\"}')")
        parser.add_lightning_class_args(SystemMetrics, "system_metrics")
        parser.add_lightning_class_args(Preemption, "preemption")

    def _subconfig(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs):
        config = self._subconfig()
        if config.trainer.get("logger") is None and "logger" not in kwargs:
            self.tracking = TrackingSettings.read(config.mlflow)
            # The run's writes wait in <default_root_dir>/mlflow_spool/<run id> until the server takes them.
            spool_root = Path(config.trainer.get("default_root_dir") or ".") / SPOOL_DIR
            kwargs["logger"] = self.tracking.logger(config.run_name, self.checkpoint_run, tags=config.tags,
                                                    spool_root=spool_root,
                                                    default_run_name=self.default_run_name(config),
                                                    log_hyperparams=False)  # MLflowSaveConfig logs the params
            self.resumed_run = self.checkpoint_run
        if "plugins" not in kwargs:
            # Checkpoints written whole or not at all, unless the config brings its own writer.
            init = self.config_init[self.subcommand] if self.subcommand else self.config_init
            given = init.trainer.get("plugins")
            given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
            if not any(isinstance(p, CheckpointIO) for p in given):
                kwargs["plugins"] = [*given, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def run_name_parts(self, config) -> list:
        """What tells runs of one config apart in a run's default name, after the config's name."""
        return [config.model.get("backbone")]

    def default_run_name(self, config) -> str:
        """``<config>-<what run_name_parts says>-s<seed>``, e.g. ``demo-resnet18-bce-s0``: a new run's
        name unless ``--run_name`` gives one (numbered ``-2``, ``-3``... when taken)."""
        files = config.get("config") or []
        return run_name(Path(str(files[-1])).stem if files else self.subcommand or "run", self.run_name_parts(config),
                        config.get("seed_everything"))

    def before_fit(self) -> None:
        logger = mlflow_logger(self.trainer)
        if logger is not None and self.trainer.is_global_zero and self.tracking is not None:
            print(f"MLflow run {logger.run_id} in experiment '{self.tracking.experiment_name}' at "
                  f"{self.tracking.tracking_uri}" + (" (resumed)" if self.resumed_run else ""))

    def after_fit(self) -> None:
        logger = mlflow_logger(self.trainer)
        if logger is not None and self.trainer.is_global_zero:
            metrics = self.trainer.callback_metrics
            score = {k: round(float(metrics[k]), 4) for k in self.summary_metrics if k in metrics}
            print(f"Done: {score}. Best checkpoint: {self.trainer.checkpoint_callback.best_model_path}")
            if self.tracking is None:
                return
            config = self._subconfig()
            if (config.get("tags") or {}).get("mlflow.parentRunId"):
                return  # a stage of a pipeline, sweep or ablation: the parent says what comes next
            artifacts = config.get("mlflow_artifacts") or {}
            logged = bool(artifacts.get("log_model"))
            # The server may be away now (the spool keeps the run's writes): ask it nothing then.
            registered = (registered_name(self.tracking, logger.run_id, artifacts.get("registered_model_name"))
                          if reachable(self.tracking.tracking_uri) else None)
            lines = next_commands(self.tracking, config.mlflow, logger.run_id, self.example_photo(), logged, registered,
                                  experiment_id=logger.experiment_id)
            print("Next, from the project folder:\n" + "\n".join(f"  {line}" for line in lines))

    def example_photo(self) -> str | None:
        """A photo to try the model on: the first of the test split (None when there is none)."""
        try:
            return self.datamodule.manifest("test").resolve(0)
        except Exception:  # no manifest method (pretraining data), an empty split, a URL manifest
            return None


class AUDetectCLI(TrackedCLI):
    """LightningCLI for :class:`AUDetector` on :class:`AUDataModule`, tracked in MLflow.

    The soft-threshold, checkpoint and MLflow-artifact callbacks are always there, each with its
    own config section.
    """

    summary_metrics = ("val/f1_heldout", "val/score_heldout", "val/f1_fitted", "val/f1")

    def __init__(self, args: Sequence[str] | None = None, **kwargs):
        super().__init__(AUDetector, AUDataModule, args=args, **kwargs)

    def run_name_parts(self, config) -> list:
        return [config.model.get("backbone"), config.model.get("loss")]

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.aus", "model.aus")
        # What ``target_rate: prior`` aims at: each AU's positive share in the training manifest.
        parser.link_arguments("data.au_priors", "model.au_priors", apply_on="instantiate")
        # The intensity head is trained when the manifests have AU<n>_intensity columns (model.intensity: null).
        parser.link_arguments("data.has_intensity", "model.intensity_data", apply_on="instantiate")
        parser.link_arguments("data.intensity_level_counts", "model.intensity_level_counts", apply_on="instantiate")
        parser.link_arguments("trainer.use_distributed_sampler", "data.shard_sampler", compute_fn=lambda used: not used)
        parser.add_lightning_class_args(SoftThresholdCallback, "soft_threshold")
        # ModelCheckpoint whose last.ckpt follows every epoch, not only improving ones.
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/score_heldout", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.auto_insert_metric_name": False,
                             "checkpoint.filename": "epoch{epoch:02d}-score{val/score_heldout:.4f}"})
        parser.add_lightning_class_args(MLflowArtifacts, "mlflow_artifacts")
        # The run's artifacts and model are those of the best checkpoint: one monitor for both.
        parser.link_arguments("checkpoint.monitor", "mlflow_artifacts.monitor")

    def before_instantiate_classes(self) -> None:
        # Unless the config names one, models are registered under mlflow.yaml's name, like
        # everything else about where runs go.
        config = self._subconfig()
        if config.mlflow_artifacts.registered_model_name is None and Path(config.mlflow).is_file():
            config.mlflow_artifacts.registered_model_name = TrackingSettings.read(config.mlflow).registered_model_name


class PretrainCLI(TrackedCLI):
    """LightningCLI for a transfer branch's pretraining task on :class:`PretrainDataModule`.

    ``au-detect pretrain-face``: :class:`FaceRecognitionModule` (ArcFace on identities);
    ``au-detect pretrain-expression``: :class:`ExpressionModule`. The number of classes comes from
    the data; at the end of ``fit`` the backbone is written to ``export.path`` for the AU model.
    """

    TASKS = {"pretrain-face": (FaceRecognitionModule, "model.num_identities",
                               ("val/verification_accuracy", "val/verification_auc")),
             "pretrain-expression": (ExpressionModule, "model.num_classes", ("val/accuracy", "val/f1_macro"))}

    def __init__(self, task: str, args: Sequence[str] | None = None, **kwargs):
        model_class, self.classes_key, self.summary_metrics = self.TASKS[task]
        super().__init__(model_class, PretrainDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.num_classes", self.classes_key, apply_on="instantiate")
        parser.add_lightning_class_args(BackboneExport, "export")


def run_name(config_name: str, parts: Sequence, seed) -> str:
    """``<config_name>-<parts>-s<seed>`` without the empty parts, e.g. ``demo-resnet18-bce-s0``.

    >>> run_name("demo", ["resnet18", None, "bce"], 0)
    'demo-resnet18-bce-s0'
    """
    names = [config_name, *parts, f"s{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else None]
    return "-".join(str(p) for p in names if p not in (None, ""))


def _plain(value) -> bool:
    """A value YAML writes as it is (numbers, text, lists of them)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def run_params(config: dict, defaults: dict | None) -> dict[str, str]:
    """A run's params: the :data:`KEY_PARAMS` it has, and every value that differs from ``defaults``
    (all of them without defaults), CLI-only keys left out.

    >>> run_params({"model": {"backbone": "resnet50", "dropout": 0.3, "lr": 0.1}, "mlflow": "m.yaml"},
    ...            {"model": {"backbone": "resnet50", "dropout": 0.5, "lr": 0.1}})
    {'model.backbone': 'resnet50', 'model.dropout': '0.3'}
    """
    values = flatten_config(config, skip=NOT_PARAMS)
    if defaults is None:
        return values
    default = flatten_config(defaults, skip=NOT_PARAMS)
    return {k: v for k, v in values.items() if k in KEY_PARAMS or default.get(k) != v}


def flatten_config(config: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Nested config -> ``{"model.backbone": "resnet50", ...}`` as MLflow params (values as text).

    >>> flatten_config({"model": {"lr": 0.1, "aus": [1, 2]}, "ckpt_path": None}, skip=("ckpt_path",))
    {'model.lr': '0.1', 'model.aus': '[1, 2]'}
    """
    out = {}
    for key, value in config.items():
        if not prefix and key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{name}.", skip))
        else:
            out[name] = str(value)[:6000]
    return out
