"""How long ``au-detect --help`` takes: this tree against a baseline checkout.

    python benchmarks/cli_help.py --baseline /tmp/cli_base --repeats 7

Each run is a fresh interpreter (``python -c "from experiments.cli import main; main([...])"``) with
the tree on PYTHONPATH, as the console script runs; the two trees alternate, so a slow spell of a
shared machine hits both alike. Prints each tree's median and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def once(tree: Path, args: list[str]) -> float:
    """Seconds of one ``au-detect <args>`` run from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = f"import sys; sys.argv = ['au-detect', *{args!r}]; from experiments.cli import main; main()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout (git worktree add DIR REF)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--args", nargs="*", default=["--help"], help="what to time (default: --help)")
    opts = parser.parse_args()
    trees = {"baseline": opts.baseline.resolve(), "this tree": ROOT}
    for tree in trees.values():
        once(tree, opts.args)  # warm the file cache
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(opts.repeats):
        for name, tree in trees.items():
            times[name].append(once(tree, opts.args))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, tree in trees.items():
        print(f"{name:<9}  au-detect {' '.join(opts.args)}: median {medians[name]:.2f} s over {opts.repeats} runs "
              f"(min {min(times[name]):.2f}, max {max(times[name]):.2f})  {tree}")
    print(f"baseline / this tree: {medians['baseline'] / medians['this tree']:.1f}x")


if __name__ == "__main__":
    main()
