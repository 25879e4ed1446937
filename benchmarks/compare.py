"""Side-by-side timing for the benchmarks: variants alternate in one process, medians compared.

The machine is shared and noisy, so every variant runs once per repeat, in turn (a slow spell
hits them alike), and the table reports the median of each and its ratio to the first (the
baseline).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

# A variant returns (throughput, one more figure to show, e.g. faces found).
Variant = Callable[[], tuple[float, Any]]


def alternate(variants: dict[str, Variant], repeats: int) -> dict[str, list[tuple[float, Any]]]:
    results: dict[str, list[tuple[float, Any]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            results[name].append(run())
    return results


def print_table(results: dict[str, list[tuple[float, Any]]], unit: str, extra: str, extra_format: str) -> None:
    """Markdown table: variant | median throughput | the first repeat's extra figure | vs baseline."""
    base = statistics.median(r[0] for r in next(iter(results.values())))
    width = max(len(name) for name in results)
    head = f"{unit} (median)"
    print(f"| {'pipeline':<{width}} | {head} | {extra} | vs baseline |")
    print(f"|{'-' * (width + 2)}|{'-' * (len(head) + 2)}|{'-' * (len(extra) + 2)}|-------------|")
    for name, rs in results.items():
        speed = statistics.median(r[0] for r in rs)
        print(f"| {name:<{width}} | {speed:{len(head)}.1f} | {rs[0][1]:{len(extra)}{extra_format}} "
              f"| {speed / base:10.2f}x |")
