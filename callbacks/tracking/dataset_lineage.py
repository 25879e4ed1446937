"""Which data a run saw: its train/val/test manifests as MLflow dataset inputs.

MLflow's UI shows a run's inputs in its Datasets column and on the run page: name, digest,
source, schema and profile. Each manifest becomes one dataset:

- **digest**: of the manifest's bytes (the first 12 hex digits of its SHA-256), so a manifest
  whose labels or rows changed is a new dataset, and the same file under another name is not;
- **source**: the manifest's path (``local``) or URL (``http``), as the data config names it;
- **schema**: its columns (the image reference and one 0/1 column per AU, 999 meaning unlabelled);
- **profile**: rows, labelled entries, the per-AU positive rates, and, once aligned, the
  alignment settings, the crop cache's key and its face-detection counts.

The context tag (``training``, ``validation``, ``test``) says what the run used it for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.io.manifest import Manifest, au_column_name, is_url

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
DIGEST_CHARS = 12


def manifest_digest(path: str | Path) -> str:
    """The content digest of a manifest file.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
    ...     _ = f.write("image\\tAU1\\na.jpg\\t1\\n")
    >>> manifest_digest(f.name), len(manifest_digest(f.name))
    ('00123177b498', 12)
    >>> os.unlink(f.name)
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:DIGEST_CHARS]


def manifest_dataset(manifest: Manifest, source: str, report: dict | None = None) -> dict[str, Any]:
    """The MLflow dataset of one manifest, as the fields of ``mlflow.entities.Dataset``.

    Args:
        manifest: the manifest as read (for a manifest of URLs, its local copy with the rows
            whose image was downloaded).
        source: the manifest as the config names it (a path or a URL).
        report: the alignment report of its crop cache, when aligned.
    """
    rates = manifest.positive_rate()
    profile: dict[str, Any] = {
        "rows": len(manifest),
        "skipped_rows": len(manifest.skipped),
        "labelled_entries": int(manifest.mask.sum()),
        "au_positive_rates": {au_column_name(a): (None if np.isnan(r) else round(float(r), 5))
                              for a, r in zip(manifest.aus, rates)},
    }
    if report is not None:
        profile["alignment"] = report.get("settings")
        profile["cache_key"] = report.get("key")
        profile["aligned"] = {k: report.get(k) for k in ("images", "aligned", "faces_found", "no_face", "unreadable")}
    remote = is_url(source)
    columns = [{"name": "image", "type": "string", "required": True}]
    columns += [{"name": au_column_name(a), "type": "integer", "required": True} for a in manifest.aus]
    return {
        "name": _name(source),
        # for a manifest of URLs, its downloaded copy: the same rows and labels, references made local
        "digest": manifest_digest(manifest.path),
        "source_type": "http" if remote else "local",
        "source": json.dumps({"url": source} if remote else {"uri": str(Path(source).resolve())}),
        "schema": json.dumps({"mlflow_colspec": columns}),
        "profile": json.dumps(profile),
    }


def _name(source: str) -> str:
    """``synthau/train.tsv``: the manifest's file with its folder, what a reader tells them apart by."""
    parts = source.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]


def datamodule_datasets(data) -> list[tuple[dict[str, Any], str]]:
    """(dataset, context) for each of an :class:`~datamodules.au_datamodule.AUDataModule`'s
    train/val/test manifests; the alignment reports of the splits it has opened go with them."""
    out = []
    for stage, context in CONTEXTS.items():
        manifest = data.manifest(stage)
        out.append((manifest_dataset(manifest, data.manifest_paths[stage], data.reports.get(stage)), context))
    return out


def dataset_inputs(datasets: list[tuple[dict[str, Any], str]]) -> list:
    """``mlflow.entities.DatasetInput`` objects for ``MlflowClient.log_inputs``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(**fields), [InputTag("mlflow.data.context", context)]) for fields, context in datasets]
