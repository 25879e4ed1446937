"""``au-detect``: the command line of the project.

Training (Lightning CLI, one config for all):
    au-detect fit --config experiments/demo.yaml      train, fit thresholds, track in MLflow
    au-detect validate|test --config ... --ckpt_path CKPT
Using a trained detector:
    au-detect predict --model CKPT|runs:/<id>/model --input photos/ clip.mp4 --out aus.csv
    au-detect pretrain-face fit --config experiments/pretrain_face_demo.yaml
    au-detect pretrain-expression fit --config experiments/pretrain_expression_demo.yaml
    au-detect ablation --config experiments/ablation_demo.yaml   the paper's Table 2, over seeds
Data:
    au-detect synth    render SynthAU (images, EmotioNet-form manifests, contact sheet)
    au-detect align    align the faces of manifests into crop caches, with a report
    au-detect download fetch the images of URL manifests (EmotioNet), resumable, with a report
    au-detect prepare  what a training config prepares: generate, align, report

Every option comes from a class or function signature (jsonargparse), so ``--help`` lists them
all, ``--config file.yaml`` takes them from YAML and ``--print_config`` shows the result.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from callbacks.backbone_export import BackboneExport
from callbacks.mlflow_artifacts import MLflowArtifacts, mlflow_logger, run_id_from_checkpoint
from callbacks.soft_threshold import SoftThresholdCallback
from experiments.tracking import DEFAULT_TRACKING_URI, TrackingSettings
from datamodules.pretrain_datamodule import PretrainDataModule
from lightning_modules.au_detector import AUDetector
from lightning_modules.backbones import WeightsError
from lightning_modules.checkpoints import CheckpointError
from lightning_modules.pretrain import ExpressionModule, FaceRecognitionModule

from datamodules.alignment import AlignedSplit, AlignmentSettings, align_manifest, summarize
from datamodules.au_datamodule import AUDataModule
from datamodules.download import DownloadInterrupted, DownloadSettings, download_manifests
from datamodules.manifest import EMOTIONET_AUS, ManifestError, read_manifest
from datamodules.synthetic import SynthAUSettings, generate_synthau
from experiments.predict import predict


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
          aus: Sequence[int] = EMOTIONET_AUS, alignment: AlignmentSettings = AlignmentSettings(),
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


def prepare(data: AUDataModule) -> None:
    """Prepare the data of a training config: generate SynthAU if used, align every split, report."""
    data.prepare_data()
    data.setup()
    for stage, report in data.reports.items():
        _print_report(report, data.splits[stage].path if stage in data.splits else None)


# Commands that are functions (not LightningCLI subcommands): the data ones and prediction.
COMMANDS = {"synth": synth, "align": align, "download": download, "prepare": prepare, "predict": predict}


def _print_report(report: dict, folder: Path | None) -> None:
    print(summarize(report))
    if folder is not None:
        print(f"  cache: {folder}  (report.json, aligned_sheet.png)")
    for row in report["skipped_rows"][:10]:
        print(f"  skipped line {row['line']}: {row['image']}: {row['error']}")
    if len(report["skipped_rows"]) > 10:
        print(f"  ... {len(report['skipped_rows']) - 10} more in report.json")


class TrackedCLI(LightningCLI):
    """A LightningCLI whose runs are tracked in MLflow.

    Runs go where ``--mlflow`` (``mlflow.yaml``) says, unless the config sets ``trainer.logger``
    itself. Lightning's SaveConfigCallback is replaced by logging the resolved config to the
    MLflow run (params and ``config.yaml``), which works for any tracking URI. A checkpoint
    written by a tracked run carries its run id, so ``--ckpt_path`` continues that run;
    ``fit --ckpt_path last`` continues the newest interrupted run of the experiment.
    """

    summary_metrics: tuple[str, ...] = ()

    def __init__(self, model_class, datamodule_class, args: Sequence[str] | None = None, **kwargs):
        self.tracking: TrackingSettings | None = None  # set when the CLI builds the MLflow logger itself
        self.resumed_run: str | None = None
        self.checkpoint_run: str | None = None  # the MLflow run the --ckpt_path file was written by
        super().__init__(model_class, datamodule_class, save_config_callback=None, auto_configure_optimizers=False,
                         args=args, **kwargs)

    # Checkpoints are data: ``--ckpt_path`` is read with weights_only=True by every subcommand, so
    # weights_only is not an option (the file is checked here first, for an error that names it).
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()}

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
                    logging.getLogger(__name__).warning("--ckpt_path last: skipping %s (%s)", path, e)
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

    def predict(self, **kwargs) -> None:
        self.trainer.predict(weights_only=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--mlflow", type=str, default="mlflow.yaml", help="MLflow settings (tracking URI, ...)")
        parser.add_argument("--run_name", type=Optional[str], default=None, help="MLflow run name")
        parser.add_argument("--tags", type=dict[str, str], default={},
                            help="MLflow tags of the run, over mlflow.yaml's (e.g. '{\"ablation\": \"t2\"}')")

    def _subconfig(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs):
        config = self._subconfig()
        if config.trainer.get("logger") is None and "logger" not in kwargs:
            self.tracking = TrackingSettings.read(config.mlflow)
            kwargs["logger"] = self.tracking.logger(config.run_name, self.checkpoint_run, tags=config.tags)
            self.resumed_run = self.checkpoint_run
        return super().instantiate_trainer(**kwargs)

    def _log_config(self) -> None:
        logger = mlflow_logger(self.trainer)
        if logger is None or not self.trainer.is_global_zero:
            return
        config = self._subconfig()
        text = self._parser(self.subcommand).dump(config, skip_none=False)
        client, run_id = logger.experiment, logger.run_id
        client.log_text(run_id, text, "config.yaml")
        params = flatten_config(yaml.safe_load(text), skip=("ckpt_path", "config", "mlflow", "run_name", "tags"))
        existing = client.get_run(run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if new:
            logger.log_hyperparams(new)
        for k, v in changed.items():  # a resumed run may change e.g. max_epochs: params are immutable
            client.set_tag(run_id, f"resumed_with/{k}", v[:5000])
        client.set_tag(run_id, "au_detect.command", self.subcommand or "")

    def before_fit(self) -> None:
        self._log_config()
        name = self.tracking.registered_model_name if self.tracking is not None else None
        for callback in self.trainer.callbacks:
            if isinstance(callback, MLflowArtifacts) and name and not callback.registered_model_name:
                callback.registered_model_name = name
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
            uri = self.tracking.tracking_uri
            where = f"mlflow ui --backend-store-uri {uri}" if uri != DEFAULT_TRACKING_URI else "mlflow ui"
            print(f"See the run: {where}  (then open http://127.0.0.1:5000, experiment "
                  f"'{self.tracking.experiment_name}', run {logger.run_id})")

    def before_validate(self) -> None:
        self._log_config()

    def before_test(self) -> None:
        self._log_config()


class AUDetectCLI(TrackedCLI):
    """LightningCLI for :class:`AUDetector` on :class:`AUDataModule`, tracked in MLflow.

    The soft-threshold, checkpoint and MLflow-artifact callbacks are always there, each with its
    own config section.
    """

    summary_metrics = ("val/f1_fitted", "val/score_fitted", "val/f1")

    def __init__(self, args: Sequence[str] | None = None, **kwargs):
        super().__init__(AUDetector, AUDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.aus", "model.aus")
        parser.add_lightning_class_args(SoftThresholdCallback, "soft_threshold")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/score_fitted", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.auto_insert_metric_name": False,
                             "checkpoint.filename": "epoch{epoch:02d}-score{val/score_fitted:.4f}"})
        parser.add_lightning_class_args(MLflowArtifacts, "mlflow_artifacts")


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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="au-detect", description=__doc__)
    commands = parser.add_subcommands(dest="command")
    listed = {download: ("manifest", "manifests whose images are URLs"),
              predict: ("input", "images, folders, globs, manifests, videos")}
    for name, fn in (("synth", synth), ("align", align), ("download", download), ("predict", predict)):
        sub = ArgumentParser(description=fn.__doc__)
        sub.add_argument("--config", action=ActionConfigFile)
        if fn in listed:  # the usual shell form: --input a.jpg photos/ clip.mp4
            sub.add_argument(f"--{listed[fn][0]}", nargs="+", required=True, help=listed[fn][1])
        sub.add_function_arguments(fn, as_group=False, skip={listed[fn][0]} if fn in listed else None)
        commands.add_subcommand(name, sub, help=fn.__doc__.splitlines()[0])
    # prepare reads the same YAML as training: its data section builds the AUDataModule.
    sub = ArgumentParser(description=prepare.__doc__)
    sub.add_argument("--config", action=ActionConfigFile, help="a training config: its data section is used")
    sub.add_class_arguments(AUDataModule, "data")
    commands.add_subcommand("prepare", sub, help=prepare.__doc__.splitlines()[0])
    return parser


def _data_section(args: list[str]) -> list[str]:
    """``prepare --config train.yaml``: keep the config's data section only."""
    if "--config" not in args:
        return args
    i = args.index("--config")
    section = (yaml.safe_load(Path(args[i + 1]).read_text()) or {}).get("data")
    if section is None:
        raise SystemExit(f"{args[i + 1]}: no 'data' section")
    return args[:i] + ["--data", yaml.safe_dump(section.get("init_args", section))] + args[i + 2:]


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``au-detect``; ``args`` defaults to the command line (tests pass a list).

    From the command line, a file that is refused (a checkpoint that is not data, a malformed
    manifest) ends the command with its message, not a traceback.
    """
    if args is not None:
        return _main(args, list(args))
    try:
        _main(None, sys.argv[1:])
    except (CheckpointError, WeightsError, ManifestError) as e:
        raise SystemExit(f"au-detect: error: {e}") from None


def _main(given: Sequence[str] | None, args: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args and args[0] == "ablation":
        from experiments.ablation import main as ablation_main  # it drives the CLIs defined here

        ablation_main(args[1:])
        return
    if args and args[0] in PretrainCLI.TASKS:
        # sys.argv keeps the task word (DDP relaunches the command from it): Lightning's warning
        # about args differing from sys.argv does not apply.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        PretrainCLI(args[0], args=args[1:])
        return
    if not args or args[0] not in COMMANDS:
        AUDetectCLI(args=None if given is None else args)  # None: Lightning reads sys.argv itself
        return
    if args[0] == "prepare":
        args = ["prepare"] + _data_section(args[1:])
    parser = build_parser()
    cfg = parser.parse_args(args)
    command = cfg.command
    init = parser.instantiate_classes(cfg)[command]
    init.pop("config", None)
    COMMANDS[command](**init)


if __name__ == "__main__":
    main()
