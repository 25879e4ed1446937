"""``au-detect pipeline``: the whole method in one command, each stage an MLflow run under one parent.

    au-detect pipeline --config experiments/configs/pipeline_demo.yaml

1. **data**: the AU config's data prepared (SynthAU generated, every split aligned);
2. **face branch**: face-recognition pretraining (``au-detect pretrain-face fit``), its backbone
   written where the AU config's ``model.face_weights`` reads it;
3. **expression branch**: expression pretraining (``au-detect pretrain-expression fit``), written
   to ``model.emotion_weights``;
4. **AU fit**: ``au-detect fit`` on the AU config (both branches loaded, with the balancing
   strategies it sets), then ``au-detect test`` on its best checkpoint.

A branch checkpoint that exists already is reused, so a rerun goes straight to the AU fit (delete
the file, or pass ``--retrain_branches true``, to pretrain again). The AU config stays a plain
LightningCLI config: ``au-detect fit --config experiments/configs/demo.yaml`` does stage 4 alone. In MLflow
the stages are runs nested under a parent run named after the pipeline (tags ``pipeline``, and
``au_detect.stage``: data, pretrain-face, pretrain-expression, fit), which holds the test figures
and the minutes each stage took; the fit run is named as ``au-detect fit`` names it. When the fit
registers its model, the version gets the alias ``champion`` after the test. The pipeline ends with
the commands to paste: ``au-detect predict`` with the model, ``mlflow ui`` on the store. With
``baseline: true`` the AU fit is repeated from random branches at the same budget, and the
parent run shows what the transfer adds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence


from experiments.data import prepare
from experiments.lightning_cli import COMMAND_TAG, run_name
from experiments.stages import (BRANCH_TASKS, STAGE_TAG, fit_and_test, function_parser, pretrain_branch,
                               run_function, with_overrides)
from experiments.registry import promote
from experiments.tracking import TrackingSettings, next_commands, open_client, registered_name

CONFIG_KEYS = {"face": "face_weights", "emotion": "emotion_weights"}


def _fit_and_test(config: dict[str, Any], label: str) -> dict[str, Any]:
    result = fit_and_test(config)
    m = result["metrics"]
    print(f"[pipeline] {label}: test F1 {m.get('test/f1', float('nan')):.3f} at the fitted thresholds "
          f"({m.get('test/f1_default', float('nan')):.3f} at 0.5), run {result['run_id']}")
    return result


def pipeline(
    name: str = "demo",
    fit_config: str = "experiments/configs/demo.yaml",
    face_config: str = "experiments/configs/pretrain_face_demo.yaml",
    expression_config: str = "experiments/configs/pretrain_expression_demo.yaml",
    fit_overrides: dict[str, Any] | None = None,
    pretrain_overrides: dict[str, Any] | None = None,
    retrain_branches: bool = False,
    baseline: bool = False,
    champion: str | None = "champion",
    mlflow: str = "mlflow.yaml",
) -> dict[str, Any]:
    """Prepare the data, pretrain both branches, fit and test the AU detector; one MLflow parent run.

    Args:
        name: the pipeline's name: its parent run's name and the ``pipeline`` tag of its runs.
        fit_config: the AU training config; its ``model.face_weights`` and
            ``model.emotion_weights`` say where the branch checkpoints are written and read.
        face_config, expression_config: the two pretraining configs.
        fit_overrides: dotted keys changed in the AU config (e.g. ``trainer.max_epochs``).
        pretrain_overrides: dotted keys changed in both pretraining configs.
        retrain_branches: pretrain again even where the branch checkpoint exists.
        baseline: also fit from random branches at the same budget (what the transfer adds).
        champion: the registry alias moved to the AU fit's model version after its test, when the
            fit registered its model (``mlflow_artifacts.registered_model_name``); null: none.
        mlflow: MLflow settings file.
    """
    start = time.perf_counter()
    tracking = TrackingSettings.read(mlflow)
    client = open_client(tracking.tracking_uri)
    parent_experiment = tracking.experiment_id(client)
    parent = client.create_run(parent_experiment, run_name=f"pipeline {name}",
                               tags={**tracking.tags, "pipeline": name, "pipeline.stage": "pipeline",
                                     STAGE_TAG: "pipeline", COMMAND_TAG: "pipeline"}).info.run_id
    print(f"[pipeline] '{name}': MLflow experiment '{tracking.experiment_name}' at {tracking.tracking_uri}, "
          f"parent run {parent}")
    minutes: dict[str, float] = {}

    def tags(stage: str) -> dict[str, str]:
        return {"pipeline": name, "pipeline.stage": stage, STAGE_TAG: stage, "mlflow.parentRunId": parent}

    try:
        fit = with_overrides(fit_config, dict(fit_overrides or {}))
        t = time.perf_counter()
        data_run = client.create_run(parent_experiment, run_name=f"{name} data",
                                     tags={**tracking.tags, **tags("data"), COMMAND_TAG: "prepare"}).info.run_id
        try:
            prepare(fit)
        except BaseException:
            client.set_terminated(data_run, "FAILED")
            raise
        minutes["data"] = (time.perf_counter() - t) / 60
        client.log_metric(data_run, "minutes", minutes["data"])
        client.set_terminated(data_run)

        for branch, config in (("face", face_config), ("emotion", expression_config)):
            path = fit["model"].get(CONFIG_KEYS[branch])
            if not path:
                raise ValueError(f"pipeline: {fit_config} sets no model.{CONFIG_KEYS[branch]}: the pipeline writes "
                                 f"the {branch} branch's checkpoint where the AU config reads it")
            if retrain_branches:
                Path(path).unlink(missing_ok=True)
            t = time.perf_counter()
            task = BRANCH_TASKS[branch]
            _, trained = pretrain_branch(
                branch, config, dict(pretrain_overrides or {}), path, mlflow, f"{name} {task}", tags(task),
                prefix="[pipeline] ")
            client.set_tag(parent, f"pipeline.{branch}_weights", f"{path} ({'trained' if trained else 'reused'})")
            minutes[task] = (time.perf_counter() - t) / 60

        t = time.perf_counter()
        # named as `au-detect fit --config <fit_config>` names it (demo-resnet18-bce-s0), numbered when taken
        model = fit.get("model") or {}
        fit_name = tracking.unique_run_name(run_name(Path(fit_config).stem, [model.get("backbone"), model.get("loss")],
                                                     fit.get("seed_everything")), client)
        result = _fit_and_test({**fit, "mlflow": mlflow, "run_name": fit_name, "tags": tags("fit")}, "AU fit")
        minutes["fit"] = (time.perf_counter() - t) / 60
        results = {"fit": result}
        if baseline:
            t = time.perf_counter()
            random = {**fit, "mlflow": mlflow, "run_name": f"{name} fit from random branches",
                      "tags": tags("baseline")}  # named apart: its config says nothing of the random branches
            random["model"] = {**fit["model"], "face_weights": None, "emotion_weights": None}
            results["baseline"] = _fit_and_test(random, "AU fit from random branches")
            minutes["baseline"] = (time.perf_counter() - t) / 60
        minutes["total"] = (time.perf_counter() - start) / 60

        for label, r in results.items():
            for key in ("test/f1", "test/f1_default", "test/accuracy", "test/score", "val/score_heldout",
                        "val/f1_heldout"):
                if key in r["metrics"]:
                    client.log_metric(parent, f"{label}/{key}", r["metrics"][key])
                    if label == "fit":  # under its own name too: the runs list's columns show it on the parent's row
                        client.log_metric(parent, key, r["metrics"][key])
        for stage, m in minutes.items():
            client.log_metric(parent, f"minutes/{stage}", m)
        artifacts = fit.get("mlflow_artifacts") or {}
        registered = registered_name(tracking, result["run_id"],
                                     artifacts.get("registered_model_name") or tracking.registered_model_name)
        if registered and champion:
            promote(f"runs:/{result['run_id']}/model", champion, name=registered, mlflow=mlflow)
        client.set_terminated(parent)
    except BaseException:
        client.set_terminated(parent, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise

    print("\n[pipeline] minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()))
    for label, r in results.items():
        m = r["metrics"]
        print(f"[pipeline] {label}: test F1 {m.get('test/f1', float('nan')):.3f} at fitted thresholds, "
              f"accuracy {m.get('test/accuracy', float('nan')):.3f}; best checkpoint {r['checkpoint']}")
    lines = next_commands(tracking, mlflow, result["run_id"], result.get("photo"),
                          bool(artifacts.get("log_model", True)), registered,
                          champion=champion == "champion", run_page=False)
    print("\n[pipeline] next, from the project folder:\n" + "\n".join(f"  {line}" for line in lines))
    return {"parent": parent, "minutes": minutes, **results}


def build_parser():
    return function_parser(pipeline, "au-detect pipeline", __doc__)


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    return run_function(pipeline, build_parser(), args)
