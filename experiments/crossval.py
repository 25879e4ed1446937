"""``au-detect crossval``: subject-exclusive k-fold cross-validation, the way the field reports AU detection.

    au-detect crossval --config experiments/configs/crossval_demo.yaml
    au-detect crossval --manifest data/bp4d/bp4d.tsv --fit_config my_fit.yaml --protocol bp4d-3fold

A manifest with a ``subject`` column (``au-detect import bp4d|disfa|affwild2`` writes one) is cut
into folds by subject: ``bp4d-3fold`` and ``disfa-3fold`` are the published partitions
(:mod:`datamodules.io.folds`), ``random`` makes ``k`` seeded subject-exclusive folds and, with
``repeats``, reshuffles them that many times (one split is not a result: random 3-fold splits of
BP4D+ move mean F1 by about 0.065). Each fold is a normal ``au-detect fit`` then ``au-detect
test`` on the fold's own manifests (written under ``out``): validation subjects are drawn from the
fold's training subjects, never from its test fold.

In MLflow, one parent run holds the protocol, the folds' subjects, and per-AU F1 per fold (metrics
``fold/test/f1/AU<n>``, one step per fold), mean and standard deviation over folds (``test/f1``,
``test/f1_std``, ``test/f1/AU<n>``, ``test/f1_std/AU<n>``), mean binary F1 (each AU's F1 of its
positive class, averaged: the field's number) and micro-F1 (every decision pooled; Hinduja et al.
2024 argue it is the steadier of the two), and the table in the field's form (AUs as columns,
folds as rows, mean last) with the published records beside it (``crossval_table.md``, ``.csv``,
``.png``). Each fold is a child run. Killed, the command resumes when run again: finished folds
are kept, a fold cut short goes on from its ``last.ckpt`` in the same MLflow run.

Under DDP (``trainer.devices: 2`` in the fit config) every process runs this command (Lightning
starts the others with the same command line); only the first writes the state and the parent run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datamodules.io import files
from datamodules.io.folds import PROTOCOLS, Fold, FoldError, fold_of_rows, protocol_folds, random_folds
from datamodules.io.manifest import ManifestError, au_column_name, read_manifest, read_rows, write_manifest
from experiments.lightning_cli import COMMAND_TAG
from experiments.stages import STAGE_TAG, fit_and_test, with_overrides
from experiments.tracking import TrackingSettings, open_client

STATE_NAME = "crossval.json"
SUBJECT_COLUMN = "subject"
# Keys the command sets in every fold's fit config.
RESERVED = ("data.train_manifest", "data.val_manifest", "data.test_manifest", "data.image_root", "mlflow",
            "run_name", "tags", "trainer.default_root_dir", "checkpoint.dirpath", "ckpt_path")


@dataclass(frozen=True)
class Record:
    """A published result of a protocol: the method, its mean F1 (in %), the AUs it is over, where it is from."""

    method: str
    f1: float
    source: str


# The AUs each protocol's published mean F1 is over (DISFA's files hold 12; papers report 8).
PROTOCOL_AUS: dict[str, tuple[int, ...]] = {
    "bp4d-3fold": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "disfa-3fold": (1, 2, 4, 6, 9, 12, 25, 26),
    "affwild2-abaw": (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26),
}
RECORDS: dict[str, tuple[Record, ...]] = {
    "bp4d-3fold": (
        Record("ME-GraphAU", 65.5, "Luo et al., Learning Multi-dimensional Edge Feature-based AU Relation Graph "
                                   "for Facial Action Unit Recognition, IJCAI 2022"),
        Record("MDHR", 66.6, "Wang et al., Multi-scale Dynamic and Hierarchical Relationship Modeling for "
                             "Facial Action Units Recognition, CVPR 2024"),
        Record("FMAE-IAT", 67.1, "Ning et al., Representation Learning and Identity Adversarial Training for "
                                 "Facial Behavior Understanding, 2024"),
    ),
    "disfa-3fold": (
        Record("ME-GraphAU", 63.1, "Luo et al., IJCAI 2022"),
        Record("MDHR", 66.2, "Wang et al., CVPR 2024"),
        Record("FMAE-IAT", 70.1, "Ning et al., 2024"),
    ),
    # scored on the challenge's hidden test set, which no one holds: beside a validation figure for scale only
    "affwild2-abaw": (
        Record("ABAW5 winner (test set)", 55.5, "5th ABAW Competition, AU detection track, CVPR 2023 workshops"),
    ),
}


def challenge_fold(subjects: Sequence[str], splits: Sequence[str] | None, where: str = "manifest") -> Fold:
    """The ABAW challenge's split as one fold: trained on the ``train`` subjects (the Train_Set's
    annotation files), tested on the ``validation`` ones; from the ``split`` column that
    ``au-detect import affwild2`` writes. A subject in both is a :class:`FoldError`."""
    if splits is None:
        raise FoldError(f"{where}: no 'split' column: affwild2-abaw needs au-detect import affwild2's manifest")
    of: dict[str, set[str]] = {}
    for s, split in zip(subjects, splits):
        of.setdefault(split, set()).add(s)
    unknown = sorted(set(of) - {"train", "validation"})
    if unknown:
        raise FoldError(f"{where}: split values {unknown}: expected train and validation")
    both = of.get("train", set()) & of.get("validation", set())
    if both:
        raise FoldError(f"{where}: subjects in both splits: {', '.join(sorted(both))}")
    if not of.get("train") or not of.get("validation"):
        raise FoldError(f"{where}: affwild2-abaw needs subjects of both splits, found {sorted(of)}")
    return Fold(1, tuple(sorted(of["train"])), tuple(sorted(of["validation"])))


def plan_folds(protocol: str, subjects: Sequence[str], k: int = 3, repeats: int = 1, seed: int = 0,
               splits: Sequence[str] | None = None) -> list[tuple[int, Fold]]:
    """``(repeat, fold)`` pairs to run: a published protocol's three folds once, the ABAW split
    (``affwild2-abaw``, from ``splits``) once, or ``repeats`` times ``k`` random subject-exclusive
    folds (seeds ``seed``, ``seed + 1``...)."""
    if repeats < 1:
        raise FoldError(f"repeats must be at least 1, got {repeats}")
    if protocol == "random":
        return [(r, fold) for r in range(repeats) for fold in random_folds(subjects, k, seed + r)]
    if protocol not in PROTOCOLS and protocol != "affwild2-abaw":
        raise FoldError(f"protocol {protocol!r}: not one of {', '.join([*PROTOCOLS, 'affwild2-abaw', 'random'])}")
    if repeats != 1:
        raise FoldError(f"--repeats {repeats} with {protocol}: a published partition is one split; "
                        "use --protocol random --repeats N to reshuffle")
    if protocol == "affwild2-abaw":
        return [(0, challenge_fold(subjects, splits))]
    if repeats != 1:
        raise FoldError(f"--repeats {repeats} with {protocol}: a published partition is one split; "
                        "use --protocol random --repeats N to reshuffle")
    return [(0, fold) for fold in protocol_folds(protocol)]


def fold_key(repeat: int, fold: Fold, repeats: int) -> str:
    return f"repeat{repeat + 1}-fold{fold.number}" if repeats > 1 else f"fold{fold.number}"


def split_manifest(manifest: str | Path, out: Path, groups: dict[str, set[str]]) -> dict[str, Path]:
    """The rows of ``manifest`` whose subject is in each group, written as ``out/<group>.tsv`` with
    every column as it was (unchanged files are left alone, so their crop caches stay valid)."""
    path = Path(manifest)
    rows = read_rows(path)
    first = next(rows, None)
    if first is None:
        raise ManifestError(f"{path} is empty")
    header = [h.strip() for h in first[1]]
    if SUBJECT_COLUMN not in header:
        raise ManifestError(f"{path}:{first[0]}: no {SUBJECT_COLUMN!r} column, so folds cannot keep subjects apart "
                            f"(au-detect import writes one); columns: {header}")
    col = header.index(SUBJECT_COLUMN)
    chosen: dict[str, list[list[str]]] = {name: [] for name in groups}
    owner = {s: name for name, members in groups.items() for s in members}
    for _, cells in rows:
        name = owner.get(cells[col].strip()) if len(cells) > col else None
        if name is not None:
            chosen[name].append(cells)
    written = {}
    for name, selected in chosen.items():
        if not selected:
            raise FoldError(f"{path}: no row of subjects {', '.join(sorted(groups[name]))} for the {name} split")
        written[name] = write_manifest(out / f"{name}.tsv", header, selected, only_if_changed=True)
    return written


def subjects_read(manifest_path: str | Path, cache_report: str | Path | None, image_subject: dict[str, str]) -> set[str]:
    """The subjects a fit read for one split: from its manifest's ``subject`` column and, when
    given, from the images its crop cache holds (``report.json``'s samples)."""
    manifest = Path(manifest_path)
    rows = read_rows(manifest)
    _, header = next(rows)
    col = [h.strip() for h in header].index(SUBJECT_COLUMN)
    found = {cells[col].strip() for _, cells in rows}
    if cache_report is not None:
        report = json.loads(Path(cache_report).read_text())
        found |= {image_subject.get(s["image"], f"<image {s['image']} of no subject>") for s in report["samples"]}
    return found


def leaked_subjects(record: dict, image_subject: dict[str, str]) -> dict[str, list[str]]:
    """Per training split (train, val), the fold's test subjects it read: from the files the fit
    read (its manifests and crop caches). Empty lists: no leak."""
    test = subjects_read(record["manifests"]["test"], None, image_subject)
    out = {}
    for split in ("train", "val"):
        cache = record.get("caches", {}).get(split)
        read = subjects_read(record["manifests"][split], Path(cache) / "report.json" if cache else None,
                             image_subject)
        out[split] = sorted(read & test)
    return out


def _percent(v: float) -> str:
    return "" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def fold_table(protocol: str, aus: Sequence[int], results: dict[str, dict[str, float]]) -> list[list[str]]:
    """The field's table: a header, a row per fold, mean and standard deviation, then the
    published records of the protocol (their mean F1 only). F1 in %."""
    names = [au_column_name(a) for a in aus]
    field = [a for a in PROTOCOL_AUS.get(protocol, aus) if a in aus]
    field_col = len(field) != len(aus)
    header = ["", *names, "mean F1", *(["mean F1 (field's AUs)"] if field_col else []), "micro-F1"]
    rows = [header]
    per_fold = []
    for key, m in results.items():
        values = [m.get(f"test/f1/{n}", float("nan")) for n in names]
        mean = float(np.nanmean(values)) if any(math.isfinite(v) for v in values) else float("nan")
        field_mean = float(np.nanmean([m.get(f"test/f1/{au_column_name(a)}", float("nan")) for a in field]))
        line = [*values, mean, *([field_mean] if field_col else []), m.get("test/f1_micro", float("nan"))]
        per_fold.append(line)
        rows.append([key, *map(_percent, line)])
    if per_fold:
        table = np.array(per_fold, dtype=float)
        with warnings.catch_warnings():  # an AU without test positives in any fold: an empty cell
            warnings.simplefilter("ignore", RuntimeWarning)
            rows.append(["mean", *map(_percent, np.nanmean(table, 0))])
            rows.append(["std", *map(_percent, np.nanstd(table, 0, ddof=1) if len(table) > 1 else table[0] * np.nan)])
    for record in RECORDS.get(protocol, ()):  # a record's mean is over the field's AUs
        means = ["", f"{record.f1:.1f}"] if field_col else [f"{record.f1:.1f}"]
        rows.append([record.method, *[""] * len(names), *means, ""])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def table_png(rows: list[list[str]], path: Path, title: str) -> None:
    """The table as a picture, for the MLflow UI's artifact view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6.0, 0.75 * len(rows[0]) + 1.5)
    fig, ax = plt.subplots(figsize=(width, 0.4 * len(rows) + 0.8))
    ax.axis("off")
    table = ax.table(cellText=[r[1:] for r in rows[1:]], rowLabels=[r[0] for r in rows[1:]], colLabels=rows[0][1:],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=160)
    plt.close(fig)


def _rank_zero() -> bool:
    """Whether this process writes (the first of a DDP job Lightning or torchrun started)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise FoldError(f"{path}: not the state of a cross-validation ({e}); move it away to start again") from None


def _resume_checkpoint(folder: Path) -> str | None:
    """The checkpoint a fold cut short goes on from: its ``last.ckpt``, or the newest readable
    full-state checkpoint beside it when that one is damaged."""
    from callbacks.tracking.mlflow_run import run_id_from_checkpoint
    from experiments.lightning_cli import TrackedCLI
    from lightning_modules.checkpoints import CheckpointError

    last = folder / "last.ckpt"
    if last.is_file():
        try:
            run_id_from_checkpoint(last)
            return str(last)
        except CheckpointError:
            pass
    fallback = TrackedCLI.fallback_checkpoint(folder) if folder.is_dir() else None
    return str(fallback[0]) if fallback else None


def crossval(
    manifest: str,
    fit_config: str = "experiments/configs/demo.yaml",
    protocol: str = "bp4d-3fold",
    k: int = 3,
    repeats: int = 1,
    seed: int = 0,
    validation_fraction: float = 0.2,
    name: str | None = None,
    out: str = "runs/crossval",
    fit_overrides: dict[str, Any] | None = None,
    mlflow: str = "mlflow.yaml",
) -> dict[str, Any]:
    """Subject-exclusive k-fold: a fit and test per fold, one MLflow parent run with the field's table.

    Args:
        manifest: a manifest with a ``subject`` column (``au-detect import`` writes one).
        fit_config: the fit config of every fold (its ``data.aus`` are the AUs; its data manifests,
            run name and checkpoint folder are set per fold).
        protocol: ``bp4d-3fold``, ``disfa-3fold`` (the published partitions), ``affwild2-abaw``
            (train on the challenge's Train_Set, test on its Validation_Set) or ``random``.
        k: folds of ``random``.
        repeats: times ``random`` reshuffles its folds (the spread between repeats is reported).
        seed: seed of the random folds and of the validation subjects drawn from each fold's
            training subjects.
        validation_fraction: share of each fold's training subjects held out for validation.
        name: the cross-validation's name (parent run, folder under ``out``); default
            ``<manifest stem>-<protocol>``.
        out: where each fold's manifests, checkpoints and the state of a resumable run go.
        fit_overrides: dotted keys changed in the fit config (e.g. ``trainer.max_epochs``).
        mlflow: MLflow settings file.
    """
    overrides = dict(fit_overrides or {})
    bad = sorted(k_ for k_ in overrides if k_ in RESERVED)
    if bad:
        raise ValueError(f"fit_overrides: {', '.join(bad)} are set by crossval for each fold")
    name = name or f"{Path(manifest).stem}-{protocol}"
    folder = Path(out) / name
    base = with_overrides(fit_config, overrides)
    aus = tuple((base.get("data") or {}).get("aus") or ())
    if not aus:
        raise ValueError(f"{fit_config}: set data.aus to the manifest's AUs (e.g. BP4D's 12)")
    table = read_manifest(manifest, aus=aus)  # every label checked before any fit
    if SUBJECT_COLUMN not in table.extra:
        raise ManifestError(f"{manifest}: no {SUBJECT_COLUMN!r} column, so folds cannot keep subjects apart "
                            f"(au-detect import writes one)")
    subjects = table.extra[SUBJECT_COLUMN]
    plan = plan_folds(protocol, subjects, k, repeats, seed, table.extra.get("split"))
    by_repeat: dict[int, list[Fold]] = {}
    for r, fold in plan:
        by_repeat.setdefault(r, []).append(fold)
    for r, folds in by_repeat.items():  # every frame tested exactly once per repeat (the challenge's
        if protocol != "affwild2-abaw":  # split tests its validation subjects only)
            fold_of_rows(subjects, folds, where=str(manifest))
    image_root = str(Path(manifest).resolve().parent)
    image_subject = dict(zip(table.images, subjects))  # as written: what crop caches record

    writer = _rank_zero()
    state_path = folder / STATE_NAME
    state = _read_state(state_path)
    settings = {"manifest": str(Path(manifest).resolve()), "protocol": protocol, "k": k, "repeats": repeats,
                "seed": seed, "validation_fraction": validation_fraction, "fit_config": str(fit_config),
                "aus": list(aus)}
    if state and state.get("settings") != settings:
        raise FoldError(f"{state_path} is a cross-validation with other settings ({state.get('settings')}); "
                        f"give another --name or --out, or move it away")
    tracking = TrackingSettings.read(mlflow)
    client = open_client(tracking.tracking_uri) if writer else None
    parent = state.get("parent")
    if writer:
        experiment = tracking.experiment_id(client)
        if parent is None:
            parent = client.create_run(experiment, run_name=f"crossval {name}", tags={
                **tracking.tags, "crossval": name, "crossval.protocol": protocol, STAGE_TAG: "crossval",
                COMMAND_TAG: "crossval"}).info.run_id
            for key, value in settings.items():
                client.log_param(parent, key, json.dumps(value) if isinstance(value, list) else value)
        else:
            client.update_run(parent, status="RUNNING")
        state = {"settings": settings, "parent": parent, "folds": state.get("folds", {})}
        files.write_text(state_path, json.dumps(state, indent=2))
        print(f"[crossval] '{name}': {len(plan)} folds ({protocol}), MLflow parent run {parent} in "
              f"'{tracking.experiment_name}' at {tracking.tracking_uri}")
    done: dict[str, dict] = dict(state.get("folds", {}))
    start = time.perf_counter()
    try:
        for r, fold in plan:
            key = fold_key(r, fold, repeats)
            if key in done:
                continue
            train, val = fold.validation(validation_fraction, seed)
            fold_dir = folder / key
            manifests = split_manifest(manifest, fold_dir, {"train": set(train), "val": set(val), "test": set(fold.test)})
            config = with_overrides(fit_config, {
                **overrides,
                "data.train_manifest": str(manifests["train"]), "data.val_manifest": str(manifests["val"]),
                "data.test_manifest": str(manifests["test"]), "data.image_root": image_root,
                "trainer.default_root_dir": str(fold_dir), "checkpoint.dirpath": str(fold_dir / "checkpoints"),
                "mlflow": mlflow, "run_name": f"{name} {key}",
                "tags": {"mlflow.parentRunId": parent, "crossval": name, "crossval.fold": str(fold.number),
                         "crossval.repeat": str(r + 1), STAGE_TAG: "crossval-fold"}})
            resume = _resume_checkpoint(fold_dir / "checkpoints")
            if resume:
                config["ckpt_path"] = resume
            if writer:
                print(f"[crossval] {key}: train {len(train)} subjects, validation {len(val)}, test {len(fold.test)}"
                      + (f"; resuming from {resume}" if resume else ""))
            result = fit_and_test(config)
            record = {"run_id": result["run_id"], "repeat": r + 1, "fold": fold.number,
                      "subjects": {"train": list(train), "val": list(val), "test": list(fold.test)},
                      "manifests": {s: str(p) for s, p in manifests.items()},
                      "caches": result.get("caches", {}),
                      "metrics": {k_: v for k_, v in result["metrics"].items() if k_.startswith("test/")}}
            leaks = leaked_subjects(record, image_subject)
            if any(leaks.values()):  # cannot happen by construction; a fit that read them is not a result
                raise FoldError(f"{key}: test subjects read in training: {leaks}")
            done[key] = record
            if writer:
                state["folds"] = done
                files.write_text(state_path, json.dumps(state, indent=2))
                m = record["metrics"]
                print(f"[crossval] {key}: test F1 {m.get('test/f1', float('nan')):.3f}, "
                      f"micro-F1 {m.get('test/f1_micro', float('nan')):.3f} (run {record['run_id']})")
        summary = summarize(done, aus, protocol)
        if writer:
            _log_parent(client, parent, done, summary, aus, protocol, folder, name)
            client.set_terminated(parent)
    except BaseException:
        if writer and parent is not None:
            client.set_terminated(parent, "KILLED" if sys.exc_info()[0] in (KeyboardInterrupt, SystemExit) else "FAILED")
        raise
    if writer:
        print(f"\n[crossval] {name}: {len(done)} folds in {(time.perf_counter() - start) / 60:.1f} min this time\n")
        print(markdown(fold_table(protocol, aus, {k_: v["metrics"] for k_, v in done.items()})))
        def spread(key: str) -> str:  # one fold has no standard deviation
            sd = summary[f"{key}_std"]
            return f"{100 * summary[key]:.1f}" + (f" ± {100 * sd:.1f}" if math.isfinite(sd) else "")

        print(f"[crossval] mean F1 {spread('test/f1')}, micro-F1 {spread('test/f1_micro')}; "
              f"parent run {parent}: {tracking.ui_url(tracking.experiment_id(client), parent)}")
    return {"parent": parent, "folds": done, "summary": summary}


def summarize(done: dict[str, dict], aus: Sequence[int], protocol: str) -> dict[str, float]:
    """Mean and standard deviation over folds (sample sd, ddof 1) of F1, micro-F1 and each AU's F1;
    with repeats, the spread of the repeats' mean F1."""
    out: dict[str, float] = {}

    def stats(key: str, values: list[float]) -> None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        out[key] = float(np.mean(values)) if values else float("nan")
        std_key = key.replace("test/f1", "test/f1_std", 1) if "/AU" in key else f"{key}_std"
        out[std_key] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    metrics = [d["metrics"] for d in done.values()]
    for key in ("test/f1", "test/f1_micro", "test/f1_default", "test/accuracy", "test/intensity_icc",
                "test/intensity_pcc", "test/intensity_mae"):  # intensity: with an intensity head (DISFA)
        if key.startswith("test/f1") or key.startswith("test/acc") or any(key in m for m in metrics):
            stats(key, [m.get(key, float("nan")) for m in metrics])
    field = PROTOCOL_AUS.get(protocol)
    if field and set(field) != set(aus):
        stats("test/f1_field", [float(np.nanmean([m.get(f"test/f1/{au_column_name(a)}", float("nan"))
                                                  for a in field if a in aus])) for m in metrics])
    for a in aus:
        stats(f"test/f1/{au_column_name(a)}", [m.get(f"test/f1/{au_column_name(a)}", float("nan")) for m in metrics])
    repeats: dict[int, list[float]] = {}
    for d in done.values():
        repeats.setdefault(d["repeat"], []).append(d["metrics"].get("test/f1", float("nan")))
    if len(repeats) > 1:
        means = [float(np.nanmean(v)) for _, v in sorted(repeats.items())]
        out["repeats/test/f1_std"] = float(np.std(means, ddof=1))
        out["repeats/test/f1_range"] = float(max(means) - min(means))
    return out


def _log_parent(client, parent: str, done: dict[str, dict], summary: dict[str, float], aus: Sequence[int],
                protocol: str, folder: Path, name: str) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in summary.items() if math.isfinite(v)]
    for step, (key, d) in enumerate(done.items(), start=1):
        for k_, v in d["metrics"].items():
            if k_.startswith(("test/f1", "test/accuracy", "test/intensity")) and math.isfinite(v):
                metrics.append(Metric(f"fold/{k_}", v, now, step))
    repeats: dict[int, list[float]] = {}
    for d in done.values():
        repeats.setdefault(d["repeat"], []).append(d["metrics"].get("test/f1", float("nan")))
    if len(repeats) > 1:
        metrics += [Metric("repeats/test/f1", float(np.nanmean(v)), now, r) for r, v in sorted(repeats.items())]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(parent, metrics=metrics[i:i + 1000])
    rows = fold_table(protocol, aus, {k_: v["metrics"] for k_, v in done.items()})
    artifacts = folder / "parent"
    artifacts.mkdir(parents=True, exist_ok=True)
    files.write_text(artifacts / "crossval_table.md", markdown(rows))
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    files.write_text(artifacts / "crossval_table.csv", text.getvalue())
    table_png(rows, artifacts / "crossval_table.png", f"{name}: test F1 (%) per fold, {protocol}")
    folds = {k_: {"run_id": d["run_id"], **d["subjects"]} for k_, d in done.items()}
    files.write_text(artifacts / "folds.json", json.dumps(folds, indent=2))
    records = {r.method: asdict(r) for r in RECORDS.get(protocol, ())}
    files.write_text(artifacts / "published_records.json", json.dumps(records, indent=2))
    client.log_artifacts(parent, str(artifacts))
    client.set_tag(parent, "mlflow.note.content", markdown(rows))
