"""The ablation's table as people read it: Markdown beside the paper's Tables 1 and 2, CSV, a bar
chart, which of the paper's orderings hold (each at one kind of threshold), and the per-AU
analysis: what each strategy does to every AU's F1, beside how many positives the AU has."""

from __future__ import annotations

import csv
import io

import numpy as np

from experiments.ablation.rows import AT_FITTED, AT_HALF, COLUMNS, ORDERINGS, PAPER, ROW_BY_KEY, STRATEGIES, threshold_kind


def _fmt(entry: dict, metric: str) -> str:
    return f"{entry[f'{metric}_mean']:.3f} ± {entry[f'{metric}_std']:.3f}"


def markdown_table(table: dict[str, dict]) -> str:
    """The ablation as a Markdown table: test figures at 0.5 and at the fitted thresholds, the
    paper's beside them (its rows with soft thresholds decide at fitted thresholds, the others at 0.5)."""
    lines = ["| Row | Method | Seeds | Acc @0.5 | F1 @0.5 | Avg @0.5 | Acc @fitted | F1 @fitted | Avg @fitted "
             "| Paper Acc | Paper F1 | Paper Avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in table.items():
        paper = PAPER.get(key)
        paper_cells = [f"{v:.3f}" for v in paper] if paper else ["", "", ""]
        lines.append(f"| {key} | {ROW_BY_KEY[key].label} | {len(entry['seeds'])} | "
                     + " | ".join(_fmt(entry, m) for m in AT_HALF + AT_FITTED) + " | " + " | ".join(paper_cells) + " |")
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
            out.append(f"{claim}, by {metric.removesuffix('_fitted')} {threshold_kind(metric)}: {verdict} "
                       f"({better} {a[f'{metric}_mean']:.3f} vs {worse} "
                       f"{b[f'{metric}_mean']:.3f}, difference {delta:+.3f}, largest seed spread {spread:.3f})")
    return out


def table_csv(table: dict[str, dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "method", "seeds"] + [f"{m}_{s}" for m in COLUMNS for s in ("mean", "std")])  # _fitted: at fitted thresholds
    for key, entry in table.items():
        writer.writerow([key, ROW_BY_KEY[key].label, " ".join(map(str, sorted(entry["seeds"])))]
                        + [round(entry[f"{m}_{s}"], 5) for m in COLUMNS for s in ("mean", "std")])
    return buffer.getvalue()


def bar_chart(table: dict[str, dict]):
    """Grouped bars of F1 and Avg per row at 0.5 and at the fitted thresholds (error bars: spread
    over seeds), the paper's F1 and Avg as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(table)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) + 2), 4.8))
    width = 0.2
    shown = (("f1", "F1 at 0.5", "#9ecae1", 1), ("avg", "Avg at 0.5", "#3182bd", 2),
             ("f1_fitted", "F1 at fitted thresholds", "#fdae6b", 1), ("avg_fitted", "Avg at fitted thresholds",
                                                                      "#e6550d", 2))
    for j, (metric, label, colour, paper_index) in enumerate(shown):
        means = [table[k][f"{metric}_mean"] for k in keys]
        stds = [table[k][f"{metric}_std"] for k in keys]
        offset = (j - 1.5) * width
        ax.bar(x + offset, means, width, yerr=stds, capsize=2, color=colour, label=label)
        paper = [(i, PAPER[k][paper_index]) for i, k in enumerate(keys) if k in PAPER and j < 2]
        if paper:
            ax.scatter([i + offset for i, _ in paper], [v for _, v in paper], marker="_", s=120,
                       color="black", zorder=3, label="paper" if j == 0 else None)
    ax.set_xticks(x, keys, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score")
    seeds = max(len(table[k]["seeds"]) for k in keys)
    ax.set_title(f"Ablation: mean over {seeds} seeds (bars), the paper's tables (black marks)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=5, frameon=False)
    fig.tight_layout()
    return fig


def _au_order(per_au: dict[str, dict]) -> list[str]:
    """AUs by their test positive share, rarest first (the axis every per-AU figure uses)."""
    counts: dict[str, tuple[float, float]] = {}
    for entry in per_au.values():
        for au, p in entry["positives"].items():
            counts[au] = (p, entry["negatives"].get(au, 0.0))
    return sorted(counts, key=lambda au: (counts[au][0] / max(sum(counts[au]), 1), au))


def per_au_changes(per_au: dict[str, dict]) -> list[dict]:
    """One record per strategy and AU: the change of the AU's test F1 (mean over seeds) when the
    strategy is added, at 0.5 and at the fitted thresholds, with the AU's positives and negatives."""
    records = []
    for name, without, with_ in STRATEGIES:
        if without not in per_au or with_ not in per_au:
            continue
        a, b = per_au[without], per_au[with_]
        for au in _au_order(per_au):
            record = {"strategy": name, "without": without, "with": with_, "au": au,
                      "positives": int(b["positives"].get(au, 0)), "negatives": int(b["negatives"].get(au, 0))}
            for kind in ("f1", "f1_fitted"):
                before, after = a[kind].get(au), b[kind].get(au)
                record[f"delta_{kind}"] = (float(np.mean(after)) - float(np.mean(before))
                                           if before and after else float("nan"))
            records.append(record)
    return records


def per_au_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["strategy", "without", "with", "au", "positives", "negatives", "delta_f1", "delta_f1_fitted"]
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    for r in records:
        writer.writerow({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()})
    return buffer.getvalue()


def per_au_summary(records: list[dict], rare: float = 0.05, frequent: float = 0.2) -> list[str]:
    """Per strategy, the mean F1 change over rare AUs (positive share under ``rare``), the middle
    ones and frequent ones (over ``frequent``), at both kinds of threshold, and the AUs it helps
    and hurts most."""
    lines = []
    for name in dict.fromkeys(r["strategy"] for r in records):
        rows = [r for r in records if r["strategy"] == name]
        share = {r["au"]: r["positives"] / max(r["positives"] + r["negatives"], 1) for r in rows}
        parts = []
        for kind, label in (("delta_f1", "at 0.5"), ("delta_f1_fitted", "at fitted thresholds")):
            groups = []
            for group, test in (("rare", lambda s: s < rare), ("middle", lambda s: rare <= s <= frequent),
                                ("frequent", lambda s: s > frequent)):
                values = [r[kind] for r in rows if test(share[r["au"]]) and np.isfinite(r[kind])]
                if values:
                    groups.append(f"{group} ({len(values)}) {np.mean(values):+.3f}")
            parts.append(f"{label}: " + ", ".join(groups))
        ranked = sorted((r for r in rows if np.isfinite(r["delta_f1_fitted"])), key=lambda r: r["delta_f1_fitted"])
        best = ", ".join(f"{r['au']} {r['delta_f1_fitted']:+.2f} ({r['positives']}+)" for r in ranked[::-1][:3])
        worst = ", ".join(f"{r['au']} {r['delta_f1_fitted']:+.2f} ({r['positives']}+)" for r in ranked[:3])
        lines.append(f"{name} ({rows[0]['without']} -> {rows[0]['with']}): " + "; ".join(parts)
                     + f". Most helped (fitted): {best}; most hurt: {worst}")
    return lines


def per_au_figure(records: list[dict]):
    """Heat maps, one per kind of threshold: strategies down, AUs across (rarest first, with their
    test positives), colour = change of the AU's F1 when the strategy is added."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    aus = list(dict.fromkeys(r["au"] for r in records))
    positives = {r["au"]: r["positives"] for r in records}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.55 * len(aus) + 3), 1.0 + 0.9 * len(strategies) * 2),
                             squeeze=False)
    for ax, (kind, label) in zip(axes[:, 0], (("delta_f1", "at 0.5"), ("delta_f1_fitted", "at fitted thresholds"))):
        grid = np.full((len(strategies), len(aus)), np.nan)
        for r in records:
            grid[strategies.index(r["strategy"]), aus.index(r["au"])] = r[kind]
        image = ax.imshow(grid, cmap="RdBu", vmin=-0.5, vmax=0.5, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(strategies)), strategies, fontsize=7)
        ax.set_xticks(range(len(aus)), [f"{au}\n{positives[au]}+" for au in aus], fontsize=6)
        ax.set_title(f"Change of each AU's test F1 when a strategy is added, {label} (mean over seeds); "
                     "AUs rarest first, with test positives", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.02)
    fig.tight_layout()
    return fig
