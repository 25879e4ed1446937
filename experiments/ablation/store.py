"""An ablation's runs in MLflow: where each row's runs are found, and the table read back from them.

Every run of an ablation is tagged ``ablation`` (its name), ``ablation.role`` (``summary``,
``pretrain`` or ``row``), and for rows ``ablation.row`` and ``ablation.seed``; rows and
pretraining runs are nested under the summary run. MLflow is the store: a finished row is found
there again, which is what makes an interrupted ablation resume.
"""

from __future__ import annotations

import numpy as np
from mlflow.entities import RunStatus

from experiments.ablation.rows import COLUMNS, ROW_BY_KEY
from experiments.tracking import TrackingSettings, open_client


class Ablation:
    """The runs of one ablation in one MLflow experiment (see the module's docstring)."""

    def __init__(self, name: str, tracking: TrackingSettings, mlflow_config: str):
        self.name, self.tracking, self.mlflow_config = name, tracking, mlflow_config
        self.client = open_client(tracking.tracking_uri)
        self.experiment_id = tracking.experiment_id(self.client)

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
            for m in COLUMNS:
                entry[m].append(run.data.metrics.get(f"ablation/{m}", float("nan")))
        for entry in out.values():
            for m in COLUMNS:
                values = np.array(entry[m])
                entry[f"{m}_mean"] = float(values.mean())
                entry[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return {k: out[k] for k in ROW_BY_KEY if k in out}

    def per_au(self) -> dict[str, dict]:
        """Per row: each AU's test F1 at 0.5 (``f1``) and at the fitted thresholds (``f1_fitted``),
        a list over seeds, and its labelled test positives and negatives (``positives``,
        ``negatives``; the same test split for every row)."""
        out: dict[str, dict] = {}
        for run in self._runs("row"):
            if "ablation/f1" not in run.data.metrics:
                continue
            entry = out.setdefault(run.data.tags["ablation.row"], {"f1": {}, "f1_fitted": {}, "positives": {},
                                                                    "negatives": {}})
            for name, value in run.data.metrics.items():
                parts = name.split("/")
                if len(parts) != 3 or parts[0] != "test":
                    continue
                kind, au = parts[1], parts[2]
                if kind == "f1_default":
                    entry["f1"].setdefault(au, []).append(value)
                elif kind == "f1":
                    entry["f1_fitted"].setdefault(au, []).append(value)
                elif kind in ("positives", "negatives"):
                    entry[kind][au] = value
        return out
