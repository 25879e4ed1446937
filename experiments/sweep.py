"""``au-detect sweep``: an Optuna study over ``au-detect fit``'s options, every trial an MLflow run.

    au-detect sweep --config experiments/configs/sweep_demo.yaml

1. **Search space.** Any option of ``au-detect fit``, by its dotted path in the fit config
   (``model.optimizer.init_args.lr``, ``model.loss``, ``data.balanced_sampling``, ...), with a
   range (``low``/``high``, ``log``, ``step``, ``type: int``) or ``choices`` (any YAML values;
   lists and mappings too, e.g. ``model.branches``). Every trial is the base fit config
   (``fit_config``) with the fixed changes (``fit_overrides``) and the trial's values set in it.
2. **Trials.** A trial is a real ``au-detect fit`` in this process (:class:`AUDetectCLI`), tracked
   as an MLflow run ``<study>-trial-<n>`` nested under the study's parent run (tag
   ``mlflow.parentRunId``; tags ``optuna.study``, ``optuna.trial``, ``optuna.state``). Its value is
   its best epoch's ``metric``, as the fit's checkpoint picks it (``checkpoint.monitor`` and
   ``mode`` are set from ``metric`` and ``direction``). After each validation the score goes to
   the pruner (optuna-integration's Lightning pruning callback); a trial it prunes ends its fit at
   the end of that epoch, like any early stop, and its run is marked ``KILLED`` with the tag
   ``optuna.state: PRUNED``.
3. **Study.** The study lives in Optuna's RDB storage (``storage``, a SQLite file by default), so
   any number of processes (one per GPU, or per machine on a shared database) run the same
   command and share it: each takes the next trial, and no more than ``n_trials`` trials finish
   (complete or pruned) in all: a process starts a trial only while finished and running trials
   are fewer, and one that would go past (two processes asking at once) is marked failed with
   the reason, without a fit. A process that finds the study's last trials running elsewhere
   waits for them. Each running trial writes a heartbeat into the storage every
   ``heartbeat_interval`` seconds (Optuna's ``RDBStorage`` heartbeat); a trial whose process died
   (killed, machine lost) is found stale after ``grace_period`` by the next process that looks,
   failed, its MLflow run marked ``KILLED``, and run again with the same values, up to
   ``max_retry`` times (``RetryHeartbeatStaleTrialCallback``, formerly
   ``RetryFailedTrialCallback``). Running the command again resumes the study.
4. **Parent run.** Created by the process that creates the study, its id kept in the study
   (user attribute ``mlflow_parent_run_id``): reruns and other processes log under the same one.
   At the end of each process's work it holds the best trial as a ready fit config
   (``best_config.yaml``: ``au-detect fit --config best_config.yaml``; also written to
   ``<out>/<study>/best_config.yaml``), ``best_value`` and ``best_trial`` (metrics), the trial
   counts, ``trials.csv``, and Optuna's plots (optimisation history, parallel coordinates,
   parameter importances once two trials are complete) under ``plots/``.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from callbacks.tracking.mlflow_run import mlflow_logger, open_client
from experiments.stages import with_overrides
from experiments.tracking import TrackingSettings, creation_lock, log_params_once

PARENT_ATTR = "mlflow_parent_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Set by the sweep for every trial: not searchable, not fixed.
RESERVED = ("mlflow", "run_name", "tags", "ckpt_path", "trainer.default_root_dir", "checkpoint.monitor",
            "checkpoint.mode")
T = TypeVar("T")


@dataclass
class SearchParam:
    """One fit option's range or choices.

    Args:
        low, high: the range (both ends included).
        log: sample on a log scale (``low`` > 0).
        step: sample on a grid of this step from ``low``.
        type: ``float`` (default) or ``int`` (for integer options, e.g. ``trainer.max_epochs``).
        choices: the values to choose from instead of a range (any YAML values).
    """

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None

    def check(self, name: str) -> None:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError(f"search_space.{name}: give either a non-empty list of choices or low and high")
            return
        if self.low is None or self.high is None or not self.low <= self.high:
            raise ValueError(f"search_space.{name}: a range needs low <= high, got low={self.low} high={self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"search_space.{name}: a log range needs low > 0 and no step")

    def ends(self) -> tuple[Any, Any]:
        """The first and last values it can take (what the config is checked with)."""
        if self.choices is not None:
            return self.choices[0], self.choices[-1]
        cast = int if self.type == "int" else float
        return cast(self.low), cast(self.high)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """The trial's value (a retried trial gets its first attempt's)."""
        if self.choices is not None:
            # Optuna's choices are scalars: lists and mappings are chosen by their YAML text.
            encoded = [_encode(c) for c in self.choices]
            return self.choices[encoded.index(trial.suggest_categorical(name, encoded))]
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        """A value as Optuna stored it -> the fit option's value."""
        if self.choices is not None:
            encoded = [_encode(c) for c in self.choices]
            if value in encoded:
                return self.choices[encoded.index(value)]
        return value


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()


class SurplusTrial(Exception):
    """The study had its trials (finished or being run by other processes) when this one was asked for."""


class TrialPruning(PyTorchLightningPruningCallback):
    """optuna-integration's pruning callback, ending a pruned trial's fit cleanly.

    The parent reports each validation's ``monitor`` to the trial and raises ``TrialPruned`` out of
    the training loop when the pruner says so. Here the fit is stopped instead
    (``trainer.should_stop``: the epoch's checkpoint and artifacts are written, the run is closed
    as any finished fit), and :attr:`pruned` keeps the exception for the objective to raise. It
    also records the trial's MLflow run.
    """

    def __init__(self, trial: optuna.Trial, monitor: str):
        super().__init__(trial, monitor)
        self.trial = trial
        self.run_id: str | None = None
        self.pruned: optuna.TrialPruned | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            self.run_id = logger.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.pruned is not None:
            return
        try:
            super().on_validation_end(trainer, pl_module)
        except optuna.TrialPruned as pruned:
            self.pruned = pruned
            trainer.should_stop = True
            logger = mlflow_logger(trainer)
            if logger is not None:
                logger.experiment.set_tag(logger.run_id, "optuna.state", "PRUNED")


class StaleTrial:
    """What becomes of a trial whose process stopped beating (Optuna calls it once it fails the
    trial): its MLflow run is marked ``KILLED``, and the trial is queued again with its values
    (``RetryHeartbeatStaleTrialCallback``)."""

    def __init__(self, tracking_uri: str, max_retry: int | None):
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        print(f"[sweep] trial {trial.number}: its process stopped (no heartbeat); failed, run again"
              + (f"; MLflow run {run_id} marked KILLED" if run_id else ""))
        if run_id:
            from mlflow.exceptions import MlflowException

            client = open_client(self.tracking_uri)
            try:
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_tag(run_id, "optuna.fail_reason", "its process stopped (heartbeat stale)")
                client.set_terminated(run_id, "KILLED")
            except MlflowException as e:
                print(f"[sweep] could not mark MLflow run {run_id}: {e}")
        self.retry(study, trial)


def sweep(
    search_space: dict[str, SearchParam],
    study: str = "sweep",
    fit_config: str = "experiments/configs/demo.yaml",
    fit_overrides: dict[str, Any] | None = None,
    n_trials: int = 20,
    metric: str = "val/score_heldout",
    direction: Literal["maximize", "minimize"] = "maximize",
    storage: str = "sqlite:///sweeps.db",
    sampler: BaseSampler | None = None,
    seed: int | None = 0,
    pruner: BasePruner | None = None,
    heartbeat_interval: int = 30,
    grace_period: int | None = None,
    max_retry: int = 2,
    max_failures: int = 3,
    keep_checkpoints: bool = False,
    out: str = "runs/sweeps",
    mlflow: str = "mlflow.yaml",
) -> dict[str, Any]:
    """An Optuna study over fit options; every trial an MLflow run under one parent run.

    Args:
        search_space: fit options by dotted path (``model.optimizer.init_args.lr``), each with a
            range (``low``, ``high``, ``log``, ``step``, ``type: int``) or ``choices``.
        study: the study's name in the storage (and of its MLflow runs); the same name resumes it.
        fit_config: the ``au-detect fit`` config every trial starts from.
        fit_overrides: dotted fit options set for every trial (fewer epochs, no model logging, ...).
        n_trials: trials to finish (complete or pruned), over all processes working on the study.
        metric: the validation metric a trial is scored and pruned by (its best epoch's value).
        direction: ``maximize`` or ``minimize`` the metric.
        storage: Optuna RDB storage URL (``sqlite:///sweeps.db``, ``postgresql://...``), shared by
            the processes that work on the study.
        sampler: an Optuna sampler (``class_path``/``init_args``); default TPE with ``seed``.
        seed: the default sampler's seed. Processes that join or resume a study draw from fresh
            entropy (one seed would repeat the first process's draws).
        pruner: an Optuna pruner (``class_path``/``init_args``); default
            ``MedianPruner(n_startup_trials=2)``; ``optuna.pruners.NopPruner`` prunes nothing.
        heartbeat_interval: seconds between a running trial's heartbeats in the storage.
        grace_period: seconds without a heartbeat after which a trial's process counts as dead
            (default twice the interval).
        max_retry: times a trial whose process died is run again.
        max_failures: failed trials (no score) this process accepts before it stops.
        keep_checkpoints: keep each trial's local checkpoint files (its best checkpoint is in its
            MLflow run either way).
        out: trials' checkpoints go to ``<out>/<study>/trial-<n>``, the best config to ``<out>/<study>``.
        mlflow: MLflow settings file.
    """
    fixed = dict(fit_overrides or {})
    space = dict(search_space or {})
    if not space:
        raise ValueError("sweep: search_space names no option")
    for name, spec in space.items():
        spec.check(name)
    clash = sorted(k for k in {*space, *fixed} if k in RESERVED or k.split(".")[0] in ("mlflow", "run_name", "tags"))
    if clash:
        raise ValueError(f"sweep: {clash} are set by the sweep for each trial, not by fit_overrides or search_space")
    both = sorted(set(space) & set(fixed))
    if both:
        raise ValueError(f"sweep: {both} are both fixed (fit_overrides) and searched (search_space)")
    mode = "max" if direction == "maximize" else "min"
    fixed.update({"checkpoint.monitor": metric, "checkpoint.mode": mode})
    check_fit_config(fit_config, fixed, space)

    tracking = TrackingSettings.read(mlflow)
    client = open_client(tracking.tracking_uri)
    with creation_lock(tracking.tracking_uri):
        experiment_id = _retry(lambda: tracking.experiment_id(client))
    with creation_lock(storage):
        optuna_storage = _retry(lambda: open_storage(storage, heartbeat_interval, grace_period,
                                                     StaleTrial(tracking.tracking_uri, max_retry)))
    sampler = sampler if sampler is not None else optuna.samplers.TPESampler(seed=seed)
    pruner = pruner if pruner is not None else optuna.pruners.MedianPruner(n_startup_trials=2)
    opened, created = open_study(study, optuna_storage, sampler, pruner, direction)
    if not created:
        sampler.reseed_rng()
    parent = parent_run(opened, created, client, experiment_id, tracking, study)
    client.update_run(parent, status="RUNNING")
    _retry(lambda: log_params_once(client, parent, {
        "study": study, "fit_config": fit_config, "n_trials": n_trials, "metric": metric, "direction": direction,
        "storage": _public_url(storage), "sampler": type(sampler).__name__, "pruner": type(pruner).__name__,
        **{f"fixed.{k}": v for k, v in fixed.items()},
        **{f"search.{k}": _describe(v) for k, v in space.items()}}))
    out_dir = Path(out) / study
    print(f"[sweep] study '{study}' in {_public_url(storage)} ({'created' if created else 'joined'}): "
          f"{n_trials} trials of au-detect fit --config {fit_config}, {metric} ({direction}); MLflow experiment "
          f"'{tracking.experiment_name}' at {tracking.tracking_uri}, parent run {parent}")

    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran: list[int] = []  # this process's trials, by number

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        return run_trial(trial, opened, fit_config, fixed, space, metric, n_trials, parent, study, out_dir,
                         mlflow, worker, keep_checkpoints)

    failures = 0
    ok = waiting = False
    try:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(opened)
            states = Counter(t.state for t in opened.get_trials(deepcopy=False))
            done = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
            if done >= n_trials:
                break
            if done + states[TrialState.RUNNING] >= n_trials:
                # The study's last trials are running elsewhere: their end, or their process's
                # death (then a retry is queued for this one to take), decides what is left.
                if not waiting:
                    grace = grace_period or 2 * heartbeat_interval
                    print(f"[sweep] {done} trials finished, {states[TrialState.RUNNING]} running elsewhere: waiting "
                          f"for them (one whose process died is run again here {grace} s after its last heartbeat)")
                waiting = True
                time.sleep(min(5.0, float(heartbeat_interval)))
                continue
            waiting = False
            if failures >= max_failures:
                raise RuntimeError(f"sweep '{study}': {failures} trials of this process failed (see above); "
                                   f"stopping (max_failures)")
            opened.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)
            last = next((t for t in opened.get_trials(deepcopy=False) if ran and t.number == ran[-1]), None)
            if last is not None and last.state == TrialState.FAIL and not last.user_attrs.get("surplus"):
                failures += 1
        ok = True
    finally:
        summary = report(opened, client, parent, fit_config, fixed, space, metric, n_trials, out_dir)
        if summary["finished"] >= n_trials:
            client.set_terminated(parent, "FINISHED")
        elif not ok:
            client.set_terminated(parent, "FAILED")
    print(f"[sweep] study '{study}': {summary['complete']} complete, {summary['pruned']} pruned, "
          f"{summary['failed']} failed" + (f"; best {metric} {summary['best_value']:.4f} (trial "
                                           f"{summary['best_trial']})" if summary["best_trial"] is not None else "")
          + f"; parent run {parent}")
    if summary.get("best_config"):
        print(f"[sweep] the best trial as a fit config: au-detect fit --config {summary['best_config']}")
    print(f"[sweep] see the runs: {tracking.ui_command()}  (experiment '{tracking.experiment_name}')")
    return summary


# -- one trial ---------------------------------------------------------------------------------------
def run_trial(trial: optuna.Trial, study: optuna.Study, fit_config: str, fixed: dict[str, Any],
              space: dict[str, SearchParam], metric: str, n_trials: int, parent: str, study_name: str,
              out_dir: Path, mlflow_config: str, worker: str, keep_checkpoints: bool) -> float:
    """``au-detect fit`` with the trial's values; its best epoch's ``metric``."""
    from experiments.lightning_cli import AUDetectCLI

    trial.set_user_attr("process", worker)
    trial.set_user_attr("mlflow_run_id", None)  # a retry's copy of the dead run's id
    trials = study.get_trials(deepcopy=False)
    ahead = [t for t in trials if t.state in FINISHED or (t.state == TrialState.RUNNING and t.number < trial.number)]
    if len(ahead) >= n_trials:
        trial.set_user_attr("surplus", True)
        raise SurplusTrial(f"the study has its {n_trials} trials (finished or running); not run")
    values = {name: spec.suggest(trial, name) for name, spec in space.items()}
    # a trial queued again after its process died: the first attempt's number
    retry_of = next(t.system_attrs.get("failed_trial") for t in trials if t.number == trial.number)
    name = f"{study_name}-trial-{trial.number}"
    tags = {"mlflow.parentRunId": parent, "optuna.study": study_name, "optuna.trial": str(trial.number),
            "optuna.params": yaml.safe_dump(values, default_flow_style=True, sort_keys=False).strip()[:5000]}
    if retry_of is not None:
        tags["optuna.retry_of"] = str(retry_of)
    overrides = {**fixed, **values, "trainer.default_root_dir": str(out_dir / f"trial-{trial.number}"),
                 "mlflow": mlflow_config, "run_name": name, "tags": tags}
    print(f"[sweep] trial {trial.number}" + (f" (retry of {retry_of})" if retry_of is not None else "")
          + f": au-detect fit with {values}")
    pruning = TrialPruning(trial, metric)
    try:
        cli = AUDetectCLI(args={"fit": with_overrides(fit_config, overrides)},
                          trainer_defaults={"callbacks": [pruning]})
    except SystemExit as e:  # the fit's parser refused the config (its message is above)
        _mark(pruning.run_id, mlflow_config, "FAIL")
        raise RuntimeError(f"au-detect fit refused trial {trial.number}'s config {values} (exit {e.code})") from None
    except BaseException:
        _mark(pruning.run_id, mlflow_config, "FAIL")
        raise
    if pruning.pruned is not None:
        _mark(pruning.run_id, mlflow_config, "PRUNED", status="KILLED")
        _drop_checkpoints(cli, keep_checkpoints)
        raise pruning.pruned
    score = cli.trainer.checkpoint_callback.best_model_score
    _drop_checkpoints(cli, keep_checkpoints)
    value = float(score) if score is not None else math.nan
    _mark(pruning.run_id, mlflow_config, "COMPLETE" if math.isfinite(value) else "FAIL")
    if pruning.run_id and math.isfinite(value):
        open_client(TrackingSettings.read(mlflow_config).tracking_uri).log_metric(pruning.run_id, "optuna/value", value)
    return value


def _mark(run_id: str | None, mlflow_config: str, state: str, status: str | None = None) -> None:
    """A trial's run: its Optuna state as a tag, and its MLflow status when that differs from the fit's."""
    if run_id is None:
        return
    client = open_client(TrackingSettings.read(mlflow_config).tracking_uri)
    client.set_tag(run_id, "optuna.state", state)
    if status is not None:
        client.set_terminated(run_id, status)


def _drop_checkpoints(cli, keep: bool) -> None:
    """The trial's local checkpoint files (its best checkpoint is in its MLflow run); only in the
    trial's own folder (not in a ``checkpoint.dirpath`` the trials share)."""
    folder = getattr(cli.trainer.checkpoint_callback, "dirpath", None)
    root = Path(cli.trainer.default_root_dir).resolve()
    if keep or not folder or not Path(folder).is_dir() or not Path(folder).resolve().is_relative_to(root):
        return
    for path in Path(folder).glob("*.ckpt"):
        path.unlink(missing_ok=True)


# -- the study and its parent run ---------------------------------------------------------------------
def open_storage(url: str, heartbeat_interval: int, grace_period: int | None,
                 stale: Callable[[optuna.Study, FrozenTrial], None]) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose process dies is failed and retried."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period, heartbeat_stale_trial_callback=stale)


def open_study(name: str, storage, sampler: BaseSampler, pruner: BasePruner,
               direction: str) -> tuple[optuna.Study, bool]:
    """The study, created here (True) or loaded as another process or an earlier run made it (False)."""
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                   direction=direction), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        if study.direction.name.lower() != direction:
            raise ValueError(f"sweep: study '{name}' exists with direction {study.direction.name.lower()}, "
                             f"not {direction}") from None
        return study, False


def parent_run(study: optuna.Study, created: bool, client, experiment_id: str, tracking: TrackingSettings,
               name: str, wait: float = 30.0) -> str:
    """The study's parent MLflow run: the one its user attributes name, else a new one.

    The process that created the study creates it; the others wait for its id (up to ``wait``
    seconds, while the study has no trial), so that processes started together share one.
    """
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + (0 if created else wait)
    while True:
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
                    return run_id
            except MlflowException:
                pass
            print(f"[sweep] the study's parent run {run_id} is not in experiment '{tracking.experiment_name}' at "
                  f"{tracking.tracking_uri}: starting a new one")
            break
        if time.monotonic() >= deadline or study.get_trials(deepcopy=False):
            break
        time.sleep(0.5)
    run = client.create_run(experiment_id, run_name=name,
                            tags={**tracking.tags, "optuna.study": name, "sweep.role": "parent"})
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


def check_fit_config(fit_config: str, fixed: dict[str, Any], space: dict[str, SearchParam]) -> None:
    """The fit config with the fixed changes and every option at each end of its range (or its
    first and last choice) is one ``au-detect fit`` takes, on one device: checked before any trial."""
    from experiments.lightning_cli import AUDetectCLI

    class _Parsed(Exception):
        pass

    class ParseOnly(AUDetectCLI):
        def before_instantiate_classes(self) -> None:
            raise _Parsed(self._subconfig())

    for end in (0, 1):
        values = {name: spec.ends()[end] for name, spec in space.items()}
        try:
            ParseOnly(args={"fit": with_overrides(fit_config, {**fixed, **values})})
        except _Parsed as parsed:
            trainer = parsed.args[0].trainer
        except SystemExit as e:
            raise ValueError(f"sweep: au-detect fit does not take {fit_config} with {fixed} and {values} "
                             f"(exit {e.code}; its message is above)") from None
        devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
        if _device_count(devices, trainer.get("accelerator")) > 1 or nodes > 1:
            raise ValueError(f"sweep: a trial runs on one device (trainer.devices {devices}, num_nodes {nodes}); "
                             "run one sweep process per GPU instead (CUDA_VISIBLE_DEVICES)")


def _device_count(devices: Any, accelerator: Any) -> int:
    """How many devices Lightning gives a fit with ``trainer.devices`` (1 when it cannot tell)."""
    if devices in ("auto", -1, "-1"):  # every GPU it sees
        if accelerator == "cpu":
            return 1
        import torch

        return max(torch.cuda.device_count(), 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices or 1)
    return int(devices or 1)


# -- what the parent run holds ----------------------------------------------------------------------
def best_config(fit_config: str, fixed: dict[str, Any], space: dict[str, SearchParam],
                trial: FrozenTrial) -> dict[str, Any]:
    """The fit config a trial trained with: the base config, the fixed changes and its values."""
    values = {name: (space[name].decode(v) if name in space else v) for name, v in trial.params.items()}
    return with_overrides(fit_config, {**fixed, **values})


def report(study: optuna.Study, client, parent: str, fit_config: str, fixed: dict[str, Any],
           space: dict[str, SearchParam], metric: str, n_trials: int, out_dir: Path) -> dict[str, Any]:
    """The parent run brought up to date with the study (what every process does at its end)."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus"))
    summary: dict[str, Any] = {"study": study.study_name, "parent_run_id": parent, "n_trials": n_trials,
                               "finished": finished, "complete": states[TrialState.COMPLETE],
                               "pruned": states[TrialState.PRUNED], "failed": failed,
                               "running": states[TrialState.RUNNING], "best_trial": None, "best_value": None,
                               "best_params": None, "best_config": None}
    for key in ("complete", "pruned", "failed", "running"):
        client.log_metric(parent, f"trials_{key}", summary[key], step=len(trials))
    if states[TrialState.COMPLETE]:
        best = study.best_trial
        config = best_config(fit_config, fixed, space, best)
        text = (f"# Study '{study.study_name}', trial {best.number}: {metric} {best.value:.6g}\n"
                f"#   au-detect fit --config best_config.yaml\n" + yaml.safe_dump(config, sort_keys=False))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "best_config.yaml"
        path.write_text(text)
        client.log_text(parent, text, "best_config.yaml")
        client.log_metric(parent, "best_value", best.value, step=len(trials))
        client.log_metric(parent, "best_trial", best.number, step=len(trials))
        client.set_tag(parent, "best.trial", str(best.number))
        if best.user_attrs.get("mlflow_run_id"):
            client.set_tag(parent, "best.mlflow_run_id", best.user_attrs["mlflow_run_id"])
        summary.update(best_trial=best.number, best_value=best.value, best_config=str(path),
                       best_params={k: space[k].decode(v) if k in space else v for k, v in best.params.items()})
    if trials:
        frame = study.trials_dataframe()
        client.log_text(parent, frame.to_csv(index=False), "trials.csv")
    _plots(study, client, parent, metric, states[TrialState.COMPLETE])
    return summary


def _plots(study: optuna.Study, client, parent: str, metric: str, complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    figures = {"optimization_history": lambda: plots.plot_optimization_history(study, target_name=metric),
               "parallel_coordinate": lambda: plots.plot_parallel_coordinate(study, target_name=metric)}
    if complete >= 2:
        figures["param_importances"] = lambda: plots.plot_param_importances(study, target_name=metric)
    else:
        note = f"parameter importances need 2 complete trials; the study has {complete}"
        print(f"[sweep] plots: {note}: not drawn")
        client.set_tag(parent, "plots.param_importances", note)
    for name, draw in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental API, matplotlib on a single trial
            try:
                axes = draw()
            except (ValueError, RuntimeError) as e:  # too few trials of some kind for Optuna to draw it
                print(f"[sweep] plots: {name} not drawn ({e})")
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(max(figure.get_size_inches()[0], 9), max(figure.get_size_inches()[1], 5))
        figure.tight_layout()
        client.log_figure(parent, figure, f"plots/{name}.png")
        plt.close(figure)


# -- helpers -----------------------------------------------------------------------------------------
def _describe(spec: SearchParam) -> str:
    if spec.choices is not None:
        return f"choices {spec.choices}"
    return (f"{spec.type} [{spec.low}, {spec.high}]" + (" log" if spec.log else "")
            + (f" step {spec.step}" if spec.step is not None else ""))


def _public_url(url: str) -> str:
    """A storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: shown as given
        return url


def _retry(fn: Callable[[], T], attempts: int = 6, pause: float = 1.0) -> T:
    """``fn()``, again after a pause when it fails: processes started together race to create the
    same database tables or MLflow experiment, and all but one lose once."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(pause * (attempt + 1))
    raise AssertionError("unreachable")
