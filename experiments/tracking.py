"""``mlflow.yaml``: where runs are tracked. This is the only place that reads it; ``au-detect
sync-tracking`` (:func:`sync_tracking`) sends what fits kept while the server was away."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from lightning.pytorch.loggers import MLFlowLogger

from callbacks.tracking.mlflow_run import creation_lock, open_client
from callbacks.tracking.spool import (SpooledMLFlowLogger, TrackingServerUnreachable, reachable, send_spool,
                                      spool_folders, summary_text)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The experiment tag MLflow 3's UI reads for an experiment's kind (the UI's own "experiment type"
# choice writes it): "custom_model_development" shows runs, metrics and models, not GenAI traces.
EXPERIMENT_KIND_TAG, ML_EXPERIMENT = "mlflow.experimentKind", "custom_model_development"
# The runs list opens with no metric column: its columns are a view, which MLflow's UI shares as an
# experiment tag "mlflow.sharedViewState.<key>" opened by "?viewStateShareKey=<key>". This view
# shows the figures people compare, the newest runs first.
RUNS_VIEW_KEY = "au-detect-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_METRICS = ("test/f1", "val/f1_heldout", "val/score_heldout", "test/f1_default", "val/threshold_fallbacks",
                     "minutes/total")  # the last: a pipeline's parent run
RUNS_VIEW_PARAMS = ("model.backbone", "model.loss", "data.balanced_sampling", "seed_everything")


def runs_view() -> str:
    """The runs list's view state, as the MLflow UI reads it from :data:`RUNS_VIEW_TAG`: the columns
    of :data:`RUNS_VIEW_METRICS` and :data:`RUNS_VIEW_PARAMS` shown, in that order, newest runs first."""
    columns = [f"metrics.`{m}`" for m in RUNS_VIEW_METRICS] + [f"params.`{p}`" for p in RUNS_VIEW_PARAMS]
    # columnOrder: as listed (the table would sort them by name); a shared view cannot expand rows,
    # so the pipeline's parent run carries its fit's figures itself
    return json.dumps({"selectedColumns": columns, "columnOrder": columns,
                       "orderByKey": "attributes.start_time", "orderByAsc": False})


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
        """The experiment's id on ``client``'s store, created (with the artifact location) if new, and
        marked as a machine-learning experiment (:data:`EXPERIMENT_KIND_TAG`) unless someone chose
        its kind already."""
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location,
                                                tags={EXPERIMENT_KIND_TAG: ML_EXPERIMENT, RUNS_VIEW_TAG: runs_view()})
            except MlflowException:  # another process created it first
                experiment = client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, ML_EXPERIMENT)
        if RUNS_VIEW_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, RUNS_VIEW_TAG, runs_view())
        return experiment.experiment_id

    def ui_command(self) -> str:
        """The command that shows this store in the MLflow UI, run from the project folder."""
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def ui_url(self, experiment_id: str, run_id: str | None = None, port: int = 5000) -> str:
        """Where ``mlflow ui`` shows the experiment's runs (or one run), as a machine-learning project:
        MLflow 3's UI opens every experiment as a GenAI one unless the address asks otherwise."""
        if run_id:
            return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
        return (f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                f"&viewStateShareKey={RUNS_VIEW_KEY}")

    def unique_run_name(self, name: str, client=None) -> str:
        """``name``, or ``name-2``, ``name-3``... the first no run of the experiment is called yet."""
        client = client or open_client(self.tracking_uri)
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
               default_run_name: str | None = None, log_hyperparams: bool = True) -> MLFlowLogger:
        """The run's logger. With ``spool_root`` (what the training CLI passes) its writes go through a
        spool there and never wait for the server (:class:`SpooledMLFlowLogger`); without, they are
        Lightning's synchronous calls. A new run without ``run_name`` is called ``default_run_name``,
        made unique in the experiment (MLflow's generated names repeat under a fixed seed).
        ``log_hyperparams=False``: the spooled logger leaves the params to whoever logs the config."""
        # Lightning's MLFlowLogger would default to the ./mlruns file store, which MLflow 3 no
        # longer takes by default: the URI is always explicit. The store is opened here first, in
        # this thread and under the creation lock, so that a new SQLite database gets its tables
        # once, before anything else of the run (callbacks, model logging) opens it.
        if not reachable(self.tracking_uri, timeout=10):  # a quick answer, not MLflow's minutes of retries
            raise TrackingServerUnreachable(
                f"the MLflow tracking server at {self.tracking_uri} does not answer: a job needs it when it starts, "
                f"to find or create its run (once started, it goes on without it). Start the server, or point "
                f"tracking_uri in the MLflow settings elsewhere.")
        client = open_client(self.tracking_uri)  # a new SQLite store's tables, made by one process
        with creation_lock(self.tracking_uri):  # and the experiment, with its tags
            self.experiment_id(client)  # made here, with its tags, rather than by Lightning's logger
        if run_name is None and run_id is None and default_run_name:
            run_name = self.unique_run_name(default_run_name, client)
        kwargs = dict(experiment_name=self.experiment_name, tracking_uri=self.tracking_uri,
                      tags={**self.tags, **(tags or {})}, artifact_location=self.artifact_location, run_name=run_name,
                      run_id=run_id, log_model=False)
        if spool_root is None:
            return MLFlowLogger(**kwargs)
        return SpooledMLFlowLogger(spool_root=spool_root, flush_timeout=self.flush_timeout,
                                   log_hyperparams=log_hyperparams, **kwargs)


def paste_path(path: str | Path) -> str:
    """A path as a command typed in the project folder takes it: relative there, else absolute;
    quoted when the shell would split it."""
    import shlex

    path = Path(path).resolve()
    try:
        text = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def next_commands(settings: TrackingSettings, settings_path: str | Path, run_id: str, photo: str | Path | None = None,
                  model_logged: bool = True, registered: str | None = None, champion: bool = False,
                  run_page: bool = True, experiment_id: str | None = None) -> list[str]:
    """What to paste after a fit: predict with its model (``runs:/<id>/model``) on ``photo``; when
    the model is a version of the registered model ``registered``, predict with
    ``models:/<name>@champion`` (after promoting it, unless ``champion`` says the alias points
    at it already); and the MLflow UI on the store, with the address of the run's page
    (``run_page``) or of the experiment's runs (of ``experiment_id``, asked of the store when not given)."""
    photo_text = paste_path(photo) if photo is not None and Path(photo).is_file() else "<photo.jpg>"
    flag = "" if Path(settings_path).resolve() == Path("mlflow.yaml").resolve() else \
        f" --mlflow {paste_path(settings_path)}"
    model = f"runs:/{run_id}/model"
    lines = [f"au-detect predict --model {model} --input {photo_text} --out predictions.csv{flag}"] if model_logged else []
    if model_logged and registered:
        if not champion:
            lines.append(f"au-detect promote --model {model} --alias champion --name {registered}{flag}")
        lines.append(f"au-detect predict --model models:/{registered}@champion --input {photo_text} "
                     f"--out predictions.csv{flag}")
    if experiment_id is None:  # the caller may know it, and the server may be away
        experiment_id = open_client(settings.tracking_uri).get_run(run_id).info.experiment_id
    lines.append(settings.ui_command())
    lines.append(f"  then open {settings.ui_url(experiment_id, run_id if run_page else None)}")
    return lines


def registered_name(settings: TrackingSettings, run_id: str, name: str | None) -> str | None:
    """``name`` when a version of that registered model was made from the run, else None."""
    from mlflow.exceptions import MlflowException

    if not name:
        return None
    try:
        client = open_client(settings.tracking_uri, registry_uri=settings.tracking_uri)
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return name if versions else None


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
    ``models:/``); MLFLOW_TRACKING_URI, when set, wins. A local store (SQLite file, file-store folder)
    that does not exist is an error here: MLflow would create an empty one and then not find the model."""
    from lightning_modules.serving.predictor import MLFLOW_SCHEMES

    if not model.startswith(MLFLOW_SCHEMES):
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    where = "MLFLOW_TRACKING_URI"
    if not uri:
        uri = TrackingSettings.read(settings).tracking_uri if Path(settings).is_file() else DEFAULT_TRACKING_URI
        where = str(settings) if Path(settings).is_file() else f"MLflow's default ({settings} not found)"
    local = None
    if uri.startswith("sqlite:///"):
        local = uri[len("sqlite:///"):].split("?", 1)[0]
    elif uri.startswith("file:"):
        local = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
    elif "://" not in uri:  # a plain path: a file store
        local = uri
    if local not in (None, "", ":memory:") and not Path(local).exists():
        raise FileNotFoundError(
            f"{model}: no MLflow store at {uri} (from {where}): train a model first (au-detect pipeline --config "
            f"experiments/configs/pipeline_demo.yaml), or pass --mlflow with the settings of the store that has it")
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(uri)
