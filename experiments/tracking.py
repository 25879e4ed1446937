"""``mlflow.yaml``: where runs are tracked. This is the only place that reads it; ``au-detect
sync-tracking`` (:func:`sync_tracking`) sends what fits kept while the server was away."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml
from lightning.pytorch.loggers import MLFlowLogger

from callbacks.tracking.spool import (SpooledMLFlowLogger, TrackingServerUnreachable, reachable, send_spool,
                                      spool_folders, summary_text)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class TrackingSettings:
    """The contents of ``mlflow.yaml``."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment_name: str = "au-detect"
    artifact_location: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    registered_model_name: str | None = None  # register each fit's model under this name
    # seconds the end of a fit waits for a tracking server that shows no sign of life before it
    # leaves what is unsent in the run's spool (callbacks.tracking.spool) and ends
    flush_timeout: float = 60.0

    @classmethod
    def read(cls, path: str | Path) -> "TrackingSettings":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MLflow settings {path} not found: pass --mlflow PATH (see mlflow.yaml)")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        settings = cls(**raw)
        settings.tags = {str(k): str(v) for k, v in (settings.tags or {}).items()}
        return settings

    def experiment_id(self, client) -> str:
        """The experiment's id on ``client``'s store, created (with the artifact location) if new."""
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)

    def ui_command(self) -> str:
        """The command that shows this store in the MLflow UI."""
        if self.tracking_uri == DEFAULT_TRACKING_URI:
            return "mlflow ui"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def unique_run_name(self, name: str, client=None) -> str:
        """``name``, or ``name-2``, ``name-3``... the first no run of the experiment is called yet."""
        from mlflow import MlflowClient

        client = client or MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return name
        pattern = name.replace("'", "_")  # LIKE's any-character: no quote inside the filter's string
        taken, token = set(), None
        while True:
            page = client.search_runs([experiment.experiment_id], f"attributes.run_name LIKE '{pattern}%'",
                                      max_results=1000, page_token=token)
            taken |= {run.info.run_name for run in page}
            token = page.token
            if not token:
                break
        n, candidate = 1, name
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def logger(self, run_name: str | None = None, run_id: str | None = None,
               tags: dict[str, str] | None = None, spool_root: str | Path | None = None,
               default_run_name: str | None = None) -> MLFlowLogger:
        """The run's logger. With ``spool_root`` (what the training CLI passes) its writes go through a
        spool there and never wait for the server (:class:`SpooledMLFlowLogger`); without, they are
        Lightning's synchronous calls. A new run without ``run_name`` is called ``default_run_name``,
        made unique in the experiment (MLflow's generated names repeat under a fixed seed)."""
        # Lightning's MLFlowLogger would default to the ./mlruns file store, which MLflow 3 no
        # longer takes by default: the URI is always explicit. The store is opened here first, in
        # this thread, so that a new SQLite database gets its tables once, before anything else
        # of the run (callbacks, model logging) opens it.
        from mlflow import MlflowClient

        if not reachable(self.tracking_uri, timeout=10):  # a quick answer, not MLflow's minutes of retries
            raise TrackingServerUnreachable(
                f"the MLflow tracking server at {self.tracking_uri} does not answer: a job needs it when it starts, "
                f"to find or create its run (once started, it goes on without it). Start the server, or point "
                f"tracking_uri in the MLflow settings elsewhere.")
        client = MlflowClient(self.tracking_uri)
        with creation_lock(self.tracking_uri):  # a new SQLite store's tables, made by one process
            client.search_experiments(max_results=1)
        if run_name is None and run_id is None and default_run_name:
            run_name = self.unique_run_name(default_run_name, client)
        kwargs = dict(experiment_name=self.experiment_name, tracking_uri=self.tracking_uri,
                      tags={**self.tags, **(tags or {})}, artifact_location=self.artifact_location, run_name=run_name,
                      run_id=run_id, log_model=False)
        if spool_root is None:
            return MLFlowLogger(**kwargs)
        return SpooledMLFlowLogger(spool_root=spool_root, flush_timeout=self.flush_timeout, **kwargs)


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Held while a SQLite database is opened (and, the first time, its tables created): processes
    started together on one machine would otherwise both create MLflow's or Optuna's tables and
    one of them fail. Other URLs (servers) need nothing."""
    try:
        import fcntl
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # no fcntl (Windows), or not a database URL (http://)
        yield
        return
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        yield
        return
    key = hashlib.sha1(str(Path(parsed.database).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"au-detect-sqlite-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_params_once(client, run_id: str, params: dict[str, object]) -> None:
    """The params the run does not have yet (values as text, in requests of 100, MLflow's limit); a
    value that differs from the run's (a resume, a rerun with more trials) becomes the tag
    ``resumed_with/<key>``, since MLflow params cannot change."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = []
    for key, value in params.items():
        text = str(value)[:6000]
        if key not in existing:
            new.append(Param(key, text))
        elif existing[key] != text:
            client.set_tag(run_id, f"resumed_with/{key}", text[:5000])
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


def sync_tracking(spool: str, tracking_uri: str | None = None, timeout: float = 60.0) -> list[dict]:
    """Send to MLflow what fits kept while their tracking server could not be reached.

    Args:
        spool: a run's spool folder as the fit named it (``<trainer.default_root_dir>/mlflow_spool/<run
            id>``), or the ``mlflow_spool`` folder above it: every run's there.
        tracking_uri: the server to send to, when not the one the fit used (it must hold the same run).
        timeout: give up after this many seconds without any answer from the server.
    """
    results = []
    for folder in spool_folders(spool):
        result = send_spool(folder, tracking_uri, timeout)
        results.append(result)
        where = f"run {result['run_id']} at {result['tracking_uri']}"
        if result["busy"]:
            print(f"{folder}: another process is sending it now (a fit of {where} still running?); left as it is")
        elif result["left"]["records"]:
            print(f"{folder}: sent {result['sent']} of {result['pending']} records to {where}; the server stopped "
                  f"answering ({result['error'][:200]}). Kept: {summary_text(result['left'])}. Run this again later.")
        else:
            print(f"{folder}: sent {result['sent']} records to {where}; nothing left to send")
        if result["rejected"]:
            print(f"{folder}: {result['rejected']} records the server refused are in {folder}/rejected "
                  f"(the reason beside each)")
    if any(r["busy"] or r["left"]["records"] for r in results):
        raise SystemExit("au-detect sync-tracking: some of the kept tracking could not be sent (see above)")
    return results


def use_for_model_uri(model: str, settings: str | Path) -> None:
    """Point MLflow at the settings file's store when ``model`` is an MLflow model URI (``runs:/``,
    ``models:/``); MLFLOW_TRACKING_URI, when set, wins."""
    from lightning_modules.serving.predictor import MLFLOW_SCHEMES

    if model.startswith(MLFLOW_SCHEMES) and not os.environ.get("MLFLOW_TRACKING_URI") and Path(settings).is_file():
        import mlflow

        mlflow.set_tracking_uri(TrackingSettings.read(settings).tracking_uri)
