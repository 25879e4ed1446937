"""``au-detect ablation``: the paper's Table 2, re-run on one's own data in one command.

    au-detect ablation --config experiments/ablation_demo.yaml

1. **Pretraining.** The face branch is pretrained on identities (ArcFace), the emotion branch on
   expressions, each with ``au-detect pretrain-face|pretrain-expression`` on the pretraining
   config given, unless ``face_weights``/``emotion_weights`` name checkpoints to reuse (a
   checkpoint this command wrote before is reused too).
2. **Rows.** Every row is ``au-detect fit`` on the AU config with a few overrides, then
   ``au-detect test`` on its best checkpoint, once per seed. The rows of Table 2 build up the
   method; the breakdown adds one balancing strategy at a time to the aligned dual model:

   =============  =================================  =====  ========  =========  ==========
   key            row                                align  sampling  selective  thresholds
   =============  =================================  =====  ========  =========  ==========
   face           F_face                             -      -         -          -
   emotion        F_emotion                          -      -         -          -
   dual           F_face + F_emotion                 -      -         -          -
   align          Align + F_face + F_emotion         yes    -         -          -
   balanced       ... + balancing (all three)        yes    yes       yes        yes
   scratch        ... + balancing, random branches   yes    yes       yes        yes
   sampling       Align + dual + sampling only       yes    yes       -          -
   selective      Align + dual + selective only      yes    -         yes        -
   thresholds     Align + dual + thresholds only     yes    -         -          yes
   face_align     Align + F_face                     yes    -         -          -
   emotion_align  Align + F_emotion                  yes    -         -          -
   =============  =================================  =====  ========  =========  ==========

   The last two repeat the branch comparison with alignment.

   Without alignment the crop is the scene's centred square (``alignment.method: center``).
   Without soft thresholds decisions are at 0.5. Soft thresholds do not change training, so the
   ``thresholds`` row is the ``align`` row's model decided at its fitted thresholds: a run of its
   own that points at its source (``ablation.source_run``) instead of a second, identical fit.
3. **Table.** Every row is an MLflow run in one experiment, tagged ``ablation``,
   ``ablation.row`` and ``ablation.seed`` and nested under a summary run. The table (Acc, F1 and
   Avg = (Acc + F1) / 2 on the test split, mean and spread over seeds, beside the paper's
   figures) is read back from MLflow, printed, and logged to the summary run as Markdown, CSV and
   a bar chart. A run already finished for a row and seed is not trained again: an interrupted
   ablation resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from callbacks.mlflow_artifacts import mlflow_logger
from datamodules.synthetic import SynthAUSettings, generate_synthau
from experiments.tracking import TrackingSettings

log = logging.getLogger(__name__)

# Table 2 of the seed paper (EmotioNet 2020 validation): Acc, F1, Avg.
PAPER_TABLE2 = {
    "face": (0.921, 0.384, 0.652),
    "emotion": (0.925, 0.429, 0.677),
    "dual": (0.925, 0.494, 0.710),
    "align": (0.927, 0.527, 0.727),
    "balanced": (0.915, 0.552, 0.734),
}
METRICS = ("accuracy", "f1", "avg")  # as the paper reports them, at each row's own decision rule
# F1 at the fitted thresholds whatever the row: how good the scores are, apart from the decision
# rule (a short run without soft thresholds may decide almost nothing positive at 0.5).
COLUMNS = METRICS + ("f1_fitted",)


@dataclass(frozen=True)
class Row:
    """One row of the ablation: what the AU model is trained with."""

    key: str
    label: str
    branches: tuple[str, ...] = ("face", "emotion")
    align: bool = True
    sampling: bool = False
    selective: bool = False
    thresholds: bool = False
    pretrained: bool = True
    source: str | None = None  # evaluated from another row's model instead of trained

    def overrides(self, weights: dict[str, str]) -> dict[str, Any]:
        """What this row changes in the AU config."""
        return {
            "model.branches": list(self.branches),
            "model.face_weights": weights.get("face") if self.pretrained and "face" in self.branches else None,
            "model.emotion_weights": weights.get("emotion") if self.pretrained and "emotion" in self.branches else None,
            "model.loss": "selective" if self.selective else "bce",
            "data.balanced_sampling": self.sampling,
            "data.alignment.method": "mtcnn" if self.align else "center",
            # Without soft thresholds the run is judged, and its checkpoint chosen, at 0.5.
            "checkpoint.monitor": "val/score_fitted" if self.thresholds else "val/score",
        }


ROWS = (
    Row("face", "F_face", branches=("face",), align=False),
    Row("emotion", "F_emotion", branches=("emotion",), align=False),
    Row("dual", "F_face + F_emotion", align=False),
    Row("align", "Align + F_face + F_emotion"),
    Row("balanced", "Align + F_face + F_emotion + balancing", sampling=True, selective=True, thresholds=True),
    Row("scratch", "Align + dual + balancing, no transfer (random branches)", sampling=True, selective=True,
        thresholds=True, pretrained=False),
    Row("sampling", "Align + dual + balanced sampling only", sampling=True),
    Row("selective", "Align + dual + selective learning only", selective=True),
    Row("thresholds", "Align + dual + soft thresholds only", thresholds=True, source="align"),
    # The branch comparison again, aligned: without alignment a small face in a scene's centre
    # crop may carry too little signal for any branch to show.
    Row("face_align", "Align + F_face", branches=("face",)),
    Row("emotion_align", "Align + F_emotion", branches=("emotion",)),
)
ROW_BY_KEY = {r.key: r for r in ROWS}
# (claim, better row, worse row, metrics): the orderings the paper's Table 2 argues for.
ORDERINGS = (
    ("transfer over scratch", "balanced", "scratch", ("avg", "f1_fitted")),
    ("dual over F_face", "dual", "face", ("avg", "f1_fitted")),
    ("dual over F_emotion", "dual", "emotion", ("avg", "f1_fitted")),
    ("dual over F_face, aligned", "align", "face_align", ("avg", "f1_fitted")),
    ("dual over F_emotion, aligned", "align", "emotion_align", ("avg", "f1_fitted")),
    ("aligned over unaligned", "align", "dual", ("avg", "f1_fitted")),
    ("balancing raises mean F1", "balanced", "align", ("f1",)),
)


def cli_args(overrides: dict[str, Any]) -> list[str]:
    """``{"model.branches": ["face"]}`` -> ``["--model.branches=[\"face\"]"]`` (values as JSON).

    >>> cli_args({"trainer.max_epochs": 4, "model.face_weights": None, "data.alignment.method": "center"})
    ['--trainer.max_epochs=4', '--model.face_weights=null', '--data.alignment.method=center']
    """
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


def row_metrics(metrics: dict[str, float], thresholds: bool) -> dict[str, float]:
    """A row's Acc, F1 and Avg from its test metrics: at the fitted thresholds or at 0.5.

    >>> row_metrics({"test/accuracy": 0.9, "test/f1": 0.5, "test/accuracy_default": 0.8, "test/f1_default": 0.4}, False)
    {'accuracy': 0.8, 'f1': 0.4, 'avg': 0.6000000000000001}
    """
    suffix = "" if thresholds else "_default"
    acc, f1 = float(metrics[f"test/accuracy{suffix}"]), float(metrics[f"test/f1{suffix}"])
    return {"accuracy": acc, "f1": f1, "avg": (acc + f1) / 2}


class Ablation:
    """The runs of one ablation in one MLflow experiment (see the module's docstring)."""

    def __init__(self, name: str, tracking: TrackingSettings, mlflow_config: str):
        self.name, self.tracking, self.mlflow_config = name, tracking, mlflow_config
        self.client = MlflowClient(tracking.tracking_uri)
        experiment = self.client.get_experiment_by_name(tracking.experiment_name)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            tracking.experiment_name, artifact_location=tracking.artifact_location)

    def _runs(self, role: str, extra: str = "") -> list:
        query = f"tags.ablation = '{self.name}' and tags.`ablation.role` = '{role}'" + extra
        return self.client.search_runs([self.experiment_id], query, max_results=5000)

    def summary_run(self) -> str:
        """The parent run of every run of this ablation (created once, found again on resume)."""
        found = self._runs("summary")
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"ablation {self.name}",
                                     tags={**self.tracking.tags, "ablation": self.name, "ablation.role": "summary"})
        return run.info.run_id

    def tags(self, parent: str, role: str, **more: str) -> dict[str, str]:
        return {"ablation": self.name, "ablation.role": role, "mlflow.parentRunId": parent, **more}

    def finished(self, row: str, seed: int) -> str | None:
        """The id of a finished, evaluated run of ``row`` at ``seed``, if there is one."""
        for run in self._runs("row", f" and tags.`ablation.row` = '{row}' and tags.`ablation.seed` = '{seed}'"):
            if run.info.status == RunStatus.to_string(RunStatus.FINISHED) and "ablation/f1" in run.data.metrics:
                return run.info.run_id
        return None

    def pretraining(self) -> list[str]:
        """One line per pretraining run of this ablation: its validation figures."""
        lines = []
        for run in self._runs("pretrain"):
            m = run.data.metrics
            figures = ", ".join(f"{k} {m[k]:.3f}" for k in sorted(m) if k.startswith("val/") and "loss" not in k)
            lines.append(f"{run.data.tags.get('ablation.task')}: {figures}")
        return sorted(lines)

    def run_minutes(self) -> float:
        """Training time the ablation's runs took, summed from MLflow (start to end of each)."""
        runs = self._runs("row") + self._runs("pretrain")
        return sum((r.info.end_time - r.info.start_time) / 60000 for r in runs if r.info.end_time)

    def table(self) -> dict[str, dict]:
        """Per row: the seeds' figures as MLflow holds them, their mean and spread."""
        out: dict[str, dict] = {}
        for run in self._runs("row"):
            if "ablation/f1" not in run.data.metrics:
                continue
            entry = out.setdefault(run.data.tags["ablation.row"], {"seeds": [], **{m: [] for m in COLUMNS}})
            entry["seeds"].append(int(run.data.tags["ablation.seed"]))
            for m in METRICS:
                entry[m].append(run.data.metrics[f"ablation/{m}"])
            entry["f1_fitted"].append(run.data.metrics["test/f1"])
        for entry in out.values():
            for m in COLUMNS:
                values = np.array(entry[m])
                entry[f"{m}_mean"] = float(values.mean())
                entry[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return {k: out[k] for k in ROW_BY_KEY if k in out}


def _fmt(entry: dict, metric: str) -> str:
    return f"{entry[f'{metric}_mean']:.3f} ± {entry[f'{metric}_std']:.3f}"


def markdown_table(table: dict[str, dict]) -> str:
    """The ablation as a Markdown table, the paper's Table 2 beside it."""
    lines = ["| Row | Method | Seeds | Acc | F1 | Avg | F1 at fitted thr. | Paper Acc | Paper F1 | Paper Avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in table.items():
        paper = PAPER_TABLE2.get(key)
        paper_cells = [f"{v:.3f}" for v in paper] if paper else ["", "", ""]
        lines.append(f"| {key} | {ROW_BY_KEY[key].label} | {len(entry['seeds'])} | "
                     + " | ".join(_fmt(entry, m) for m in COLUMNS) + " | " + " | ".join(paper_cells) + " |")
    return "\n".join(lines) + "\n"


def orderings(table: dict[str, dict]) -> list[str]:
    """Which of the paper's orderings hold here (mean over seeds, with the spread to judge by)."""
    out = []
    for claim, better, worse, metrics in ORDERINGS:
        if better not in table or worse not in table:
            continue
        a, b = table[better], table[worse]
        for metric in metrics:
            delta = a[f"{metric}_mean"] - b[f"{metric}_mean"]
            spread = max(a[f"{metric}_std"], b[f"{metric}_std"])
            verdict = "holds" if delta > 0 else "does not hold"
            out.append(f"{claim}, by {metric}: {verdict} ({better} {a[f'{metric}_mean']:.3f} vs {worse} "
                       f"{b[f'{metric}_mean']:.3f}, difference {delta:+.3f}, largest seed spread {spread:.3f})")
    return out


def table_csv(table: dict[str, dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "method", "seeds"] + [f"{m}_{s}" for m in COLUMNS for s in ("mean", "std")])
    for key, entry in table.items():
        writer.writerow([key, ROW_BY_KEY[key].label, " ".join(map(str, sorted(entry["seeds"])))]
                        + [round(entry[f"{m}_{s}"], 5) for m in COLUMNS for s in ("mean", "std")])
    return buffer.getvalue()


def bar_chart(table: dict[str, dict]):
    """Grouped bars of Acc, F1, Avg and F1 at fitted thresholds per row (error bars: spread over
    seeds), the paper's values as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(table)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) + 2), 4.8))
    width = 0.2
    labels = {"accuracy": "Acc", "f1": "F1", "avg": "Avg", "f1_fitted": "F1 at fitted thresholds"}
    for j, (metric, colour) in enumerate(zip(COLUMNS, ("#9ecae1", "#3182bd", "#08519c", "#fd8d3c"))):
        means = [table[k][f"{metric}_mean"] for k in keys]
        stds = [table[k][f"{metric}_std"] for k in keys]
        offset = (j - 1.5) * width
        ax.bar(x + offset, means, width, yerr=stds, capsize=2, color=colour, label=labels[metric])
        paper = [(i, PAPER_TABLE2[k][j]) for i, k in enumerate(keys) if k in PAPER_TABLE2 and j < 3]
        if paper:
            ax.scatter([i + offset for i, _ in paper], [v for _, v in paper], marker="_", s=120,
                       color="black", zorder=3, label="paper (Table 2)" if j == 0 else None)
    ax.set_xticks(x, keys, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score")
    seeds = max(len(table[k]["seeds"]) for k in keys)
    ax.set_title(f"Ablation: mean over {seeds} seeds (bars), paper's Table 2 (black marks)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=5, frameon=False)
    fig.tight_layout()
    return fig


def _finish_run(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    for m, v in metrics.items():
        client.log_metric(run_id, f"ablation/{m}", v)


def pretrain(task: str, config: str, overrides: dict[str, Any], path: Path, ablation: Ablation, parent: str,
             mlflow_config: str) -> str:
    """Pretrain one branch with its ``au-detect pretrain-*`` command unless ``path`` exists."""
    from experiments.cli import PretrainCLI

    if path.is_file():
        print(f"[ablation] reusing {path}")
        return str(path)
    tags = ablation.tags(parent, "pretrain", **{"ablation.task": task})
    overrides = {"trainer.default_root_dir": str(path.parent / task), **overrides}
    args = ["fit", "--config", config, *cli_args(overrides), f"--export.path={path}", f"--mlflow={mlflow_config}",
            f"--run_name={ablation.name} {task}", f"--tags={json.dumps(tags)}"]
    print(f"[ablation] au-detect {task} " + " ".join(args))
    PretrainCLI(task, args=args)
    return str(path)


def train_row(row: Row, seed: int, fit_config: str, fit_overrides: dict[str, Any], weights: dict[str, str],
              ablation: Ablation, parent: str, out: Path) -> str:
    """``au-detect fit`` then ``au-detect test`` on the best checkpoint; returns the run id."""
    from experiments.cli import AUDetectCLI

    tags = ablation.tags(parent, "row", **{"ablation.row": row.key, "ablation.seed": str(seed)})
    args = ["--config", fit_config, *cli_args({**fit_overrides, **row.overrides(weights)}),
            *cli_args({"seed_everything": seed, "data.seed": seed, "model.loss_seed": seed,
                       "trainer.default_root_dir": str(out / row.key / f"seed{seed}")}),
            f"--mlflow={ablation.mlflow_config}", f"--run_name={ablation.name} {row.key} seed{seed}",
            f"--tags={json.dumps(tags)}"]
    print(f"[ablation] row {row.key} seed {seed}: au-detect fit " + " ".join(args[2:]))
    fit = AUDetectCLI(args=["fit", *args])
    run_id = mlflow_logger(fit.trainer).run_id
    best = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    # The test run continues the fit's MLflow run (the checkpoint carries its id).
    test = AUDetectCLI(args=["test", *args, f"--ckpt_path={best}"])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}
    _finish_run(ablation.client, run_id, row_metrics(metrics, row.thresholds))
    return run_id


def derive_row(row: Row, seed: int, source_run: str, ablation: Ablation, parent: str) -> str:
    """A row that is another row's model decided differently: its own run, pointing at the source."""
    source = ablation.client.get_run(source_run)
    tags = ablation.tags(parent, "row", **{"ablation.row": row.key, "ablation.seed": str(seed),
                                           "ablation.source_run": source_run})
    run = ablation.client.create_run(ablation.experiment_id, run_name=f"{ablation.name} {row.key} seed{seed}",
                                     tags={**ablation.tracking.tags, **tags})
    metrics = {k: v for k, v in source.data.metrics.items() if k.startswith("test/")}
    for k, v in metrics.items():
        ablation.client.log_metric(run.info.run_id, k, v)
    _finish_run(ablation.client, run.info.run_id, row_metrics(metrics, row.thresholds))
    ablation.client.set_terminated(run.info.run_id)
    return run.info.run_id


def ablation(
    name: str = "table2",
    fit_config: str = "experiments/demo.yaml",
    fit_overrides: dict[str, Any] | None = None,
    face_config: str = "experiments/pretrain_face_demo.yaml",
    expression_config: str = "experiments/pretrain_expression_demo.yaml",
    pretrain_overrides: dict[str, Any] | None = None,
    pretrain_data: SynthAUSettings | None = None,
    pretrain_data_root: str | None = None,
    face_weights: str | None = None,
    emotion_weights: str | None = None,
    seeds: list[int] | None = None,
    rows: list[str] | None = None,
    out: str = "runs/ablation",
    mlflow: str = "mlflow.yaml",
) -> dict[str, dict]:
    """Pretrain the branches, train every row at every seed, and report the table from MLflow.

    Args:
        name: the ablation's name: the ``ablation`` tag of its runs; re-running with the same
            name resumes (finished rows are not trained again).
        fit_config: the AU training config every row starts from.
        fit_overrides: dotted config keys changed for every row (e.g. fewer epochs).
        face_config, expression_config: the pretraining configs of the two branches.
        pretrain_overrides: dotted config keys changed for both pretraining runs.
        pretrain_data: when set, SynthAU with these settings is generated into
            ``pretrain_data_root`` first (a corpus apart from the AU data, as VGGFace2 and
            AffectNet are apart from EmotioNet).
        pretrain_data_root: where that corpus goes.
        face_weights, emotion_weights: branch checkpoints to reuse instead of pretraining.
        seeds: one run per row per seed (3 or more for a spread).
        rows: the rows to run, by key (default: all; see the module's docstring).
        out: checkpoints and pretrained branches go under this folder.
        mlflow: MLflow settings file.
    """
    start = time.perf_counter()
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    keys = list(ROW_BY_KEY) if rows is None else list(rows)
    unknown = [k for k in keys if k not in ROW_BY_KEY]
    if unknown:
        raise ValueError(f"ablation rows: unknown {unknown}; known: {list(ROW_BY_KEY)}")
    for key in keys:  # a derived row needs its source trained too
        source = ROW_BY_KEY[key].source
        if source and source not in keys:
            keys.insert(keys.index(key), source)
    out_dir = Path(out) / name
    tracking = TrackingSettings.read(mlflow)
    study = Ablation(name, tracking, mlflow)
    parent = study.summary_run()
    print(f"[ablation] '{name}': rows {keys}, seeds {seeds}; MLflow experiment '{tracking.experiment_name}' at "
          f"{tracking.tracking_uri}, summary run {parent}")

    weights = {"face": face_weights, "emotion": emotion_weights}
    needs = {b for k in keys for b in ROW_BY_KEY[k].branches if ROW_BY_KEY[k].pretrained}
    pre = dict(pretrain_overrides or {})
    if pretrain_data is not None and needs - {b for b, w in weights.items() if w}:
        root = pretrain_data_root or str(out_dir / "pretrain_data")
        generate_synthau(root, pretrain_data)
        pre.setdefault("data.data_root", root)
    for branch, task, config in (("face", "pretrain-face", face_config),
                                 ("emotion", "pretrain-expression", expression_config)):
        if branch in needs and not weights[branch]:
            weights[branch] = pretrain(task, config, pre, out_dir / "branches" / f"{branch}.pt", study, parent, mlflow)

    for seed in seeds:
        for key in keys:
            row = ROW_BY_KEY[key]
            done = study.finished(key, seed)
            if done:
                print(f"[ablation] row {key} seed {seed}: finished before (run {done})")
                continue
            if row.source:
                derive_row(row, seed, study.finished(row.source, seed), study, parent)
            else:
                train_row(row, seed, fit_config, dict(fit_overrides or {}), weights, study, parent, out_dir)

    table = study.table()
    text = markdown_table(table)
    checks = orderings(table)
    minutes = (time.perf_counter() - start) / 60
    run_minutes = study.run_minutes()
    pretrained = study.pretraining()
    print(f"\nAblation '{name}' (test split; mean ± sample std over seeds); this call {minutes:.1f} min, "
          f"all its runs {run_minutes:.1f} min:\n")
    print(text)
    for line in checks:
        print(f"  {line}")
    for line in pretrained:
        print(f"  pretraining {line}")
    client = study.client
    report = (text + "\nOrderings of the paper's Table 2:\n\n" + "".join(f"- {c}\n" for c in checks)
              + "\nPretraining (validation):\n\n" + "".join(f"- {line}\n" for line in pretrained)
              + f"\nRuns: {run_minutes:.1f} min of training and evaluation in all.\n")
    client.log_text(parent, report, "ablation_table.md")
    client.log_text(parent, table_csv(table), "ablation_table.csv")
    fig = bar_chart(table)
    client.log_figure(parent, fig, "ablation.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    for key, entry in table.items():
        for m in COLUMNS:
            client.log_metric(parent, f"{key}/{m}", entry[f"{m}_mean"])
    client.log_metric(parent, "ablation/run_minutes", run_minutes)
    client.set_tag(parent, "ablation.seeds", " ".join(map(str, seeds)))
    client.set_terminated(parent)
    return table


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="au-detect ablation", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(ablation, as_group=False)
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, dict]:
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if args is None else args))
    init = parser.instantiate_classes(cfg)
    init.pop("config", None)
    return ablation(**init)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
