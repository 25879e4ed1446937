"""Figures a run shows in MLflow (label frequencies, PR curves per AU, sample grids) and the AU
curves of the people of a video that ``au-detect predict`` draws."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from datamodules.io.manifest import au_column_name  # noqa: E402
from lightning_modules.metrics import ranked_counts  # noqa: E402


def label_frequency_figure(aus: Sequence[int], raw: np.ndarray, sampled: np.ndarray | None = None):
    """Per-AU positive rate in the raw training data and, with balanced sampling, as drawn."""
    names = [au_column_name(a) for a in aus]
    x = np.arange(len(aus))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(aus)), 3.6))
    width = 0.4 if sampled is not None else 0.8
    ax.bar(x - (width / 2 if sampled is not None else 0), raw, width, label="raw")
    if sampled is not None:
        ax.bar(x + width / 2, sampled, width, label="balanced sampling (expected)")
    ax.set_xticks(x, names, rotation=60, fontsize=8)
    ax.set_ylabel("positive rate (labelled entries)")
    ax.set_title("AU label frequencies")
    ax.legend()
    fig.tight_layout()
    return fig


def precision_recall(probs: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and thresholds over every distinct score, highest threshold first."""
    thresholds, tp, fp = ranked_counts(probs, positive)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(np.count_nonzero(positive)), 1)
    return precision, recall, thresholds


def pr_curves_figure(aus: Sequence[int], probs: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                     thresholds: np.ndarray | None = None, cols: int = 6):
    """One precision-recall curve per AU (labelled entries only); the fitted threshold marked."""
    k = len(aus)
    rows = -(-k // cols)
    # One grid: shared axes, tick labels on the outer panels only (the bottom one of each column,
    # the first of each row), the axis names once for all, fixed margins.
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows), squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.45 / (2.2 * rows), top=1 - 0.75 / (2.2 * rows),
                        wspace=0.08, hspace=0.35)
    axes[0, 0].set_xlim(0, 1)
    axes[0, 0].set_ylim(0, 1.02)
    axes[0, 0].set_xticks([0, 0.5, 1])
    axes[0, 0].set_yticks([0, 0.5, 1])
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        ax.tick_params(labelsize=6, labelbottom=i + cols >= k, labelleft=i % cols == 0)  # the outer panels only
        m = mask[:, i].astype(bool)
        y = labels[m, i] > 0.5
        ax.set_title(f"{au_column_name(aus[i])}  (n+={int(y.sum())})", fontsize=8)
        if y.sum() == 0:
            ax.text(0.5, 0.5, "no positive", ha="center", fontsize=7)
            continue
        precision, recall, cut = precision_recall(probs[m, i], y)
        ax.plot(recall, precision, lw=1)
        ax.axhline(y.mean(), color="grey", lw=0.6, ls="--")  # a constant predictor's precision
        if thresholds is not None:
            j = int(np.argmin(np.abs(cut - thresholds[i])))
            ax.plot(recall[j], precision[j], "o", ms=4, color="red")
    fig.suptitle("Precision-recall per AU (validation); dot: fitted threshold, dashed: prior", fontsize=9)
    fig.supxlabel("recall", fontsize=8)
    fig.supylabel("precision", fontsize=8)
    return fig


def sample_grid_figure(images: np.ndarray, labels: np.ndarray, mask: np.ndarray, aus: Sequence[int],
                       cols: int = 8, title: str = "training batch"):
    """Images (N,H,W,3 uint8) captioned with their positive AUs (``?`` counts unlabelled AUs)."""
    n = len(images)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i])
        pos = [str(a) for a, y, m in zip(aus, labels[i], mask[i]) if m and y > 0.5]
        ax.set_title((",".join(pos) or "-") + f"  ?{int((~mask[i].astype(bool)).sum())}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def au_curves_figure(curves: dict[int, tuple[np.ndarray, np.ndarray]], events: Sequence[dict], aus: Sequence[str],
                     thresholds: np.ndarray, title: str, most: int = 6, gap_s: float = 1.0,
                     people_total: int | None = None):
    """One panel per person: the smoothed probability over time of the AUs that were active
    longest (at most ``most``; the others are in the CSV), each with its threshold dashed and its
    events shaded; the lines break where the person was unseen for over ``gap_s``. ``events``:
    rows of ``<out stem>.events.csv`` (person, au, onset_s, offset_s). ``people_total``: how many
    people the video had, when ``curves`` holds only some of them (said in the title)."""
    people = [p for p, (t, _) in curves.items() if len(t)]
    fig, axes = plt.subplots(max(1, len(people)), 1, figsize=(11, 2.4 * max(1, len(people))), squeeze=False,
                             sharex=True)
    colours = plt.get_cmap("tab10")
    for ax, person in zip(axes[:, 0], people):
        t, v = curves[person]
        breaks = np.nonzero(np.diff(t) > gap_s)[0] + 1  # no line across an absence
        t, v = np.insert(t, breaks, np.nan), np.insert(v.astype(float), breaks, np.nan, axis=0)
        mine = [e for e in events if e["person"] == person]
        active = {a: sum(e["offset_s"] - e["onset_s"] for e in mine if e["au"] == a) for a in aus}
        shown = [a for a in sorted(aus, key=lambda a: -active[a]) if active[a] > 0][:most] or \
            [aus[k] for k in np.argsort(-np.nanmax(v, 0))[:min(most, 3)]]
        for n, a in enumerate(shown):
            k = aus.index(a)
            colour = colours(n % 10)
            ax.plot(t, v[:, k], color=colour, linewidth=1.2, label=a)
            ax.axhline(thresholds[k], color=colour, linewidth=0.6, linestyle="--")
            for e in (e for e in mine if e["au"] == a):
                ax.axvspan(e["onset_s"], max(e["offset_s"], e["onset_s"] + 1e-3), color=colour, alpha=0.12, linewidth=0)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"person {person}")
        ax.legend(loc="upper right", fontsize=7, ncol=min(len(shown), 6), frameon=False)
    if not people:
        axes[0, 0].text(0.5, 0.5, "no person seen", ha="center", va="center")
    axes[-1, 0].set_xlabel("time (s)")
    some = f", the {len(people)} of {people_total} people seen longest" \
        if people_total is not None and people_total > len(people) else ""
    fig.suptitle(f"{title}: smoothed AU probability per person{some} (dashed: threshold; shaded: events)", fontsize=9)
    fig.tight_layout()
    return fig
