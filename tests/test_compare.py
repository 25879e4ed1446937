"""``au-detect compare``: runs made by hand in a SQLite store, each with an ``au_report.csv`` written
by :func:`callbacks.au_report.as_csv` from made-up scores; the table must hold exactly those numbers."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from callbacks.au_report import as_csv, au_report
from experiments.cli import main
from experiments.compare import COMMAND_TAG, RUNS_TAG, CompareError, compare
from experiments.tracking import TrackingSettings

from .training_helpers import write_mlflow_yaml

AUS = (1, 2, 4, 12, 25)
SUPPORT = [40, 40, 38, 40, 40]
POSITIVES = [10, 2, 19, 30, 6]  # shares .25, .05, .5, .75, .15: rarest first is AU2, AU25, AU1, AU4, AU12


def report_rows(seed: int, nan_au: int | None = None) -> list[dict]:
    """``au_report`` of made-up scores (what the soft-threshold callback would hand it)."""
    return au_report(AUS, *report_scores(seed, nan_au))


def report_scores(seed: int, nan_au: int | None = None) -> tuple[dict, dict, np.ndarray]:
    """Made-up scores at 0.5 and at the fitted thresholds, and the thresholds."""
    rng = np.random.default_rng(seed)
    f1 = rng.uniform(0.1, 0.9, len(AUS))
    if nan_au is not None:
        f1[AUS.index(nan_au)] = np.nan  # an AU the run could not score
    accuracy = rng.uniform(0.5, 0.99, len(AUS))
    fitted = {"support": SUPPORT, "positives": POSITIVES, "f1": f1, "accuracy": accuracy,
              "mean_f1": float(np.nanmean(f1)), "mean_accuracy": float(accuracy.mean())}
    default = {**fitted, "f1": f1 * 0.9, "mean_f1": float(np.nanmean(f1 * 0.9))}
    return default, fitted, rng.uniform(0.2, 0.8, len(AUS))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four runs: two with reports (one tagged group=a), one tagged group=a without a report, and a
    third report tagged group=a. One store for the module (a new SQLite store takes seconds); the
    tests add runs that the others' selections leave out."""
    tmp_path = tmp_path_factory.mktemp("compare")
    settings_file = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path}/mlflow.db", "compare-test")
    settings = TrackingSettings.read(settings_file)
    client = MlflowClient(settings.tracking_uri)
    experiment_id = settings.experiment_id(client)
    runs, reports = {}, {}
    for name, seed, group, nan_au in (("baseline", 0, "a", None), ("other", 1, "b", 4), ("pretrain", None, "a", None),
                                      ("third", 2, "a", None)):
        run = client.create_run(experiment_id, run_name=name, tags={"group": group})
        runs[name] = run.info.run_id
        if seed is not None:
            reports[name] = report_rows(seed, nan_au)
            client.log_text(run.info.run_id, as_csv(reports[name]), "au_report.csv")
        client.set_terminated(run.info.run_id)
    return {"yaml": str(settings_file), "client": client, "runs": runs, "reports": reports,
            "experiment_id": experiment_id}


def by_au(rows: list[dict]) -> dict[str, dict]:
    return {r["AU"]: r for r in rows}


def read_csv(path: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def num(text: str) -> float | None:
    return None if text == "" else float(text)


def test_runs_side_by_side_exactly_as_reported(store, tmp_path, capsys):
    runs, reports = store["runs"], store["reports"]
    out = tmp_path / "out"
    main(["compare", "--runs", runs["baseline"], runs["other"], runs["pretrain"], "--out", str(out),
          "--run_name", "first comparison", "--mlflow", store["yaml"]])
    printed = capsys.readouterr().out
    assert f"Skipped run {runs['pretrain']} (pretrain): it has no au_report.csv" in printed
    table = read_csv(out / "au_comparison.csv")
    base, other = by_au(reports["baseline"]), by_au(reports["other"])
    assert [r["AU"] for r in table] == ["AU2", "AU25", "AU1", "AU4", "AU12", "mean"]  # rarest first, mean last
    assert list(table[0]) == ["AU", "support", "positives", "positive_share", "baseline: f1", "baseline: threshold",
                              "other: f1", "other: threshold", "other: f1 - baseline"]
    for row in table:
        au = row["AU"]
        assert int(row["support"]) == base[au]["support"] and int(row["positives"]) == base[au]["positives"]
        assert num(row["baseline: f1"]) == base[au]["f1@fitted"]
        assert num(row["other: f1"]) == other[au]["f1@fitted"]
        assert num(row["baseline: threshold"]) == base[au]["threshold"]
        assert num(row["other: threshold"]) == other[au]["threshold"]
        if other[au]["f1@fitted"] is None:  # AU4: the other run could not score it
            assert au == "AU4" and row["other: f1"] == "" and row["other: f1 - baseline"] == ""
        else:
            assert num(row["other: f1 - baseline"]) == round(other[au]["f1@fitted"] - base[au]["f1@fitted"], 4)
    assert by_au(table)["AU2"]["positive_share"] == "0.05"
    markdown = (out / "au_comparison.md").read_text()
    assert "Baseline: **baseline**" in markdown and f"| AU12 | 40 | 30 | {base['AU12']['f1@fitted']:.4f} (" in markdown
    assert "pretrain" in markdown.split("Skipped")[1]
    with Image.open(out / "au_comparison.png") as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 300
    # the comparison run: tagged, in the same experiment, holding the files
    client = store["client"]
    (comparison,) = client.search_runs([store["experiment_id"]], "attributes.run_name = 'first comparison'")
    assert comparison.data.tags[COMMAND_TAG] == "compare"
    assert comparison.data.tags[RUNS_TAG] == f"{runs['baseline']},{runs['other']}"
    assert comparison.data.params["baseline"] == runs["baseline"] and comparison.info.status == "FINISHED"
    assert comparison.info.run_id in printed and str(out / "au_comparison.png") in printed
    logged = {a.path for a in client.list_artifacts(comparison.info.run_id)}
    assert logged == {"au_comparison.csv", "au_comparison.md", "au_comparison.png", "compared_runs.json"}
    copy = client.download_artifacts(comparison.info.run_id, "au_comparison.csv", str(tmp_path))
    assert Path(copy).read_text() == (out / "au_comparison.csv").read_text()


def test_filter_selects_runs_oldest_first_and_baseline_by_name(store, tmp_path, capsys):
    runs, reports = store["runs"], store["reports"]
    result = compare(filter="tags.group = 'a'", baseline="third", order="au", out=str(tmp_path / "f"),
                     mlflow=store["yaml"])
    assert result["runs"] == [runs["third"], runs["baseline"]]  # baseline first, then by start time
    assert [s["run_id"] for s in result["skipped"]] == [runs["pretrain"]]
    table = read_csv(result["files"]["csv"])
    assert [r["AU"] for r in table] == ["AU1", "AU2", "AU4", "AU12", "AU25", "mean"]
    third, base = by_au(reports["third"]), by_au(reports["baseline"])
    for row in table:
        expected = round(base[row["AU"]]["f1@fitted"] - third[row["AU"]]["f1@fitted"], 4)
        assert num(row["baseline: f1 - baseline"]) == expected
    # a second comparison over the same filter leaves the first comparison run out
    again = compare(filter="tags.group = 'a'", out=str(tmp_path / "g"), log=False, mlflow=store["yaml"])
    assert again["runs"] == [runs["baseline"], runs["third"]] and again["run_id"] is None
    # the same names twice: labelled with the start of their run ids
    client = store["client"]
    twin = client.create_run(store["experiment_id"], run_name="baseline", tags={"group": "c"})
    client.log_text(twin.info.run_id, as_csv(reports["other"]), "au_report.csv")
    both = compare(runs=[runs["baseline"], twin.info.run_id], log=False, out=str(tmp_path / "h"), mlflow=store["yaml"])
    assert both["labels"] == [f"baseline ({runs['baseline'][:8]})", f"baseline ({twin.info.run_id[:8]})"]


def test_clear_errors(store, tmp_path):
    yaml_file, runs = store["yaml"], store["runs"]
    with pytest.raises(CompareError, match="no run of experiment 'compare-test' .* matches \"tags.group = 'zzz'\""):
        compare(filter="tags.group = 'zzz'", out=str(tmp_path), mlflow=yaml_file)
    with pytest.raises(CompareError, match="no run 0123456789abcdef"):
        compare(runs=["0123456789abcdef"], out=str(tmp_path), mlflow=yaml_file)
    with pytest.raises(CompareError, match="none of the 1 runs has an au_report.csv"):
        compare(runs=[runs["pretrain"]], out=str(tmp_path), mlflow=yaml_file)
    with pytest.raises(CompareError, match="--runs <run id> ... or --filter"):
        main(["compare", "--mlflow", yaml_file])
    with pytest.raises(CompareError, match="filter 'tags.group ==== 1'"):
        compare(filter="tags.group ==== 1", out=str(tmp_path), mlflow=yaml_file)
    with pytest.raises(CompareError, match="baseline 'nobody' is not among"):
        compare(runs=[runs["baseline"], runs["other"]], baseline="nobody", out=str(tmp_path), mlflow=yaml_file)
    with pytest.raises(CompareError, match="no experiment 'elsewhere'"):
        compare(filter="tags.group = 'a'", experiment="elsewhere", out=str(tmp_path), mlflow=yaml_file)


def test_the_ablations_rows_by_the_documented_filter(store, tmp_path):
    """The filter of the command's docstring on runs tagged as ``au-detect ablation`` tags them:
    the summary run and other ablations are left out, a failed row too."""
    from experiments.ablation.store import Ablation

    client, reports = store["client"], store["reports"]
    study = Ablation("table2", TrackingSettings.read(store["yaml"]), store["yaml"])
    parent = study.summary_run()
    other = Ablation("table1", TrackingSettings.read(store["yaml"]), store["yaml"])
    made = {}
    for study_, row, seed, status, report in ((study, "align", 0, "FINISHED", "baseline"),
                                               (study, "balanced", 0, "FINISHED", "other"),
                                               (study, "balanced", 1, "FINISHED", "third"),
                                               (study, "scratch", 0, "FAILED", "third"),
                                               (other, "resnet18", 0, "FINISHED", "other")):
        tags = study_.tags(parent, "row", **{"ablation.row": row, "ablation.seed": str(seed)})
        run = client.create_run(store["experiment_id"], run_name=f"{study_.name} {row} seed{seed}", tags=tags)
        client.log_text(run.info.run_id, as_csv(reports[report]), "au_report.csv")
        client.set_terminated(run.info.run_id, status)
        made[(study_.name, row, seed)] = run.info.run_id
    result = compare(filter="tags.ablation = 'table2' and tags.`ablation.role` = 'row' and tags.`ablation.seed` = '0' "
                            "and attributes.status = 'FINISHED'", out=str(tmp_path), mlflow=store["yaml"])
    assert result["runs"] == [made[("table2", "align", 0)], made[("table2", "balanced", 0)]] and not result["skipped"]
    assert result["labels"] == ["table2 align seed0", "table2 balanced seed0"]
    client.get_run(parent)  # the summary run is untouched, and not compared
    assert parent not in result["runs"]


def test_runs_with_an_intensity_head_side_by_side_with_their_icc(store, tmp_path):
    """Two runs whose reports carry ICC (one AU without labelled levels), one without a head as
    the baseline: ICC columns for the two, their change only against a baseline that has one."""
    client = store["client"]
    rng = np.random.default_rng(7)
    runs, logged = [], {}
    for name, head in (("occurrence only", False), ("joint a", True), ("joint b", True)):
        rows = report_rows(3)
        if head:
            icc = dict(zip([f"AU{a}" for a in AUS], rng.uniform(0.1, 0.9, len(AUS)).round(4)))
            icc["AU2"] = None  # no labelled levels: empty cell
            known = [v for v in icc.values() if v is not None]
            icc["mean"] = round(float(np.mean(known)), 4)
            intensity = {au: ({} if v is None else {"icc": v, "pcc": 0.5, "mae": 0.4}) for au, v in icc.items()}
            rows = au_report(AUS, *report_scores(3), intensity=intensity)
            logged[name] = icc
        run = client.create_run(store["experiment_id"], run_name=name, tags={"group": "icc"})
        client.log_text(run.info.run_id, as_csv(rows), "au_report.csv")
        client.set_terminated(run.info.run_id)
        runs.append(run.info.run_id)
    result = compare(runs=runs, log=False, out=str(tmp_path / "a"), mlflow=store["yaml"], order="au")
    table = by_au(read_csv(result["files"]["csv"]))
    assert "occurrence only: icc" not in table["AU1"] and "joint a: icc - baseline" not in table["AU1"]
    for name, icc in logged.items():
        for au, value in icc.items():
            assert num(table[au][f"{name}: icc"]) == value
    markdown = (tmp_path / "a" / "au_comparison.md").read_text()
    assert "ICC(3,1)" in markdown and f"| AU12 | {logged['joint a']['AU12']:.4f} | {logged['joint b']['AU12']:.4f} |" \
        in markdown
    # with a joint run as the baseline, the other joint run's change in ICC
    result = compare(runs=runs[1:], log=False, out=str(tmp_path / "b"), mlflow=store["yaml"])
    table = by_au(read_csv(result["files"]["csv"]))
    assert num(table["AU12"]["joint b: icc - baseline"]) == round(logged["joint b"]["AU12"] - logged["joint a"]["AU12"], 4)
    assert table["AU2"]["joint b: icc - baseline"] == ""
    with Image.open(tmp_path / "b" / "au_comparison.png") as png:
        assert png.size[0] > 300
