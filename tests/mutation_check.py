"""Mutants of the method's core, each run against the quick tier: every one must be caught.

    python -m tests.mutation_check              # all mutants, a table of what caught each
    python -m tests.mutation_check --only mask sampler  # those whose name holds "mask" or "sampler"

Each mutant is one small change of the code (the label mask ignored, the thresholds replaced by
0.5, the sampler's seed or epoch dropped, the selective weights' ratio swapped, a count of the
metrics off by one) made in a copy of the checkout (``git worktree``, the working tree's changes
applied), then the quick tier runs there (``pytest -m "not slow" -x``): the test files likeliest
to catch it first, alone, and the whole quick tier when they pass. A mutant is caught when a test fails; one that passes
the whole quick tier survives, and the check fails naming it. Tests that start ``au-detect`` as a
subprocess run the installed (unmutated) code: only the quick tier's in-process tests count here.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # the file changed, relative to the checkout
    old: str  # the text replaced (exactly once)
    new: str
    first: tuple[str, ...]  # test files run first


MUTANTS = (
    Mutant("validation ignores the mask", "lightning_modules/au_detector.py",
           'self.val_metrics.update(probs, batch["labels"], batch["mask"],',
           'self.val_metrics.update(probs, batch["labels"], torch.ones_like(batch["mask"]),',
           ("tests/test_logged_figures.py", "tests/test_au_detector.py")),
    Mutant("test ignores the mask", "lightning_modules/au_detector.py",
           'self.test_metrics.update(probs, batch["labels"], batch["mask"],',
           'self.test_metrics.update(probs, batch["labels"], torch.ones_like(batch["mask"]),',
           ("tests/test_logged_figures.py", "tests/test_au_detector.py")),
    Mutant("test decides at 0.5, not the fitted thresholds", "lightning_modules/au_detector.py",
           "thresholds=self.thresholds,", "thresholds=torch.full_like(self.thresholds, 0.5),",
           ("tests/test_logged_figures.py", "tests/test_au_detector.py")),
    Mutant("the masked BCE counts unlabelled entries", "lightning_modules/losses.py",
           'reduction="none")\n        weight = mask.to(bce.dtype)\n        return',
           'reduction="none")\n        weight = torch.ones_like(bce)\n        return',
           ("tests/test_losses.py",)),
    Mutant("selective weights count unlabelled entries", "lightning_modules/losses.py",
           "labelled = mask\n", "labelled = torch.ones_like(mask)\n",
           ("tests/test_losses.py", "tests/test_selective_prior.py")),
    Mutant("sampler draws the same list every epoch", "datamodules/sampling.py",
           "manual_seed(self.seed + int(epoch))", "manual_seed(self.seed)",
           ("tests/test_sampling.py", "tests/test_ddp_sampling.py")),
    Mutant("sampler ignores its seed", "datamodules/sampling.py",
           "manual_seed(self.seed + int(epoch))", "manual_seed(int(epoch))",
           ("tests/test_sampling.py", "tests/test_ddp_sampling.py")),
    Mutant("selective weights' ratio swapped", "lightning_modules/losses.py",
           "ratio = torch.where(pos_minority, (1 - t) / t, t / (1 - t))",
           "ratio = torch.where(pos_minority, t / (1 - t), (1 - t) / t)",
           ("tests/test_losses.py", "tests/test_selective_prior.py")),
    Mutant("selective learning keeps one majority entry more", "lightning_modules/losses.py",
           "kept_majority = is_majority & (rank < n_keep)", "kept_majority = is_majority & (rank <= n_keep)",
           ("tests/test_losses.py", "tests/test_selective_prior.py")),
    Mutant("F1 forgets the false negatives", "lightning_modules/metrics.py",
           "2 * tp / np.maximum(2 * tp + fp + fn, 1)", "2 * tp / np.maximum(2 * tp + fp, 1)",
           ("tests/test_metrics.py",)),
    Mutant("accuracy forgets the true negatives", "lightning_modules/metrics.py",
           "(tp + tn) / np.maximum(support, 1)", "tp / np.maximum(support, 1)",
           ("tests/test_metrics.py",)),
    Mutant("ranked counts: one false positive fewer", "lightning_modules/metrics.py",
           "fp = np.arange(1, s.size + 1, dtype=np.int64) - tp", "fp = np.arange(0, s.size, dtype=np.int64) - tp",
           ("tests/test_metrics.py", "tests/test_soft_threshold.py")),
)


def checkout_copy(into: Path) -> Path:
    """A worktree of HEAD with the working tree's tracked changes applied, and the virtualenv linked."""
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(into), "HEAD"], cwd=ROOT, check=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, check=True, capture_output=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=into, input=diff, check=True)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
    for name in untracked:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, into / name)
    return into


def run_mutant(copy: Path, mutant: Mutant, timeout: float) -> tuple[str, str, float]:
    """``(outcome, what caught it, seconds)``: ``caught`` with the first failing test, ``survived``,
    or ``broken`` (the change did not apply, or pytest could not run)."""
    target = copy / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        return "broken", f"{mutant.path}: the text to change is there {original.count(mutant.old)} times", 0.0
    target.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        # The likeliest files first, alone (seconds); the rest of the quick tier only if they pass.
        # (A file or two in this process; the quick tier on the workers, as the suite runs.)
        for paths, workers in ((mutant.first, "0"), (("tests",), "auto")):
            done = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-x", "-q", "-p",
                                   "no:cacheprovider", "--no-header", "-rf", "-n", workers, *paths],
                                  cwd=copy, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        return "broken", f"no answer in {timeout:.0f} s", time.perf_counter() - start
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - start
    if done.returncode == 0:
        return "survived", "the whole quick tier passed", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    if done.returncode == 1 and failed:
        return "caught", failed[0], seconds
    return "broken", f"pytest exit {done.returncode}: {done.stdout[-500:]}{done.stderr[-500:]}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="run the mutants whose name holds one of these texts")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one mutant's quick tier may take")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(text in m.name for text in args.only)]
    work = Path(tempfile.mkdtemp(prefix="mutants_"))
    copy = checkout_copy(work / "tree")
    (copy / ".venv").symlink_to(ROOT / ".venv")
    results = []
    try:
        for mutant in chosen:
            outcome, why, seconds = run_mutant(copy, mutant, args.timeout)
            results.append((mutant, outcome, why, seconds))
            print(f"{outcome:8s} {mutant.name} ({seconds:.0f} s): {why}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(copy)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print("\n| mutant | file | outcome | caught by | seconds |\n|---|---|---|---|---|")
    for mutant, outcome, why, seconds in results:
        print(f"| {mutant.name} | `{mutant.path}` | {outcome} | {why} | {seconds:.0f} |")
    bad = [m.name for m, outcome, *_ in results if outcome != "caught"]
    if bad:
        print(f"\nnot caught: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
