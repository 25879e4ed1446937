"""``au-detect ablation``: the paper's Table 2, re-run on one's own data in one command.

    au-detect ablation --config experiments/configs/ablation_demo.yaml

1. **Pretraining.** The face branch is pretrained on identities (ArcFace), the emotion branch on
   expressions, each with ``au-detect pretrain-face|pretrain-expression`` on the pretraining
   config given, unless ``face_weights``/``emotion_weights`` name checkpoints to reuse (a
   checkpoint this command wrote before is reused too).
2. **Rows.** Every row is ``au-detect fit`` on the AU config with a few overrides, then
   ``au-detect test`` on its best checkpoint, once per seed. The rows of Table 2 build up the
   method; the breakdown adds one balancing strategy at a time to the aligned dual model:

   ===============  ==========================================  ======  ========  =========  ==========
   key              row                                         crop    sampling  selective  thresholds
   ===============  ==========================================  ======  ========  =========  ==========
   face             F_face                                      box     -         -          -
   emotion          F_emotion                                   box     -         -          -
   dual             F_face + F_emotion                          box     -         -          -
   dual_center      F_face + F_emotion                          center  -         -          -
   align            Align + F_face + F_emotion                  mtcnn   -         -          -
   balanced         ... + balancing (all three)                 mtcnn   yes       0.5        yes
   balanced_prior   ... + balancing, prior target               mtcnn   yes       prior      yes
   sampling         Align + dual + sampling only                mtcnn   yes       -          -
   selective        Align + dual + selective learning only      mtcnn   -         0.5        -
   selective_prior  Align + dual + selective (prior) only       mtcnn   -         prior      -
   scratch          ... + balancing, random branches            mtcnn   yes       0.5        yes
   decorrelated     ... + balancing, orthogonality 0.1          mtcnn   yes       0.5        yes
   joint            Align + dual + sampling + thresholds        mtcnn   yes       -          yes
   occurrence       ... the same without the intensity head     mtcnn   yes       -          yes
   face_align       Align + F_face                              mtcnn   -         -          -
   emotion_align    Align + F_emotion                           mtcnn   -         -          -
   resnet18/50/152  Table 1: one branch, random start, aligned  mtcnn   -         -          -
   ===============  ==========================================  ======  ========  =========  ==========

   ``box`` crops MTCNN's face box (squared, resized) with no landmark warp: what a pipeline
   without alignment does. ``center`` crops the scene's middle, without detection. Every row is
   tested at 0.5 and at its thresholds fitted on validation, and rows are only compared at the
   same kind of threshold; soft thresholds do not change training, so the ``align`` row at its
   fitted thresholds is "align + soft thresholds". A row with soft thresholds picks its best epoch
   by ``val/score_heldout``, the others by ``val/score`` at 0.5. Every row trains the intensity
   head when the data has ``AU<n>_intensity`` columns, except ``occurrence``: ``joint`` vs
   ``occurrence`` is what training intensities beside occurrence does to occurrence F1 (the rows'
   test ICC(3,1) is logged as ``ablation/intensity_icc``).
3. **Table.** Every row is an MLflow run in one experiment, tagged ``ablation``,
   ``ablation.row`` and ``ablation.seed`` and nested under a summary run. The table (Acc, F1 and
   Avg = (Acc + F1) / 2 on the test split at both kinds of threshold, mean and spread over
   seeds, beside the paper's figures) is read back from MLflow, printed, and logged to the
   summary run as Markdown, CSV and a bar chart, with the per-AU analysis (each strategy's change
   of every AU's F1, beside the AU's test positives and negatives: ``ablation_per_au.csv`` and
   ``.png``). A run already finished for a row and seed is not trained again: an interrupted
   ablation resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from mlflow.tracking import MlflowClient

from datamodules.synthau.generate import SynthAUSettings, generate_synthau
from experiments.ablation.report import (bar_chart, markdown_table, orderings, per_au_changes, per_au_csv,
                                        per_au_figure, per_au_summary, table_csv)
from experiments.ablation.rows import COLUMNS, ROW_BY_KEY, TABLE2_ROWS, Row, row_metrics
from experiments.ablation.store import Ablation
from experiments.stages import (BRANCH_TASKS, fit_and_test, function_parser, pretrain_branch, run_function,
                               with_overrides)
from experiments.tracking import TrackingSettings

def _finish_run(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    for m, v in metrics.items():
        client.log_metric(run_id, f"ablation/{m}", v)


def train_row(row: Row, seed: int, fit_config: str, fit_overrides: dict[str, Any], weights: dict[str, str],
              ablation: Ablation, parent: str, out: Path) -> str:
    """``au-detect fit`` then ``au-detect test`` on the best checkpoint; returns the run id."""
    tags = ablation.tags(parent, "row", **{"ablation.row": row.key, "ablation.seed": str(seed)})
    overrides = {**fit_overrides, **row.overrides(weights), "seed_everything": seed, "data.seed": seed,
                 "model.loss_seed": seed, "trainer.default_root_dir": str(out / row.key / f"seed{seed}"),
                 "mlflow": ablation.mlflow_config, "run_name": f"{ablation.name} {row.key} seed{seed}", "tags": tags}
    config = with_overrides(fit_config, overrides)
    print(f"[ablation] row {row.key} seed {seed}: au-detect fit --config {fit_config} with {overrides}")
    result = fit_and_test(config)
    figures = row_metrics(result["metrics"])
    if "test/intensity_icc" in result["metrics"]:
        figures["intensity_icc"] = float(result["metrics"]["test/intensity_icc"])
    _finish_run(ablation.client, result["run_id"], figures)
    return result["run_id"]


def ablation(
    name: str = "table2",
    fit_config: str = "experiments/configs/demo.yaml",
    fit_overrides: dict[str, Any] | None = None,
    face_config: str = "experiments/configs/pretrain_face_demo.yaml",
    expression_config: str = "experiments/configs/pretrain_expression_demo.yaml",
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
        rows: the rows to run, by key (default: Table 2's; see the module's docstring).
        out: checkpoints and pretrained branches go under this folder.
        mlflow: MLflow settings file.
    """
    start = time.perf_counter()
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    keys = list(TABLE2_ROWS) if rows is None else list(rows)
    unknown = [k for k in keys if k not in ROW_BY_KEY]
    if unknown:
        raise ValueError(f"ablation rows: unknown {unknown}; known: {list(ROW_BY_KEY)}")
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
    for branch, config in (("face", face_config), ("emotion", expression_config)):
        if branch in needs and not weights[branch]:
            task = BRANCH_TASKS[branch]
            path = out_dir / "branches" / f"{branch}.pt"
            weights[branch], _ = pretrain_branch(
                branch, config, {"trainer.default_root_dir": str(path.parent / task), **pre}, path, mlflow,
                f"{name} {task}",
                study.tags(parent, "pretrain", **{"ablation.task": task}), prefix="[ablation] ")

    for seed in seeds:
        for key in keys:
            row = ROW_BY_KEY[key]
            done = study.finished(key, seed)
            if done:
                print(f"[ablation] row {key} seed {seed}: finished before (run {done})")
                continue
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
    changes = per_au_changes(study.per_au())
    per_au = per_au_summary(changes)
    if per_au:
        print("\nPer AU (change of test F1 when a strategy is added; AUs by test positive share):")
        for line in per_au:
            print(f"  {line}")
    client = study.client
    report = (text + "\nOrderings of the paper's tables:\n\n" + "".join(f"- {c}\n" for c in checks)
              + "\nPer AU:\n\n" + "".join(f"- {line}\n" for line in per_au)
              + "\nPretraining (validation):\n\n" + "".join(f"- {line}\n" for line in pretrained)
              + f"\nRuns: {run_minutes:.1f} min of training and evaluation in all.\n")
    client.log_text(parent, report, "ablation_table.md")
    client.log_text(parent, table_csv(table), "ablation_table.csv")
    import matplotlib.pyplot as plt

    figures = [(bar_chart(table), "ablation.png")]
    if changes:
        client.log_text(parent, per_au_csv(changes), "ablation_per_au.csv")
        figures.append((per_au_figure(changes), "ablation_per_au.png"))
    for fig, name in figures:
        client.log_figure(parent, fig, name)
        plt.close(fig)
    for key, entry in table.items():
        for m in COLUMNS:
            client.log_metric(parent, f"{key}/{m}", entry[f"{m}_mean"])
    client.log_metric(parent, "ablation/run_minutes", run_minutes)
    client.set_tag(parent, "ablation.seeds", " ".join(map(str, seeds)))
    client.set_terminated(parent)
    return table


def build_parser():
    return function_parser(ablation, "au-detect ablation", __doc__)


def main(args: Sequence[str] | None = None) -> dict[str, dict]:
    return run_function(ablation, build_parser(), args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
