"""The LightningCLIs of ``au-detect``: the AU detector and the two pretraining tasks, tracked in MLflow.

    au-detect fit|validate|test --config experiments/configs/demo.yaml          AUDetectCLI
    au-detect pretrain-face|pretrain-expression fit --config ...        PretrainCLI

Every option comes from a class signature (jsonargparse): ``--help`` lists them, ``--config
file.yaml`` takes them from YAML, ``--print_config`` shows the result. Runs go to the MLflow
tracking server of ``--mlflow`` (``mlflow.yaml``), one run per job; checkpoints carry the run id
and are read as data only (:mod:`lightning_modules.checkpoints`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from callbacks.backbone_export import BackboneExport
from callbacks.mlflow_artifacts import MLflowArtifacts
from callbacks.tracking.mlflow_run import mlflow_logger, run_id_from_checkpoint
from callbacks.soft_threshold import SoftThresholdCallback
from callbacks.tracking.system_metrics import SystemMetrics
from callbacks.tracking.spool import SPOOL_DIR
from datamodules.au_datamodule import AUDataModule
from datamodules.pretrain_datamodule import PretrainDataModule
from experiments.tracking import TrackingSettings, log_params_once
from lightning_modules.au_detector import AUDetector
from lightning_modules.checkpoints import CheckpointError
from lightning_modules.pretrain import ExpressionModule, FaceRecognitionModule

log = logging.getLogger(__name__)

# CLI-only keys: where and how a run is tracked, not what is trained.
NOT_PARAMS = ("ckpt_path", "config", "mlflow", "run_name", "tags")


class MLflowSaveConfig(SaveConfigCallback):
    """Lightning's way to keep the config with the logger, for MLflow: the resolved config as the
    run's ``config.yaml`` and every value as a param. A resumed run that changes a value (e.g.
    ``max_epochs``) gets a ``resumed_with/<key>`` tag instead, as MLflow params are immutable.
    Works for any tracking URI, where Lightning's file-writing default does not."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        text = self.parser.dump(self.config, skip_none=False)
        # Values linked from the data when the classes were made (the AU priors, the number of
        # classes) are not options: the model's hyperparameters say what it was built with.
        config = yaml.safe_load(text)
        model = config.get("model") or {}
        linked = {k: v for k, v in pl_module.hparams.items() if k not in model and _plain(v)}
        if linked:
            config["model"] = {**model, **linked}
            text = yaml.safe_dump(config, sort_keys=False)
        client, run_id = logger.experiment, logger.run_id
        client.log_text(run_id, text, "config.yaml")
        log_params_once(client, run_id, flatten_config(config, skip=NOT_PARAMS))
        client.set_tag(run_id, "au_detect.command", getattr(stage, "value", stage))  # "fit", not TrainerFn.FITTING


class TrackedCLI(LightningCLI):
    """A LightningCLI whose runs are tracked in MLflow.

    Runs go where ``--mlflow`` (``mlflow.yaml``) says, unless the config sets ``trainer.logger``
    itself; the resolved config goes to the run (:class:`MLflowSaveConfig`). Training never waits
    for the tracking server: the run's writes go through a spool on local disk
    (:mod:`callbacks.tracking.spool`); the server must answer when the job starts. A checkpoint
    written by a tracked run carries its run id, so ``--ckpt_path`` continues that run (and sends
    what its spool kept first); ``fit --ckpt_path last`` continues the newest interrupted run of
    the experiment.
    """

    summary_metrics: tuple[str, ...] = ()

    def __init__(self, model_class, datamodule_class, args: Sequence[str] | None = None, **kwargs):
        self.tracking: TrackingSettings | None = None  # set when the CLI builds the MLflow logger itself
        self.resumed_run: str | None = None
        self.checkpoint_run: str | None = None  # the MLflow run the --ckpt_path file was written by
        super().__init__(model_class, datamodule_class, save_config_callback=MLflowSaveConfig,
                         save_config_kwargs={"save_to_log_dir": False}, auto_configure_optimizers=False,
                         args=args, **kwargs)

    # Checkpoints are data: ``--ckpt_path`` is read with weights_only=True by every subcommand, so
    # weights_only is not an option (the file is checked here first, for an error that names it).
    # Prediction is ``au-detect predict`` (photos and videos in, CSV out), not Lightning's loop.
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()
                if name != "predict"}

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        if command == "fit" and config.get("ckpt_path") == "last" and config.trainer.get("logger") is None:
            config.ckpt_path = self.last_interrupted_checkpoint(config)
        ckpt = config.get("ckpt_path")
        if ckpt and Path(ckpt).is_file():
            self.checkpoint_run = run_id_from_checkpoint(ckpt)

    @staticmethod
    def last_interrupted_checkpoint(config) -> str | None:
        """``fit --ckpt_path last``: the newest ``last.ckpt`` of a run of this experiment that did not finish.

        Lightning would look in ModelCheckpoint's folder, which is named after the MLflow run, so a new
        command never finds one. Here the folders of all the experiment's runs are searched
        (``<save dir>/<experiment id>/<run id>/checkpoints``, or ``checkpoint.dirpath`` when set), and
        a checkpoint counts when its run exists and is not FINISHED (killed, failed, or never marked).
        Says which file it took, or that there is none and a new run starts.
        """
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        tracking = TrackingSettings.read(config.mlflow)
        root = Path(tracking.logger().save_dir or config.trainer.get("default_root_dir") or ".")
        client = MlflowClient(tracking.tracking_uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name)
        found: list[tuple[float, Path, str]] = []
        if experiment is not None:
            folders = list(root.glob(f"{experiment.experiment_id}/*/checkpoints"))
            dirpath = (config.get("checkpoint") or {}).get("dirpath")
            folders += [Path(dirpath)] if dirpath else []
            for path in (p for folder in folders for p in folder.glob("last*.ckpt")):
                try:
                    run_id = run_id_from_checkpoint(path)
                    run = client.get_run(run_id) if run_id else None
                except (CheckpointError, MlflowException) as e:  # a damaged file, a run deleted for good
                    log.warning("--ckpt_path last: skipping %s (%s)", path, e)
                    continue
                if (run is not None and run.info.experiment_id == experiment.experiment_id
                        and run.info.lifecycle_stage == "active" and run.info.status != "FINISHED"):
                    found.append((path.stat().st_mtime, path, run_id))
        if found:
            _, path, run_id = max(found)
            message = f"--ckpt_path last: resuming MLflow run {run_id} from {path}"
        else:
            path = None
            message = (f"--ckpt_path last: no interrupted run of experiment '{tracking.experiment_name}' "
                       f"under {root}; starting a new run")
        if rank_zero_only.rank == 0:  # DDP's other ranks resolve it too
            print(message)
        return None if path is None else str(path)

    def fit(self, **kwargs) -> None:
        self.trainer.fit(weights_only=True, **kwargs)

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
                                                    default_run_name=self.default_run_name(config))
            self.resumed_run = self.checkpoint_run
        return super().instantiate_trainer(**kwargs)

    def run_name_parts(self, config) -> list:
        """What tells runs of one config apart in a run's default name, after the config's name."""
        return [config.model.get("backbone")]

    def default_run_name(self, config) -> str:
        """``<config>-<what run_name_parts says>-s<seed>``, e.g. ``demo-resnet18-bce-s0``: a new run's
        name unless ``--run_name`` gives one (numbered ``-2``, ``-3``... when taken)."""
        files = config.get("config") or []
        parts = [Path(str(files[-1])).stem if files else self.subcommand or "run", *self.run_name_parts(config)]
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            parts.append(f"s{seed}")
        return "-".join(str(p) for p in parts if p not in (None, ""))

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
            print(f"See the run: {self.tracking.ui_command()}  (then open http://127.0.0.1:5000, experiment "
                  f"'{self.tracking.experiment_name}', run {logger.run_id})")


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
        parser.link_arguments("trainer.use_distributed_sampler", "data.shard_sampler", compute_fn=lambda used: not used)
        parser.add_lightning_class_args(SoftThresholdCallback, "soft_threshold")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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


def _plain(value) -> bool:
    """A value YAML writes as it is (numbers, text, lists of them)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


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
