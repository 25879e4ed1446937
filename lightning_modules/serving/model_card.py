"""The model card: what a trained AU detector is, what it was trained on and where not to trust it.

Every model a fit logs carries ``MODEL_CARD.md`` (in the pyfunc model, its predictor folder and the
run, whose description shows it in the MLflow UI); ``au-detect predict --model ... --describe``
prints it. It is rendered from plain facts (:func:`render_model_card`), kept as
``model_card.json`` beside it, so that the test of the same run can add its figures later.

The facts are a dict:

- ``network``: ``backbone``, ``branches`` and ``weights`` (branch -> where it started from);
- ``data``: ``synthetic`` (SynthAU) and ``splits`` (split -> ``manifest``, ``rows``);
- ``thresholds``: ``criterion``, ``min_positives``, ``fallback``;
- ``aus``: per AU ``AU``, ``train_rate``, ``val_positives``, ``threshold``, ``fell_back`` (the
  reason, or null), ``val_f1``, and ``test_f1`` once tested;
- ``validation`` / ``test``: headline metrics (name -> value); ``best_epoch``, ``run_id``,
  ``model_uri``, ``registered_model_name`` when known.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CARD_FILE", "FACTS_FILE", "known_limits", "render_model_card"]

CARD_FILE = "MODEL_CARD.md"
FACTS_FILE = "model_card.json"
SYNTHETIC_LIMIT = ("**SynthAU only: not for real faces.** Trained and tested on rendered faces; its figures say "
                   "nothing about photos or video of people. Train on real AU data for that.")


def known_limits(facts: dict[str, Any]) -> list[str]:
    """What a user must know before trusting a decision of this model, most serious first."""
    limits = []
    if facts.get("data", {}).get("synthetic"):
        limits.append(SYNTHETIC_LIMIT)
    fell = [a["AU"] for a in facts.get("aus", []) if a.get("fell_back")]
    rule = facts.get("thresholds", {})
    if fell:
        limits.append(f"{', '.join(fell)}: fewer than {rule.get('min_positives')} validation positives, so their "
                      "thresholds were not fitted (see the table): their decisions are the least reliable.")
    random = [b for b, w in facts.get("network", {}).get("weights", {}).items() if w == "random initialisation"]
    if random:
        limits.append(f"Branch{'es' if len(random) > 1 else ''} {', '.join(random)} started from random weights, "
                      "not from pretraining.")
    if facts.get("test") is None:
        limits.append("Not tested yet: the figures are validation figures (`au-detect test` adds the test's).")
    limits.append("Thresholds were fitted on the validation split of the training data; on data of another kind "
                  "(camera, population, pose) fit them again (`au-detect validate` with a manifest of it).")
    return limits


def _f(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_model_card(facts: dict[str, Any]) -> str:
    """Markdown for people (the MLflow UI renders a run's description as Markdown).

    >>> print(render_model_card({"aus": [], "data": {"synthetic": True}, "test": None}).splitlines()[0])
    # AU detector
    """
    net = facts.get("network", {})
    title = "AU detector"
    if net.get("backbone"):
        title += f": {net['backbone']}, {' + '.join(net.get('branches', []))} branches"
    lines = [f"# {title}", ""]
    where = [f"run `{facts['run_id']}`" if facts.get("run_id") else None,
             f"`{facts['model_uri']}`" if facts.get("model_uri") else None,
             f"registered as `{facts['registered_model_name']}`" if facts.get("registered_model_name") else None]
    if any(where):
        lines += ["MLflow: " + ", ".join(w for w in where if w) + ".", ""]
    lines += ["## Known limits", ""] + [f"- {limit}" for limit in known_limits(facts)] + [""]

    data = facts.get("data", {})
    lines += ["## Data", "", "SynthAU, rendered faces with known AUs." if data.get("synthetic")
              else "EmotioNet-form manifests:", ""]
    splits = data.get("splits", {})
    if splits:
        lines += ["| split | manifest | rows |", "|---|---|---|"]
        lines += [f"| {name} | `{s.get('manifest', '')}` | {s.get('rows', '')} |" for name, s in splits.items()]
        lines.append("")
    if net.get("weights"):
        lines += ["Branches started from: " + "; ".join(f"{b}: {w}" for b, w in net["weights"].items()) + ".", ""]

    rule = facts.get("thresholds", {})
    lines += ["## Figures", ""]
    for kind in ("test", "validation"):
        figures = facts.get(kind) or {}
        if figures:
            epoch = f" (best epoch {facts['best_epoch']})" if kind == "validation" and "best_epoch" in facts else ""
            lines.append(f"- {kind}{epoch}: " + ", ".join(f"{k} {_f(v)}" for k, v in figures.items()))
    lines.append("")

    lines += ["## AUs and thresholds", "",
              f"Decision: probability >= the AU's threshold, fitted on validation to maximise "
              f"`{rule.get('criterion', '?')}`; an AU with fewer than {rule.get('min_positives', '?')} validation "
              f"positives keeps {'0.5' if rule.get('fallback', 'default') == 'default' else 'a value shrunk toward 0.5'}"
              " (its threshold would be fitted on noise).", ""]
    tested = any("test_f1" in a for a in facts.get("aus", []))
    header = ["AU", "train positive rate", "val positives", "threshold", "from", "val F1"] + (["test F1"] if tested else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for a in facts.get("aus", []):
        row = [a["AU"], _f(a.get("train_rate")), _f(a.get("val_positives")), _f(a.get("threshold")),
               f"fallback: {a['fell_back']}" if a.get("fell_back") else "fitted", _f(a.get("val_f1"))]
        lines.append("| " + " | ".join(row + ([_f(a.get("test_f1"))] if tested else [])) + " |")
    lines += ["", "## Use", "", "```bash",
              f"au-detect predict --model {facts.get('model_uri') or '<this model>'} --input photos/ --out aus.csv",
              "```", ""]
    return "\n".join(lines)
