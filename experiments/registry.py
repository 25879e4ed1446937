"""``au-detect promote``: point a model registry alias (``champion``, ...) at a model version;
``au-detect verify``: check a logged model's code files against the hashes taken when it was logged.

    au-detect promote --model runs:/<run id>/model --alias champion
    au-detect promote --model models:/au-detector/3 --alias champion
    au-detect promote --model models:/au-detector@candidate --alias champion

A fit whose MLflow settings name a ``registered_model_name`` registers its model as a new version
of that model and gives the version the alias ``candidate``
(:data:`lightning_modules.serving.pyfunc.CANDIDATE_ALIAS`). Promoting moves another alias to a version;
everything that loads ``models:/<name>@<alias>`` (``au-detect predict --model``, ``mlflow models
serve -m``, ``mlflow.pyfunc.load_model``) then gets that version.

    au-detect verify --model models:/au-detector@champion
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from experiments.tracking import TrackingSettings, open_client
from lightning_modules.serving.pyfunc import CODE_TAG, download_model_code, logged_models, model_code_hashes


class RegistryError(SystemExit):
    """A one-line reason why a model URI or alias could not be used (the command's exit message)."""

    def __init__(self, message: str):
        super().__init__(f"au-detect promote: {message}")


@dataclass(frozen=True)
class Version:
    """One version of a registered model."""

    name: str
    version: str
    run_id: str | None

    def __str__(self) -> str:
        return f"version {self.version}" + (f" (run {self.run_id})" if self.run_id else "")


_RUNS = re.compile(r"^runs:/([^/]+)/(.+?)/?$")
_VERSION = re.compile(r"^models:/([^/@]+)/([^/@]+)/?$")
_ALIAS = re.compile(r"^models:/([^/@]+)@([^/@]+)/?$")


def tracking_uri(settings: str | Path) -> str:
    """The store model URIs are read from: MLFLOW_TRACKING_URI when set (as for ``au-detect predict``
    and ``mlflow models serve``), else the settings file's."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    try:
        return TrackingSettings.read(settings).tracking_uri
    except (FileNotFoundError, ValueError) as e:
        raise RegistryError(str(e)) from None


def resolve(client: MlflowClient, model: str, name: str | None = None, prefer: str | None = None) -> Version | None:
    """The registered version that ``model`` names: ``models:/<name>/<version>``,
    ``models:/<name>/latest``, ``models:/<name>@<alias>``, or ``runs:/<run id>/<path>`` (the version
    registered from that run's model, under ``name`` when given; None when it was never
    registered; ``prefer``: the name to take when it is registered under several). Errors are
    :class:`RegistryError` naming the URI."""
    where = client.tracking_uri
    if m := _ALIAS.match(model):
        registered, alias = m.groups()
        _registered_model(client, model, registered)
        try:
            found = client.get_model_version_by_alias(registered, alias)
        except MlflowException:
            aliases = sorted(client.get_registered_model(registered).aliases)
            raise RegistryError(f"model {model!r}: registered model {registered!r} has no alias {alias!r} at {where} "
                                f"(its aliases: {', '.join(aliases) or 'none'})") from None
        return Version(found.name, str(found.version), found.run_id)
    if m := _VERSION.match(model):
        registered, version = m.groups()
        _registered_model(client, model, registered)
        if version == "latest":
            versions = _versions(client, f"name = '{_quote(registered)}'")
            if not versions:
                raise RegistryError(f"model {model!r}: registered model {registered!r} has no versions at {where}")
            found = max(versions, key=lambda v: int(v.version))
        else:
            if not version.isdigit():
                raise RegistryError(f"model {model!r}: {version!r} is not a version number (models:/<name>/<version>, "
                                    f"models:/<name>@<alias>)")
            try:
                found = client.get_model_version(registered, version)
            except MlflowException:
                known = sorted(int(v.version) for v in _versions(client, f"name = '{_quote(registered)}'"))
                raise RegistryError(f"model {model!r}: registered model {registered!r} has no version {version} at "
                                    f"{where} (its versions: {', '.join(map(str, known)) or 'none'})") from None
        return Version(found.name, str(found.version), found.run_id)
    if m := _RUNS.match(model):
        run_id, path = m.groups()
        ids = _logged_model_ids(client, model, run_id, path)
        versions = [v for v in _versions(client, f"run_id = '{_quote(run_id)}'") if _model_id(v) in ids
                    or str(v.source).rstrip("/").endswith(f"/{path}")]  # registered from the run's artifacts
        if name:
            versions = [v for v in versions if v.name == name]
        names = sorted({v.name for v in versions})
        if len(names) > 1 and prefer in names:
            versions, names = [v for v in versions if v.name == prefer], [prefer]
        if len(names) > 1:
            raise RegistryError(f"model {model!r}: registered under several names ({', '.join(names)}); "
                                f"pass --name to say which")
        if not versions:
            return None
        newest = max(versions, key=lambda v: int(v.version))  # a run's model registered twice: the newest
        return Version(newest.name, str(newest.version), newest.run_id)
    raise RegistryError(f"model {model!r}: expected runs:/<run id>/model, models:/<name>/<version> or "
                        f"models:/<name>@<alias>")


def register(client: MlflowClient, model: str, name: str) -> Version:
    """Register the run model ``runs:/<run id>/<path>`` as a new version of ``name``."""
    run_id, path = _RUNS.match(model).groups()
    ids = _logged_model_ids(client, model, run_id, path)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    model_id = ids[-1]  # the newest: what runs:/<id>/<path> loads
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    return Version(version.name, str(version.version), version.run_id)


def promote(model: str, alias: str = "champion", name: str | None = None, mlflow: str = "mlflow.yaml") -> dict:
    """Point a registry alias at the model version a URI names, and say where it pointed before.

    ``au-detect predict --model models:/<name>@<alias>`` and ``mlflow models serve -m
    models:/<name>@<alias>`` then load that version. Every fit registered through
    ``registered_model_name`` already gets the alias ``candidate``.

    Args:
        model: ``runs:/<run id>/model`` (the version registered from that run's model; registered
            now, under ``--name`` or the settings' ``registered_model_name``, if it never was),
            ``models:/<name>/<version>``, ``models:/<name>/latest`` or ``models:/<name>@<alias>``.
        alias: the alias to move (``champion``, ``production``, ...).
        name: the registered model's name, for a run's model: which name to use when it is registered
            under several, and the name to register it under when it is not registered yet.
        mlflow: MLflow settings file: the tracking store (MLFLOW_TRACKING_URI wins if set) and
            ``registered_model_name``.
    """
    if not re.fullmatch(r"[\w\-]+", alias or "") or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias.lower()):
        raise RegistryError(f"alias {alias!r}: letters, digits, '_' and '-' only, and not 'latest' "
                            f"or v<number> (MLflow keeps those for versions)")
    uri = tracking_uri(mlflow)
    client = open_client(uri, registry_uri=uri)
    configured = _settings_name(mlflow)
    version = resolve(client, model, name, prefer=configured)
    registered_now = False
    if version is None:
        target = name or configured
        if not target:
            raise RegistryError(f"model {model!r}: this run's model was never registered; pass --name <registered "
                                f"model name> (or set registered_model_name in {mlflow}) to register it")
        version = register(client, model, target)
        registered_now = True
        print(f"Registered {model} as {version.name} {version}")
    try:
        before = client.get_model_version_by_alias(version.name, alias)
        previous = Version(before.name, str(before.version), before.run_id)
    except MlflowException:
        previous = None
    client.set_registered_model_alias(version.name, alias, version.version)
    label = f"{version.name}@{alias}"
    if previous is not None and previous.version == version.version:
        print(f"{label}: already {version}; left as it is")
    else:
        print(f"{label}: {previous or 'no version'} -> {version}")
    print(f"  load it with: au-detect predict --model models:/{label} ...   or   "
          f"mlflow models serve -m models:/{label} --env-manager local")
    return {"name": version.name, "alias": alias, "version": version.version, "run_id": version.run_id,
            "previous": previous.version if previous else None, "registered": registered_now}


def _model_id(version) -> str | None:
    """The logged model a version was registered from (its source ``models:/<model id>`` when the
    store does not fill in ``model_id``)."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return model_id
    source = str(version.source or "")
    return source[len("models:/"):].strip("/") if source.startswith("models:/m-") else None


def _settings_name(settings: str | Path) -> str | None:
    try:
        return TrackingSettings.read(settings).registered_model_name
    except (FileNotFoundError, ValueError):
        return None


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _versions(client: MlflowClient, filter_string: str) -> list:
    found, token = [], None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _registered_model(client: MlflowClient, model: str, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"model {model!r}: no registered model {name!r} at {client.tracking_uri}") from None


def _logged_model_ids(client: MlflowClient, model: str, run_id: str, path: str) -> list[str]:
    """The ids of the models logged on ``run_id`` under ``path``, oldest first (a run that has
    none is an error naming the URI)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"model {model!r}: no run {run_id} at {client.tracking_uri}") from None
    models = logged_models(client, run.info.experiment_id, run_id, path)
    models.sort(key=lambda m: m.creation_timestamp)
    if not models:
        raise RegistryError(f"model {model!r}: run {run_id} ({run.info.run_name}) has no model {path!r} "
                            f"(was it logged? --mlflow_artifacts.log_model)")
    return [m.model_id for m in models]


class ModelCodeMismatch(Exception):
    """A logged model whose code files are not those hashed when it was logged (one line from the CLI)."""


def logged_model_id(client: MlflowClient, model: str) -> str:
    """The logged model a URI names, found in the tracking store (not in the model's own files)."""
    if m := _RUNS.match(model):
        return _logged_model_ids(client, model, *m.groups())[-1]
    version = resolve(client, model)
    model_id = _model_id(client.get_model_version(version.name, version.version)) if version else None
    if not model_id:
        raise RegistryError(f"model {model!r}: its version does not name a logged model (registered from files?)")
    return model_id


def verify(model: str, mlflow: str = "mlflow.yaml") -> dict[str, str]:
    """Check that a logged model's code files are the ones hashed when it was logged.

    ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run a model's code files (models
    from code), so a file changed in the artifact store runs in whoever loads it. At logging
    time au-detect hashes those files (``MLmodel``, ``pyfunc_model.py``, ``code/``, the
    requirements) into a tag of the logged model, in the tracking store; this downloads the
    files (not the weights) and compares. Prints the result; a mismatch is an error listing the
    files changed, added or missing.

    Args:
        model: ``runs:/<run id>/model``, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.
        mlflow: MLflow settings file (MLFLOW_TRACKING_URI wins if set).
    """
    import tempfile

    client = open_client(tracking_uri(mlflow))
    try:
        model_id = logged_model_id(client, model)
    except RegistryError as e:  # said by promote's resolver: the same reasons, this command's words
        raise ModelCodeMismatch(str(e.code).removeprefix("au-detect promote: ")) from None
    recorded = client.get_logged_model(model_id).tags.get(CODE_TAG)
    if recorded is None:
        raise ModelCodeMismatch(f"{model}: no code hashes recorded (logged before au-detect 0.4); nothing to compare")
    expected = json.loads(recorded)
    with tempfile.TemporaryDirectory() as tmp:
        found = model_code_hashes(download_model_code(model_id, tmp))
    changed = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    added, missing = sorted(found.keys() - expected.keys()), sorted(expected.keys() - found.keys())
    if changed or added or missing:
        said = "; ".join(f"{what}: {', '.join(files)}" for what, files in
                         (("changed", changed), ("added", added), ("missing", missing)) if files)
        raise ModelCodeMismatch(f"{model} ({model_id}): code files differ from those logged ({said}); "
                                "do not load or serve it")
    print(f"{model} ({model_id}): {len(found)} code files match the hashes recorded when it was logged")
    return found
