"""Cost curves of the data pipeline as the data grows: time and memory against N, and how they grow.

One table per stage, one row per size; the last row of each table is the growth exponent, the
least-squares slope of log(cost) on log(N) over the sizes (1: linear; N log N over 10k..1M reads
about 1.1). An exponent above 1.15 is flagged: worse than N log N. Each measurement of the first
three stages runs in a fresh process, so its memory is its own: "peak RSS" is ``ru_maxrss`` after
the stage (its high-water mark reset just before, through /proc/self/clear_refs) less the RSS
before it, so imports and inputs are left out; "Python peak" is tracemalloc's peak (Python
objects and numpy arrays, not torch's tensors). Times are medians of ``--repeats`` runs (the
first run's memory is the one reported).

* manifest: ``read_manifest`` of an N-row manifest in EmotioNet form (the header SynthAU
  writes: image, the 23 AUs as 0/1/999, identity, expression), in a process with lightning
  imported like the training process. The labels follow SynthAU's label model
  (``synthetic_labels``); the image column holds paths that do not exist, since parsing never
  opens an image.
* sampler: ``MultilabelBalancedSampler`` over N such label rows: construction (the weights), the
  first epoch (construction plus the draw, which is what a training start waits for) and a later
  epoch's draw (``list(sampler)``).
* thresholds: the validation epoch end of ``SoftThresholdCallback`` on N rows of predictions:
  ``fit_thresholds``, ``au_scores`` at the fitted thresholds and ``heldout_scores``.
* loader: memory of ``AUDataModule``'s training loader (balanced sampling, augmentation, batch 64)
  over a crop cache of C crops at 64 px, written in the files ``AlignedSplit.open`` reads, one full
  epoch with 0, 2 and 4 workers. Per process, from /proc/<pid>/smaps_rollup at its largest during
  the epoch: RSS, PSS (shared pages divided among the processes mapping them), USS (pages no other
  process maps, which includes the crops' pages only this worker happened to read: page cache,
  not copies), private dirty (pages it copied or allocated: what a worker costs), and how much of
  crops.npy its RSS maps (page cache, counted once for the machine). "Rank" is the training
  process (one per DDP rank); "all processes PSS" is their sum, the job's memory. The exponents
  are over the cache sizes: a worker's private dirty memory should not grow with the cache (about
  0). A second table shows what a worker copies once a full garbage collection runs in it, and
  that ``gc.freeze()`` at its start prevents that.
* alignment: ``align_manifest`` over S SynthAU scenes with 0, 1 and 2 decoding threads, as
  ``benchmarks/alignment_throughput.py`` times it (its ``ours``), in this process.

``--baseline REV`` adds rows for the manifest, sampler and thresholds stages with the project's
modules as they were at git revision REV (e.g. ``HEAD`` before a change is committed), side by
side with the working tree in the same run, and their ratio.

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--quick] [--baseline HEAD]
        [--cache-sizes 25000 100000] [--scenes 75 150 300] [--skip-loader] [--skip-alignment]
        [--out scale.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Project modules are imported inside the functions that use them: a child process measuring a
# baseline revision must put that revision's code first on the path before anything is imported.

FLAG_EXPONENT = 1.15  # N log N over 10k..1M fits about 1.1; above this a stage grows worse
MB = 2**20
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000, 100_000)
CACHE_SIZES = (25_000, 100_000)  # 0.3 and 1.2 GB of 64 px crops
QUICK_CACHE_SIZES = (2_000, 8_000)
SCENES = (75, 150, 300)
QUICK_SCENES = (20, 40, 80)
LOADER_WORKERS = (0, 2, 4)
ALIGN_WORKERS = (0, 1, 2)


# -- growth -----------------------------------------------------------------------------------

def growth_exponent(sizes: Sequence[float], costs: Sequence[float]) -> float:
    """Slope of log(cost) on log(size), least squares; nan where a cost is not positive.

    >>> round(growth_exponent([10, 100, 1000], [3, 300, 30000]), 6)
    2.0
    """
    x, y = np.asarray(sizes, float), np.asarray(costs, float)
    if len(x) < 2 or not (y > 0).all():
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def _exponent_cell(sizes: Sequence[float], costs: Sequence[float], flag: bool) -> str:
    e = growth_exponent(sizes, costs)
    return f"**{e:.2f}** (> {FLAG_EXPONENT})" if flag and e > FLAG_EXPONENT else f"{e:.2f}"


def print_table(title: str, size_name: str, sizes: Sequence[int], columns: dict[str, Sequence[float]],
                fmt: str = ".3f", flag: Sequence[str] | None = None, no_exponent: Sequence[str] = ()) -> None:
    """Markdown: a row per size, then the growth exponent of every column.

    ``flag``: the columns whose exponent is bold above FLAG_EXPONENT (default: all);
    ``no_exponent``: columns without one (ratios).
    """
    names = list(columns)
    flag = names if flag is None else flag
    print(f"\n{title}\n")
    print("| " + " | ".join([size_name, *names]) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in [size_name, *names]) + "|")
    for i, n in enumerate(sizes):
        print("| " + " | ".join([f"{n:,}", *(f"{columns[c][i]:{fmt}}" for c in names)]) + " |")
    cells = ["" if c in no_exponent else _exponent_cell(sizes, columns[c], c in flag) for c in names]
    print("| " + " | ".join(["exponent", *cells]) + " |")


# -- data -------------------------------------------------------------------------------------

def label_table(n: int, seed: int = 0, pool: int = 4096) -> np.ndarray:
    """(n, 23) int16 manifest values 0/1/999 after SynthAU's label model, made in C time.

    The active AUs of each row are one of ``pool`` faces drawn by ``sample_aus`` (the expression
    model); each entry is then left unlabelled (999) with ``sample_labels``' per-AU rates, so rows
    are as varied as the model makes them.
    """
    from datamodules.io.manifest import EMOTIONET_AUS, UNLABELLED
    from datamodules.synthau.labels import UNLABELLED_RATE, UNLABELLED_RATE_DEFAULT, sample_aus

    rng = np.random.default_rng(seed)
    active = (sample_aus(rng)[1] for _ in range(pool))
    faces = np.array([[au in face for au in EMOTIONET_AUS] for face in active], dtype=np.int16)
    rates = np.array([UNLABELLED_RATE.get(au, UNLABELLED_RATE_DEFAULT) for au in EMOTIONET_AUS])
    out = np.empty((n, len(EMOTIONET_AUS)), np.int16)
    for i in range(0, n, 65536):  # in blocks: no (n, 23) float64 temporary inflating a child's baseline
        block = faces[rng.integers(0, pool, min(65536, n - i))]
        block[rng.random(block.shape) < rates] = UNLABELLED
        out[i:i + len(block)] = block
    return out


def label_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (labels float32 0/1, mask bool) a manifest of ``label_table(n, seed)`` parses to."""
    from datamodules.io.manifest import UNLABELLED

    values = label_table(n, seed)
    return (values == 1).astype(np.float32), values != UNLABELLED


def write_scale_manifest(path: Path, n: int, seed: int = 0) -> dict[str, list[int]]:
    """An n-row manifest with SynthAU's header; returns per AU the positives and unlabelled
    entries written, which parsing must give back."""
    from datamodules.io.manifest import EMOTIONET_AUS, UNLABELLED, au_column_name

    values = label_table(n, seed)
    text = np.array(["0", "1", "999"], dtype=object)
    header = ["image", *(au_column_name(a) for a in EMOTIONET_AUS), "identity", "expression"]
    expressions = ("neutral", "happiness", "sadness", "surprise", "fear", "anger", "disgust", "contempt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for start in range(0, n, 65536):
            block = values[start:start + 65536]
            cells = text[np.where(block == UNLABELLED, 2, block)].tolist()
            f.writelines(f"images/{i:07d}.jpg\t" + "\t".join(row) + f"\tid{i % 5000:04d}\t{expressions[i % 8]}\n"
                         for i, row in enumerate(cells, start))
    return {"positives": (values == 1).sum(0).tolist(), "unlabelled": (values == UNLABELLED).sum(0).tolist()}


def validation_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs float32, labels float32 with 999 unlabelled, mask): predictions that lean towards
    the labels, with the float32 ties a network's sigmoid gives."""
    from datamodules.io.manifest import UNLABELLED

    values = label_table(n, seed)
    rng = np.random.default_rng(seed + 1)
    probs = np.empty(values.shape, np.float32)
    for i in range(0, n, 65536):
        block = values[i:i + 65536]
        probs[i:i + len(block)] = 0.35 * (block == 1) + 0.65 * rng.random(block.shape, dtype=np.float32)
    return probs, values.astype(np.float32), values != UNLABELLED


def write_crop_cache(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """A finished crop cache of n crops in the files ``AlignedSplit.open`` reads (crops.npy,
    samples.npz, report.json with the sizes and crc32 checksums), as ``align_manifest`` writes
    one for the ``center`` method; the crops are noise, the labels ``label_arrays``'."""
    from dataclasses import asdict

    from datamodules.alignment.align import AlignmentSettings
    from datamodules.alignment.crop_cache import CHECKSUM_CHUNK_BYTES, crop_checksums
    from datamodules.io.manifest import EMOTIONET_AUS

    settings = AlignmentSettings(crop_size=size, method="center")
    folder.mkdir(parents=True)
    crops = np.lib.format.open_memmap(folder / "crops.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    tile = np.random.default_rng(seed).integers(0, 256, (1024, size, size, 3), dtype=np.uint8)
    for i in range(0, n, len(tile)):
        crops[i:i + len(tile)] = tile[:n - i]
    crops.flush()
    del crops
    labels, mask = label_arrays(n, seed)
    np.savez(folder / "samples.npz", labels=labels, mask=mask, face_found=np.zeros(n, bool),
             lines=np.arange(2, n + 2, dtype=np.int64))
    samples = [{"line": i + 2, "image": f"images/{i:07d}.jpg", "status": "center"} for i in range(n)]
    chunk = max(1, CHECKSUM_CHUNK_BYTES // (size * size * 3))
    report = {
        "manifest": str(folder / "train.tsv"), "key": "scale-benchmark", "settings": asdict(settings),
        "aus": list(EMOTIONET_AUS), "images": n, "aligned": n, "faces_found": 0, "no_face": n, "unreadable": 0,
        "face_rate": 0.0, "multiple_faces": 0, "resumed": 0, "seconds": 0.0, "images_per_second": 0.0,
        "skipped_rows": [], "no_face_rows": [], "samples": samples,
        "files": {name: (folder / name).stat().st_size for name in ("crops.npy", "samples.npz")},
        "crop_checksums": {"algorithm": "crc32", "samples_per_chunk": chunk,
                           "crc32": crop_checksums(np.load(folder / "crops.npy", mmap_mode="r"), chunk)},
    }
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    return folder


# -- measurements (each meant for a fresh process) --------------------------------------------

def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _start_peak() -> float:
    """The RSS now, in MB, with the peak reset to it where Linux allows (/proc/self/clear_refs):
    ``_max_rss_mb() - _start_peak()`` is then the stage's own peak, not the imports'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return _max_rss_mb()  # the peak so far stands; the difference may understate the stage's
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def _median_time(run: Callable[[], Any], repeats: int, first: float) -> float:
    """Median seconds of ``run`` over ``repeats`` runs, the first already timed."""
    return statistics.median([first, *(_timed(run)[0] for _ in range(repeats - 1))])


def measure_manifest(path: str, repeats: int = 3) -> dict:
    """Parse time, peak RSS above the process before it, and what the parse found; in a process
    with lightning imported, as AUDataModule reads manifests (the heap's size is what Python's
    garbage collections walk)."""
    import lightning  # noqa: F401

    from datamodules.io.manifest import read_manifest

    base = _start_peak()
    first, m = _timed(lambda: read_manifest(path))
    peak = _max_rss_mb() - base
    found = {"rows": len(m), "positives": m.labels.sum(0).astype(int).tolist(),
             "unlabelled": (~m.mask).sum(0).tolist()}
    del m
    return {"seconds": _median_time(lambda: read_manifest(path), repeats, first), "peak_rss_mb": peak, **found}


def measure_manifest_python_peak(path: str) -> dict:
    """tracemalloc's peak while parsing (Python objects and numpy arrays)."""
    from datamodules.io.manifest import read_manifest

    tracemalloc.start()
    m = read_manifest(path)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"python_peak_mb": peak / MB, "python_result_mb": current / MB, "rows": len(m)}


def measure_sampler(n: int, repeats: int = 3) -> dict:
    from datamodules.sampling import MultilabelBalancedSampler

    labels, mask = label_arrays(n)
    base = _start_peak()
    construct, sampler = _timed(lambda: MultilabelBalancedSampler(labels, mask, seed=0))
    draw, indices = _timed(lambda: list(sampler))
    peak = _max_rss_mb() - base
    assert len(indices) == n
    del indices
    return {"construct_s": construct, "first_epoch_s": construct + draw,
            "draw_s": _median_time(lambda: list(sampler), repeats, draw), "peak_rss_mb": peak}


def measure_thresholds(n: int, repeats: int = 3) -> dict:
    import torch

    from callbacks.soft_threshold import fit_thresholds, heldout_scores
    from lightning_modules.metrics import au_scores

    probs, labels, mask = validation_arrays(n)
    index = np.arange(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the shared machine's figures are steadier
    try:
        au_scores(probs[:64], labels[:64], mask[:64])  # torchmetrics' first call sets itself up: not N's cost
        base = _start_peak()
        fit, thresholds = _timed(lambda: fit_thresholds(probs, labels, mask))
        scores, _ = _timed(lambda: au_scores(probs, labels, mask, thresholds))
        heldout, _ = _timed(lambda: heldout_scores(probs, labels, mask, index))
        peak = _max_rss_mb() - base
        return {"fit_s": _median_time(lambda: fit_thresholds(probs, labels, mask), repeats, fit),
                "au_scores_s": _median_time(lambda: au_scores(probs, labels, mask, thresholds), repeats, scores),
                "heldout_s": _median_time(lambda: heldout_scores(probs, labels, mask, index), repeats, heldout),
                "peak_rss_mb": peak}
    finally:
        torch.set_num_threads(threads)


def process_memory(pid: int, mapped: str | None = None) -> dict[str, float]:
    """MB of a process: rss, pss, uss (private clean + dirty), private_dirty, and ``mapped_rss``:
    the RSS of the mappings of the file ``mapped`` (from /proc/<pid>/smaps)."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    out = {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"],
           "private_dirty": fields["Private_Dirty"], "mapped_rss": 0.0}
    if mapped is not None:
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) == 6 and head[5] == mapped
            elif inside and line.startswith("Rss:"):
                out["mapped_rss"] += int(line.split()[1]) / 1024
    return out


def _collect_at_start(worker_id: int) -> None:
    gc.collect()  # a full collection, as Python runs one now and then in a long-lived worker


def _freeze_then_collect(worker_id: int) -> None:
    gc.freeze()  # the parent's objects leave the collector's lists: collections no longer write to them
    gc.collect()


WORKER_GC = {"": None, "collect": _collect_at_start, "freeze": _freeze_then_collect}


def measure_loader(folder: str, workers: int, batch_size: int = 64, every: int = 25, batches: int | None = None,
                   worker_gc: str = "") -> dict:
    """An epoch (or ``batches`` batches) of AUDataModule's training loader over an opened cache;
    per process, the largest of each memory figure seen (every ``every`` batches and at the end).
    ``worker_gc``: what each worker does first (see WORKER_GC)."""
    from datamodules.au_datamodule import AUDataModule
    from datamodules.alignment.crop_cache import AlignedSplit

    dm = AUDataModule(num_workers=workers, batch_size=batch_size, balanced_sampling=True, pin_memory=False)
    dm.splits["train"] = AlignedSplit.open(folder)  # what setup() opens, without aligning anything
    crops = str((Path(folder) / "crops.npy").resolve())
    loader = dm.train_dataloader()
    loader.worker_init_fn = WORKER_GC[worker_gc]
    start = time.perf_counter()
    it = iter(loader)
    pids = {"rank": os.getpid(), **{f"worker {i}": w.pid for i, w in enumerate(getattr(it, "_workers", []))}}
    peak: dict[str, dict[str, float]] = {name: {} for name in pids}

    def sample() -> None:
        for name, pid in pids.items():
            for key, value in process_memory(pid, crops).items():
                peak[name][key] = max(value, peak[name].get(key, 0.0))

    samples = 0
    for i, batch in enumerate(it):
        samples += len(batch["index"])
        if i % every == 0:
            sample()
        if batches is not None and i + 1 >= batches:
            break
    sample()
    seconds = time.perf_counter() - start
    return {"workers": workers, "crops": len(dm.splits["train"]), "samples": samples, "seconds": seconds,
            "crops_mb": os.path.getsize(crops) / MB, "worker_gc": worker_gc, "processes": peak}


def measure_alignment(root: Path, scenes: Sequence[int], workers: Sequence[int], repeats: int) -> dict:
    """Scenes/s of align_manifest over the first n scenes of a SynthAU, per decoding-thread
    count; medians of ``repeats`` runs, the settings alternating (a slow spell hits them alike)."""
    from benchmarks.alignment_throughput import ours
    from benchmarks.compare import alternate
    from datamodules.alignment.align import AlignmentSettings
    from datamodules.io.manifest import read_manifest

    manifest = read_manifest(root / "train.tsv")
    faces = {json.loads(line)["image"]: json.loads(line) for line in (root / "faces.jsonl").read_text().splitlines()}
    truth = [faces[ref]["faces"][0]["box"] for ref in manifest.images]
    variants = {(n, w): (lambda n=n, w=w: ours(manifest.subset(np.arange(n)), truth[:n], AlignmentSettings(), w))
                for n in scenes for w in workers}
    first = min(scenes)
    ours(manifest.subset(np.arange(first)), truth[:first], AlignmentSettings(), 0)  # first-call costs: no size's
    results = alternate(variants, repeats)
    return {f"{n}/{w}": {"scenes": n, "workers": w, "scenes_per_s": statistics.median(r[0] for r in runs),
                         "detection_rate": runs[0][1]} for (n, w), runs in results.items()}


CHILD_STAGES = {"manifest": measure_manifest, "manifest_python_peak": measure_manifest_python_peak,
                "sampler": measure_sampler, "thresholds": measure_thresholds, "loader": measure_loader}


def run_child(stage: str, code: str | None = None, **kwargs: Any) -> dict:
    """``stage``'s measurement in a fresh Python process (``code``: a folder whose packages come
    first on its path, e.g. a baseline revision's); its result is the last line it prints."""
    spec = json.dumps({"stage": stage, "code": code, "kwargs": kwargs})
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} {kwargs} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(spec: str) -> None:
    spec = json.loads(spec)
    if spec["code"]:
        sys.path.insert(0, spec["code"])
    print(json.dumps(CHILD_STAGES[spec["stage"]](**spec["kwargs"])))


def export_revision(rev: str, into: Path) -> Path:
    """The project's packages as they were at git revision ``rev``, in ``into`` (for baselines)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "datamodules",
                              "lightning_modules", "callbacks"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into)
    if not (into / "datamodules" / "io" / "manifest.py").is_file():  # the stages import the subpackage layout
        raise SystemExit(f"--baseline {rev}: that revision has the flat layout from before the subpackages "
                         f"(datamodules/manifest.py); a baseline must be at or after commit 1bc8598")
    return into


# -- stages: measure every size, print the table ----------------------------------------------

def _versions(baseline: Path | None, rev: str | None) -> dict[str, str | None]:
    """The code each stage runs: the working tree (""), and the baseline revision when asked for."""
    return {"": None, **({rev: str(baseline)} if baseline else {})}


def _print_stage(title: str, sizes: Sequence[int], results: dict[str, list[dict]],
                 figures: dict[str, str]) -> None:
    """A table of ``figures`` (result key: column label) per version; with a baseline, each
    figure's column at the baseline revision follows it, then baseline / working tree."""
    columns: dict[str, list[float]] = {}
    ratios = []
    for key, label in figures.items():
        for version, rs in results.items():
            columns[f"{label} @{version}" if version else label] = [r[key] for r in rs]
        if len(results) == 2:
            ours, base = results.values()
            ratios.append(f"{label}: {list(results)[1]} / now")
            columns[ratios[-1]] = [b[key] / max(o[key], 1e-9) for o, b in zip(ours, base)]
    print_table(title, "rows", sizes, columns, flag=[c for c in columns if c not in ratios],
                no_exponent=ratios)


def stage_manifest(tmp: Path, sizes: Sequence[int], repeats: int, versions: dict) -> dict:
    results: dict[str, list[dict]] = {v: [] for v in versions}
    for n in sizes:
        path = tmp / f"manifest-{n}.tsv"
        written = write_scale_manifest(path, n)
        for version, code in versions.items():
            r = run_child("manifest", code, path=str(path), repeats=repeats)
            r.update(run_child("manifest_python_peak", code, path=str(path)))
            if (r["rows"], r["positives"], r["unlabelled"]) != (n, written["positives"], written["unlabelled"]):
                raise AssertionError(f"{version or 'working tree'}: {path} parsed to other rows or labels than "
                                     "were written")
            results[version].append(r)
        path.unlink()
    _print_stage("manifest: read_manifest of a 23-AU manifest with identity and expression columns (MB above "
                 "the process before it: peak RSS by ru_maxrss, Python peak by tracemalloc)", sizes, results,
                 {"seconds": "parse s", "peak_rss_mb": "peak RSS MB", "python_peak_mb": "Python peak MB"})
    return results


def stage_sampler(sizes: Sequence[int], repeats: int, versions: dict) -> dict:
    results = {v: [run_child("sampler", code, n=n, repeats=repeats) for n in sizes] for v, code in versions.items()}
    _print_stage("sampler: MultilabelBalancedSampler (first epoch = construction + draw; peak RSS MB above the "
                 "labels)", sizes, results,
                 {"construct_s": "construct s", "first_epoch_s": "first epoch s", "draw_s": "later draw s",
                  "peak_rss_mb": "peak RSS MB"})
    return results


def stage_thresholds(sizes: Sequence[int], repeats: int, versions: dict) -> dict:
    results = {v: [run_child("thresholds", code, n=n, repeats=repeats) for n in sizes]
               for v, code in versions.items()}
    _print_stage("thresholds: validation epoch end on N rows x 23 AUs, one thread (peak RSS MB above the inputs)",
                 sizes, results, {"fit_s": "fit_thresholds s", "au_scores_s": "au_scores s",
                                  "heldout_s": "heldout_scores s", "peak_rss_mb": "peak RSS MB"})
    return results


def _workers_of(r: dict) -> list[dict[str, float]]:
    return [p for name, p in r["processes"].items() if name != "rank"]


def stage_loader(tmp: Path, cache_sizes: Sequence[int], workers: Sequence[int], gc_batches: int = 60) -> list[dict]:
    rows, gc_rows = [], []
    busiest = max(workers)
    for n in cache_sizes:
        folder = write_crop_cache(tmp / f"cache-{n}", n)
        rows += [run_child("loader", None, folder=str(folder), workers=w) for w in workers]
        if busiest:
            gc_rows += [run_child("loader", None, folder=str(folder), workers=busiest, batches=gc_batches,
                                  worker_gc=mode) for mode in ("collect", "freeze")]
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    print("\nloader: AUDataModule's training loader, one epoch (balanced sampling, augmentation, batch 64) over "
          "64 px crops; MB at the largest during the epoch; worker columns: the largest over the workers\n")
    print("| crops | cache MB | workers | samples/s | rank RSS | rank PSS | worker RSS | worker PSS | worker USS "
          "| worker private dirty | crops mapped per worker | all processes PSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rank, ws = r["processes"]["rank"], _workers_of(r)
        worst = [f"{max(p[k] for p in ws):.0f}" if ws else "-"
                 for k in ("rss", "pss", "uss", "private_dirty", "mapped_rss")]
        total = sum(p["pss"] for p in r["processes"].values())
        print(f"| {r['crops']:,} | {r['crops_mb']:.0f} | {r['workers']} | {r['samples'] / r['seconds']:.0f} "
              f"| {rank['rss']:.0f} | {rank['pss']:.0f} | {' | '.join(worst)} | {total:.0f} |")
    print()
    for w in workers:  # what grows with the cache, the crops' page cache aside
        at = [r for r in rows if r["workers"] == w]
        sizes = [r["crops"] for r in at]
        if len(at) < 2:
            continue
        rank = [r["processes"]["rank"]["rss"] - r["processes"]["rank"]["mapped_rss"] for r in at]
        line = f"- {w} workers, growth exponent over the cache sizes: the rank's RSS less the crops it maps " \
               f"{growth_exponent(sizes, rank):.2f}"
        if w:
            dirty = [max(p["private_dirty"] for p in _workers_of(r)) for r in at]
            line += f"; a worker's private dirty memory {growth_exponent(sizes, dirty):.2f}"
        print(line)
    if gc_rows:
        print(f"\nloader workers after a full garbage collection ({busiest} workers, {gc_batches} batches): a "
              "collection writes to every object it tracks, so the pages a worker shares with its parent become "
              "its own copies; gc.freeze() first leaves the parent's objects out of it\n")
        print("| crops | worker private dirty, epoch as above | after gc.collect() | gc.freeze() then gc.collect() |")
        print("|---|---|---|---|")
        for n in cache_sizes:
            epoch = max(p["private_dirty"] for r in rows if r["crops"] == n and r["workers"] == busiest
                        for p in _workers_of(r))
            after = {r["worker_gc"]: max(p["private_dirty"] for p in _workers_of(r)) for r in gc_rows
                     if r["crops"] == n}
            print(f"| {n:,} | {epoch:.0f} | {after['collect']:.0f} | {after['freeze']:.0f} |")
    return rows + gc_rows


def stage_alignment(tmp: Path, scenes: Sequence[int], workers: Sequence[int], repeats: int) -> dict:
    from datamodules.synthau.generate import SynthAUSettings, generate_synthau

    root = tmp / "synthau"
    generate_synthau(root, SynthAUSettings(num_images=max(scenes), seed=123, val_fraction=0, test_fraction=0))
    results = measure_alignment(root, scenes, workers, repeats)
    columns = {f"seconds, {w} thread(s)": [n / results[f"{n}/{w}"]["scenes_per_s"] for n in scenes] for w in workers}
    rates = {f"scenes/s, {w} thread(s)": [results[f"{n}/{w}"]["scenes_per_s"] for n in scenes] for w in workers}
    print_table(f"alignment: align_manifest on 640x480 SynthAU scenes by decoding threads (median of {repeats}, "
                "after a warm-up call)", "scenes", scenes, {**columns, **rates}, fmt=".2f", no_exponent=list(rates))
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"manifest rows (default {SIZES})")
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for a fast look: {QUICK_SIZES}, caches {QUICK_CACHE_SIZES}, "
                             f"scenes {QUICK_SCENES}")
    parser.add_argument("--cache-sizes", type=int, nargs="+", help=f"crops per cache (default {CACHE_SIZES})")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=list(LOADER_WORKERS))
    parser.add_argument("--scenes", type=int, nargs="+", help=f"SynthAU scenes to align (default {SCENES})")
    parser.add_argument("--align-workers", type=int, nargs="+", default=list(ALIGN_WORKERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--baseline", metavar="REV", help="also run the manifest, sampler and thresholds stages "
                                                          "with the modules at this git revision")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--skip-alignment", action="store_true")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return {}
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    cache_sizes = args.cache_sizes or (QUICK_CACHE_SIZES if args.quick else CACHE_SIZES)
    scenes = args.scenes or (QUICK_SCENES if args.quick else SCENES)
    out: dict[str, Any] = {"sizes": list(sizes)}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        tmp = Path(tmp)
        baseline = export_revision(args.baseline, tmp / "baseline") if args.baseline else None
        versions = _versions(baseline, args.baseline)
        start = time.perf_counter()
        out["manifest"] = stage_manifest(tmp, sizes, args.repeats, versions)
        out["sampler"] = stage_sampler(sizes, args.repeats, versions)
        out["thresholds"] = stage_thresholds(sizes, args.repeats, versions)
        if not args.skip_loader:
            out["loader"] = stage_loader(tmp, cache_sizes, args.loader_workers)
        if not args.skip_alignment:
            out["alignment"] = stage_alignment(tmp, scenes, args.align_workers, args.repeats)
        print(f"\n{time.perf_counter() - start:.0f} s in all; {os.cpu_count()} CPUs")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
