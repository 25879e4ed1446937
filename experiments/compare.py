"""``au-detect compare``: runs side by side, AU by AU, from the ``au_report.csv`` each fit logs.

    au-detect compare --runs <run id> <run id> ...                    # the first is the baseline
    au-detect compare --filter "tags.ablation = 'table2-demo' and tags.\\`ablation.role\\` = 'row'"
    au-detect compare --filter "tags.\\`ablation.row\\` IN ('align', 'balanced')" --baseline <run id or name>

Every fit logs ``au_report.csv`` (:mod:`callbacks.au_report`): per AU the validation support,
positives, the fitted threshold and F1 at 0.5 and at that threshold, for the best epoch. This
command reads it from each run and writes, per AU, the support and positive share, and for every
run its F1 at its fitted thresholds and the threshold, with each run's change of F1 against the
baseline: ``au_comparison.csv``, ``au_comparison.md`` and the heat map ``au_comparison.png``
(AUs x runs, F1 annotated; beside it the change against the baseline). Runs trained with an
intensity head report ICC(3,1) per AU too (``icc``): the table then also holds each run's ICC
and its change against the baseline, and the heat map an ICC panel. Runs are labelled by their
run names. The files are also logged to a new MLflow run in the same experiment, tagged
``au_detect.command = compare``, with the compared run ids in the tag ``au_detect.compared_runs``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from experiments.tracking import TrackingSettings, open_client

REPORT = "au_report.csv"
COMMAND_TAG, RUNS_TAG, BASELINE_TAG = "au_detect.command", "au_detect.compared_runs", "au_detect.baseline"
FILES = {"csv": "au_comparison.csv", "md": "au_comparison.md", "png": "au_comparison.png",
         "runs": "compared_runs.json"}
NEEDED = ("AU", "support", "positives", "threshold", "f1@fitted")


class CompareError(SystemExit):
    """A one-line reason why the comparison cannot be made (the command's exit message)."""


@dataclass
class Report:
    """One run's ``au_report.csv``: per AU (``mean`` last) its numbers, as floats (None when empty)."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)
    label: str = ""

    @property
    def aus(self) -> list[str]:
        return [au for au in self.rows if au != "mean"]


def parse_report(text: str) -> dict[str, dict[str, float | None]]:
    """``au_report.csv``'s rows by AU (``AU12``, ..., ``mean``)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{REPORT} has no column {', '.join(missing)} (columns: {reader.fieldnames})")
    rows = {}
    for row in reader:
        # numbers only: text columns (threshold_from: fitted, or why it fell back) are for people
        rows[row["AU"]] = {k: (float(v) if v not in ("", None) else None) for k, v in row.items()
                           if k not in ("AU", "threshold_from")}
    if not rows:
        raise ValueError(f"{REPORT} has no rows")
    return rows


def compare(runs: list[str] | None = None, filter: str | None = None, experiment: str | None = None,
            baseline: str | None = None, order: Literal["rarity", "support", "au"] = "rarity",
            out: str = "comparison", run_name: str | None = None, log: bool = True,
            mlflow: str = "mlflow.yaml") -> dict:
    """Compare runs AU by AU: F1 at their fitted thresholds, the thresholds, and the change against a baseline.

    Reads each run's ``au_report.csv`` (the validation of its best epoch), writes
    ``au_comparison.csv``, ``.md`` and ``.png`` (heat map) into ``--out`` and logs them to a new
    MLflow run in the same experiment (tag ``au_detect.command = compare``). A run without
    ``au_report.csv`` (a pretraining run, an ablation's summary, a fit killed before its first
    validation) is named and skipped.

    The runs of an ablation (``au-detect ablation``; ``experiments/configs/ablation_demo.yaml`` names it
    ``table2-demo``) are tagged ``ablation`` (its name), ``ablation.role`` (``row``, ``pretrain``,
    ``summary``), ``ablation.row`` and ``ablation.seed``; its finished rows at seed 0::

        au-detect compare --filter "tags.ablation = 'table2-demo' and tags.\\`ablation.role\\` = 'row' \\
            and tags.\\`ablation.seed\\` = '0' and attributes.status = 'FINISHED'"

    Args:
        runs: run ids, in the order of the table's columns; the first is the baseline.
        filter: instead of ``runs``: an MLflow search filter over the runs of ``experiment``, oldest
            run first (e.g. tags.ablation = 'table2-demo'; tag names with a dot go in backquotes:
            tags.`ablation.role` = 'row'; attributes.status = 'FINISHED' leaves out failed and
            unfinished runs).
        experiment: the experiment ``filter`` searches (default: the settings' ``experiment_name``);
            the comparison run is logged there too.
        baseline: the run the others are compared with: a run id or run name among those compared
            (default: the first).
        order: the AUs' order: ``rarity`` (smallest positive share first, in the baseline's
            report), ``support`` (most labelled samples first) or ``au`` (the report's order).
        out: folder for the files.
        run_name: name of the comparison run (default: ``compare <n> runs``).
        log: log the comparison to MLflow (``false``: the files only).
        mlflow: MLflow settings file: the tracking store, and the experiment and tags.
    """
    try:
        settings = TrackingSettings.read(mlflow)
    except (FileNotFoundError, ValueError) as e:
        raise CompareError(f"au-detect compare: {e}") from None
    client = open_client(settings.tracking_uri)
    found, experiment_id = _select(client, settings, runs, filter, experiment)
    reports, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for run in found:
            reason = None
            if REPORT not in {a.path for a in client.list_artifacts(run.info.run_id)}:
                reason = f"it has no {REPORT} (not a fit, or killed before its first validation)"
            else:
                try:
                    path = client.download_artifacts(run.info.run_id, REPORT, tmp)
                    rows = parse_report(Path(path).read_text())
                except (ValueError, OSError, MlflowException) as e:
                    reason = f"its {REPORT} could not be read: {e}"
            if reason:
                skipped.append({"run_id": run.info.run_id, "name": run.info.run_name, "reason": reason})
                print(f"Skipped run {run.info.run_id} ({run.info.run_name}): {reason}")
                continue
            reports.append(Report(run.info.run_id, run.info.run_name or "", run.info.experiment_id, run.info.status,
                                  rows))
    if not reports:
        raise CompareError(f"au-detect compare: none of the {len(found)} runs has an {REPORT}: nothing to compare")
    reports = _with_baseline(reports, baseline)
    _label(reports)
    table = build_table(reports, order)
    mismatched = [r["AU"] for r in table if r["support_differs"]]
    if mismatched:
        print(f"Note: the runs' support differs for {', '.join(mismatched)} (validated on different data?); "
              f"the support column is the baseline's")

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {k: folder / v for k, v in FILES.items()}
    files["csv"].write_text(table_csv(table, reports), newline="")
    files["md"].write_text(table_markdown(table, reports, skipped))
    fig = heat_map(table, reports, order)
    fig.savefig(files["png"], dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    files["runs"].write_text(json.dumps({"baseline": reports[0].run_id, "filter": filter, "order": order,
                                         "runs": [{"run_id": r.run_id, "name": r.name, "label": r.label,
                                                   "experiment_id": r.experiment_id, "status": r.status}
                                                  for r in reports], "skipped": skipped}, indent=1))
    means = {r.run_id: (r.rows.get("mean") or {}).get("f1@fitted") for r in reports}
    base = means[reports[0].run_id]
    print(f"\nF1 at fitted thresholds, mean over AUs (validation, best epoch); baseline {reports[0].label}:")
    for r in reports:
        change = "" if r is reports[0] or means[r.run_id] is None or base is None else \
            f"  ({means[r.run_id] - base:+.4f})"
        print(f"  {r.label}: {_fmt(means[r.run_id])}{change}")

    comparison_run = None
    if log:
        ids = [r.run_id for r in reports]
        comparison = client.create_run(
            experiment_id, run_name=run_name or f"compare {len(reports)} runs",
            tags={**settings.tags, COMMAND_TAG: "compare", RUNS_TAG: ",".join(ids), BASELINE_TAG: ids[0]})
        comparison_run = comparison.info.run_id
        client.log_param(comparison_run, "baseline", ids[0])
        client.log_param(comparison_run, "runs", len(ids))
        client.log_param(comparison_run, "order", order)
        if filter:
            client.log_param(comparison_run, "filter", filter[:6000])
        for path in files.values():
            client.log_artifact(comparison_run, str(path))
        client.set_terminated(comparison_run)
    print(f"\nWritten: {', '.join(str(p) for p in files.values())}")
    if comparison_run:
        print(f"MLflow comparison run {comparison_run} (experiment {experiment_id} at {settings.tracking_uri})")
    return {"run_id": comparison_run, "files": {k: str(v) for k, v in files.items()},
            "runs": [r.run_id for r in reports], "labels": [r.label for r in reports], "skipped": skipped,
            "table": table}


@contextmanager
def _quiet_downloads():
    """No progress bar per downloaded report (one line each for dozens of runs)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _select(client: MlflowClient, settings: TrackingSettings, runs: list[str] | None, filter: str | None,
            experiment: str | None) -> tuple[list, str]:
    """The runs to compare, in order, and the experiment the comparison run goes to."""
    where = settings.tracking_uri
    if runs and filter:
        raise CompareError("au-detect compare: give --runs or --filter, not both")
    if not runs and not filter:
        raise CompareError("au-detect compare: say which runs: --runs <run id> ... or --filter \"<MLflow filter>\"")
    if runs:
        found = []
        for run_id in dict.fromkeys(runs):
            try:
                found.append(client.get_run(run_id))
            except MlflowException:
                raise CompareError(f"au-detect compare: no run {run_id} at {where}") from None
        if experiment:
            return found, _experiment_id(client, experiment, where)
        return found, found[0].info.experiment_id
    name = experiment or settings.experiment_name
    experiment_id = _experiment_id(client, name, where)
    found, token = [], None
    try:
        while True:
            page = client.search_runs([experiment_id], filter, order_by=["attributes.start_time ASC"],
                                      max_results=1000, page_token=token)
            found += [r for r in page if r.data.tags.get(COMMAND_TAG) != "compare"]  # not earlier comparisons
            token = page.token
            if not token:
                break
    except MlflowException as e:
        raise CompareError(f"au-detect compare: filter {filter!r}: {str(e).splitlines()[0]}") from None
    if not found:
        raise CompareError(f"au-detect compare: no run of experiment {name!r} at {where} matches {filter!r}")
    return found, experiment_id


def _experiment_id(client: MlflowClient, name: str, where: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        raise CompareError(f"au-detect compare: no experiment {name!r} at {where}")
    return found.experiment_id


def _with_baseline(reports: list[Report], baseline: str | None) -> list[Report]:
    if baseline is None:
        return reports
    matches = [r for r in reports if baseline in (r.run_id, r.name)]
    if not matches:
        raise CompareError(f"au-detect compare: baseline {baseline!r} is not among the compared runs (with a report)")
    if len(matches) > 1:
        raise CompareError(f"au-detect compare: baseline {baseline!r} names {len(matches)} runs; give its run id")
    return [matches[0], *[r for r in reports if r is not matches[0]]]


def _label(reports: list[Report]) -> None:
    """Run names, with the start of the run id where names repeat (or are empty)."""
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in reports:
        r.label = r.name if r.name and counts[r.name] == 1 else f"{r.name or 'run'} ({r.run_id[:8]})"


def build_table(reports: list[Report], order: str = "rarity") -> list[dict]:
    """One row per AU (the baseline's AUs first, then any only other runs have), ``mean`` last:
    support, positives and positive share (the baseline's, or the first run that has the AU),
    then per run ``f1``, ``threshold``, ``diff`` (F1 minus the baseline's), ``icc`` (None for a
    run without an intensity head, or an AU without labelled levels) and ``icc_diff``, keyed by run id."""
    aus = list(dict.fromkeys(au for r in reports for au in r.aus))
    base = reports[0]
    rows = []
    for au in [*aus, "mean"]:
        first = next((r.rows[au] for r in reports if au in r.rows), {})
        support, positives = first.get("support"), first.get("positives")
        supports = {r.rows[au].get("support") for r in reports if au in r.rows}
        row = {"AU": au, "support": _int(support), "positives": _int(positives),
               "positive_share": round(positives / support, 4) if support and positives is not None else None,
               "support_differs": au != "mean" and len(supports) > 1, "f1": {}, "threshold": {}, "diff": {},
               "icc": {}, "icc_diff": {}}
        base_f1, base_icc = (base.rows.get(au, {}).get(k) for k in ("f1@fitted", "icc"))
        for r in reports:
            values = r.rows.get(au, {})
            f1, icc = values.get("f1@fitted"), values.get("icc")
            row["f1"][r.run_id], row["icc"][r.run_id] = f1, icc
            row["threshold"][r.run_id] = values.get("threshold")
            if r is not base:
                row["diff"][r.run_id] = None if f1 is None or base_f1 is None else round(f1 - base_f1, 4)
                row["icc_diff"][r.run_id] = None if icc is None or base_icc is None else round(icc - base_icc, 4)
        rows.append(row)
    body, mean = rows[:-1], rows[-1]
    if order == "rarity":
        body.sort(key=lambda r: (r["positive_share"] is None, r["positive_share"] or 0.0))
    elif order == "support":
        body.sort(key=lambda r: (r["support"] is None, -(r["support"] or 0)))
    elif order != "au":
        raise CompareError(f"au-detect compare: order {order!r}: expected rarity, support or au")
    return [*body, mean]


def with_icc(table: list[dict], reports: list[Report]) -> list[Report]:
    """The runs that report an ICC for some AU (trained with an intensity head), in table order."""
    return [r for r in reports if any(row["icc"][r.run_id] is not None for row in table)]


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _csv_value(value) -> str:
    return "" if value is None else str(value)


def table_csv(table: list[dict], reports: list[Report]) -> str:
    """Columns: AU, support, positives, positive_share, then per run ``<label>: f1``,
    ``<label>: threshold`` and (not for the baseline) ``<label>: f1 - baseline``; then, when some
    run has an intensity head, per such run ``<label>: icc`` and ``<label>: icc - baseline``
    (when the baseline has one too)."""
    intensity = with_icc(table, reports)
    base_icc = bool(intensity) and intensity[0] is reports[0]
    header = ["AU", "support", "positives", "positive_share"]
    for r in reports:
        header += [f"{r.label}: f1", f"{r.label}: threshold"]
    header += [f"{r.label}: f1 - baseline" for r in reports[1:]]
    header += [f"{r.label}: icc" for r in intensity]
    header += [f"{r.label}: icc - baseline" for r in intensity if base_icc and r is not reports[0]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table:
        line = [row["AU"], row["support"], row["positives"], row["positive_share"]]
        for r in reports:
            line += [row["f1"][r.run_id], row["threshold"][r.run_id]]
        line += [row["diff"][r.run_id] for r in reports[1:]]
        line += [row["icc"][r.run_id] for r in intensity]
        line += [row["icc_diff"][r.run_id] for r in intensity if base_icc and r is not reports[0]]
        writer.writerow([_csv_value(v) for v in line])
    return buffer.getvalue()


def table_markdown(table: list[dict], reports: list[Report], skipped: list[dict] = ()) -> str:
    """The table for people: per run "F1 (threshold)", then the change of F1 against the baseline."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# F1 per AU at each run's fitted thresholds (validation, best epoch)", "",
             f"Baseline: **{cell(reports[0].label)}**. Cells: F1 (threshold); Δ: F1 minus the baseline's.", ""]
    header = ["AU", "support", "positives", *[cell(r.label) for r in reports],
              *[f"Δ {cell(r.label)}" for r in reports[1:]]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [f"**{row['AU']}**" if row["AU"] == "mean" else row["AU"], _csv_value(row["support"]),
                 _csv_value(row["positives"])]
        for r in reports:
            f1, threshold = row["f1"][r.run_id], row["threshold"][r.run_id]
            cells.append(_fmt(f1) + (f" ({threshold:.4f})" if threshold is not None else "") if f1 is not None
                         else "–")
        cells += [_fmt(row["diff"][r.run_id], signed=True) or "–" for r in reports[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    intensity = with_icc(table, reports)
    if intensity:
        base_icc = intensity[0] is reports[0]
        others = [r for r in intensity if base_icc and r is not reports[0]]
        lines += ["", "## ICC(3,1) of the intensities per AU (runs with an intensity head)", "",
                  "Cells: ICC(3,1) of the reported intensity against the labelled FACS level (0-5)"
                  + ("; Δ: minus the baseline's." if others else "."), ""]
        header = ["AU", *[cell(r.label) for r in intensity], *[f"Δ {cell(r.label)}" for r in others]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table:
            cells = [f"**{row['AU']}**" if row["AU"] == "mean" else row["AU"]]
            cells += [_fmt(row["icc"][r.run_id]) or "–" for r in intensity]
            cells += [_fmt(row["icc_diff"][r.run_id], signed=True) or "–" for r in others]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Runs:", ""]
    lines += [f"- {cell(r.label)}: `{r.run_id}` ({r.status.lower()})" for r in reports]
    if skipped:
        lines += ["", f"Skipped (no {REPORT}):", ""]
        lines += [f"- {s['name']}: `{s['run_id']}`: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def heat_map(table: list[dict], reports: list[Report], order: str = "rarity"):
    """AUs x runs, F1 at the fitted thresholds annotated; beside it, the change against the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.label for r in reports]
    rows = ["mean" if row["AU"] == "mean" else
            f"{row['AU']}  ({'?' if row['positive_share'] is None else format(row['positive_share'], '.2f')}, "
            f"n={'?' if row['support'] is None else row['support']})" for row in table]
    f1 = np.array([[np.nan if row["f1"][r.run_id] is None else row["f1"][r.run_id] for r in reports]
                   for row in table], float)
    diff = np.array([[np.nan if row["diff"][r.run_id] is None else row["diff"][r.run_id] for r in reports[1:]]
                     for row in table], float).reshape(len(table), len(reports) - 1)
    intensity = with_icc(table, reports)
    icc = np.array([[np.nan if row["icc"][r.run_id] is None else row["icc"][r.run_id] for r in intensity]
                    for row in table], float).reshape(len(table), len(intensity))
    n_runs, n_diff, n_icc = len(reports), len(reports) - 1, len(intensity)
    n_cells = n_runs + n_diff + n_icc
    cell_w = 0.62 if n_cells <= 24 else 0.45
    font = 7 if n_cells <= 24 else 5
    width = 3.2 + cell_w * n_cells + (1.2 if n_diff else 0) + (1.2 if n_icc else 0)
    height = 2.2 + 0.28 * len(table) + 0.06 * max(len(s) for s in labels)
    ratios = [n_runs] + ([n_diff] if n_diff else []) + ([n_icc] if n_icc else [])
    fig, axes = plt.subplots(1, len(ratios), figsize=(width, height), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    panels = [(axes[0][0], f1, labels, plt.get_cmap("viridis").with_extremes(bad="#dddddd"), 0.0, 1.0,
               "F1 at fitted thresholds", False)]
    if n_diff:
        span = max(0.05, float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.05)
        panels.append((axes[0][1], diff, labels[1:], plt.get_cmap("RdBu").with_extremes(bad="#dddddd"), -span, span,
                       f"F1 minus baseline ({reports[0].label})", True))
    if n_icc:
        panels.append((axes[0][-1], icc, [r.label for r in intensity],
                       plt.get_cmap("magma").with_extremes(bad="#dddddd"), 0.0, 1.0, "ICC(3,1) of intensities", False))
    for ax, values, columns, cmap, low, high, title, signed in panels:
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=font + 1)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=font + 1)
        ax.axhline(len(rows) - 1.5, color="white", linewidth=2)  # the mean row apart
        ax.set_title(title, fontsize=font + 3)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                if np.isfinite(v):
                    shade = (v - low) / (high - low) if high > low else 0.5
                    dark = shade < 0.55 if not signed else abs(v) > 0.6 * high
                    ax.text(j, i, f"{v:+.2f}" if signed else f"{v:.2f}", ha="center", va="center", fontsize=font,
                            color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.04 if len(columns) > 3 else 0.12, pad=0.02)
    by = {"rarity": "rarest first", "support": "most labelled first", "au": "in the report's order"}[order]
    fig.suptitle(f"Validation F1 per AU (rows: AU (positive share, support), {by})", fontsize=font + 4)
    fig.tight_layout()
    return fig
