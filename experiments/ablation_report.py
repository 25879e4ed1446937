"""The ablation's table as people read it: Markdown beside the paper's Table 2, CSV, a bar chart,
and which of the paper's orderings hold."""

from __future__ import annotations

import csv
import io

import numpy as np

from experiments.ablation_rows import COLUMNS, ORDERINGS, PAPER_TABLE2, ROW_BY_KEY


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
