"""The crop cache: the aligned faces of a manifest on disk, made once and shared by every loader worker.

The crops of a split go into one uint8 array on disk that every loader worker memory-maps, so
the pixels are shared between processes instead of copied. The cache is keyed by the manifest,
the images' paths (relative to its root) and bytes, and the settings (a copied project keeps its
caches; see :func:`cache_key`), and written to a hidden ``.<name>.partial`` folder that is
renamed into place only when complete, so a killed run never leaves a cache that looks finished.
The partial folder keeps a journal of the images done (after their crops reach the disk), one per
aligning process when the ranks of a distributed job share the images out: a killed alignment
resumes where it stopped instead of starting over. The report of a finished
cache records the size of its files and a crc32 of every chunk of crops: opening checks the
sizes and layout, reading a sample checks its chunk (once per process tree), and a damaged
cache is aligned again.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import mmap
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np

from datamodules.io import files
from datamodules.alignment.align import AlignmentSettings, FaceDetector, center_crop, crop_face, detection_copy
from datamodules.io.manifest import Manifest, is_url
from datamodules.alignment.ranks import Ranks
from datamodules.io.sources import Frame, Source, batches, frames

try:
    import fcntl
except ImportError:  # not on Windows: each run then aligns in a private folder
    fcntl = None

log = logging.getLogger(__name__)

# Statuses of a sample in the cache and the report.
FACE, NO_FACE, CENTER = "face", "no_face", "center"


def cache_key(manifest: Manifest, settings: AlignmentSettings, root: str | Path | None = None,
              recorded: ImageRecord | None = None) -> str:
    """Hash of what the crops depend on: the manifest file, each image's path relative to the root
    and its bytes, the settings.

    Nothing in it depends on where the project lies or on when its files were copied, so a copied
    or moved project finds its caches. Hashing every image's bytes is the slow way; ``recorded``
    (what a cache noted of its images) lets an image whose size and whole-second mtime match
    stand on the digest noted then.
    """
    return _identify(manifest, settings, root, [recorded] if recorded is not None else [])[0].key


# What a cache notes of its images, so that the next start hashes only those whose stat changed.
IMAGES = "images.json"
# Threads hashing images: hashlib releases the GIL, and a network filesystem answers reads in parallel.
HASH_THREADS = 8


# An mtime this close to now may be shared by a rewrite still to come (same second, same size):
# such an image's stat is not trusted by the next start (git's "racily clean" entries).
RACY_SECONDS, UNSURE = 2, -2


@dataclass
class ImageRecord:
    """Per manifest row: the image's size, whole-second mtime and blake2b of its bytes.

    A missing file is noted as size -1 and digest ``missing``, a URL as ``url`` (its address, in
    the manifest, is its identity). Whole seconds, because ``tar`` and some filesystems keep no
    more. ``layout`` hashes everything of the key but the bytes, to tell which records fit a manifest.
    An image written in the last :data:`RACY_SECONDS` is noted with mtime :data:`UNSURE`: it could
    still be rewritten within the same second at the same size, so the next start hashes it again.
    """

    layout: str
    key: str
    size: list[int]
    mtime: list[int]
    blake2b: list[str]

    def to_json(self) -> str:
        return json.dumps({"version": 1, **asdict(self)}, separators=(",", ":"))

    @classmethod
    def read(cls, path: Path) -> "ImageRecord | None":
        """The record in ``path``; None if there is none or it is unreadable (the images are hashed then)."""
        try:
            d = json.loads(path.read_text())
            if d["version"] != 1:
                return None
            record = cls(d["layout"], d["key"], d["size"], d["mtime"], d["blake2b"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        n = len(record.size)
        return record if len(record.mtime) == n and len(record.blake2b) == n else None


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _identify(manifest: Manifest, settings: AlignmentSettings, root: str | Path | None,
              recorded: Sequence[ImageRecord] = (), cache_dir: Path | None = None,
              name: str = "") -> tuple[ImageRecord, int]:
    """The key and image record of a manifest now, and how many images had to be hashed.

    An image is hashed unless a record of the same layout (given, or noted by a cache of ``name``
    in ``cache_dir``) noted its current size and mtime.
    """
    base = os.path.abspath(manifest.root_for(root).expanduser())
    head = hashlib.sha256()
    head.update(json.dumps(settings.cache_fields(), sort_keys=True).encode())
    head.update(json.dumps(list(manifest.aus)).encode())
    head.update(Path(manifest.path).read_bytes())
    names, paths = [], []
    for i in range(len(manifest)):
        p = manifest.resolve(i, root)
        paths.append(p)
        # Relative to the root: a copied or moved project keeps its names; an image outside the
        # root keeps its absolute path, which a copy of the project does not move either.
        rel = os.path.relpath(p, base) if not is_url(p) else p
        names.append(p if rel == ".." or rel.startswith(".." + os.sep) else rel)
    layout = head.copy()
    layout.update(json.dumps(names).encode())
    layout = layout.hexdigest()
    n = len(manifest)
    fits = [r for r in recorded if r.layout == layout and len(r.size) == n]
    if cache_dir is not None:
        fits += [r for r in _records(cache_dir, name, layout) if len(r.size) == n]
    size, mtime, digest = [-1] * n, [-1] * n, [""] * n
    todo: dict[str, list[int]] = {}  # path -> its rows: an image listed twice is read once
    for i, p in enumerate(paths):
        if is_url(p):
            digest[i] = "url"
            continue
        try:
            st = os.stat(p)
        except OSError:
            digest[i] = "missing"
            continue
        size[i], mtime[i] = st.st_size, int(st.st_mtime)
        for r in fits:
            if r.size[i] == size[i] and r.mtime[i] == mtime[i]:
                digest[i] = r.blake2b[i]
                break
        else:
            todo.setdefault(p, []).append(i)
    if todo:
        with ThreadPoolExecutor(min(HASH_THREADS, len(todo))) as pool:
            hashed = dict(zip(todo, pool.map(_safe_digest, todo)))
        for p, rows in todo.items():
            for i in rows:
                digest[i] = hashed[p]
                if hashed[p] == "missing":  # gone between the stat and the read
                    size[i] = mtime[i] = -1
    racy = int(time.time()) - RACY_SECONDS
    mtime = [UNSURE if m >= racy else m for m in mtime]
    key = head
    for ref, d in zip(names, digest):
        key.update(f"{ref}\0{d}\n".encode())
    return ImageRecord(layout, key.hexdigest(), size, mtime, digest), len(todo)


def _safe_digest(path: str) -> str:
    try:
        return _file_digest(path)
    except OSError:
        return "missing"


def _records(cache_dir: Path, name: str, layout: str) -> list[ImageRecord]:
    """The image records of ``layout`` that caches of ``name`` in ``cache_dir`` noted, finished or partial."""
    found = []
    escaped = glob.escape(name)
    for folder in itertools.chain(cache_dir.glob(f"{escaped}-*"), cache_dir.glob(f".{escaped}-*.partial")):
        try:  # the layout is near the start: the records of other settings are not parsed
            with open(folder / IMAGES, "rb") as f:
                if f'"layout":"{layout}"'.encode() not in f.read(256):
                    continue
        except OSError:
            continue
        record = ImageRecord.read(folder / IMAGES)
        if record is not None and record.layout == layout:
            found.append(record)
    return found


def _note_images(folder: Path, record: ImageRecord) -> None:
    """Note the images' stat in ``folder`` so that the next start hashes nothing; whole or not at
    all. A cache that cannot be written (a shared read-only one) is used as it is."""
    try:
        files.write_text(folder / IMAGES, record.to_json(), only_if_changed=True)
    except OSError as e:
        log.info("could not note the images' sizes and mtimes in %s (%s): the next start hashes them again",
                 folder, e)


# Crops hashed per checksum. Bytes rather than samples, so that the first read of a sample costs
# the same few milliseconds at any crop size (a 224 px crop is 147 KiB: 55 samples a chunk).
CHECKSUM_CHUNK_BYTES = 8 << 20
# Written into a cache whose crops failed their checksum while being read, so that the next
# align_manifest (au-detect prepare, fit) aligns it again instead of reusing it.
DAMAGED = "damaged.txt"


class CacheError(RuntimeError):
    """An alignment cache whose files do not match its report.

    ``align_manifest`` aligns such a cache again; anything that finds it later (a loader reading a
    chunk whose checksum fails) raises this. It can be made from its message alone, which is how
    loader workers re-raise an exception in the main process.
    """

    def __init__(self, message: str, folder: Path | None = None, problem: str | None = None):
        super().__init__(message)
        self.folder, self.problem = folder, problem


def _damaged(folder: Path, problem: str, marked: bool = True) -> CacheError:
    remedy = ("delete that folder or rerun `au-detect prepare` (or fit), which aligns it again" if marked
              else "delete that folder, then rerun `au-detect prepare` (or fit) to align it again")
    return CacheError(f"alignment cache {folder} is damaged: {problem}; {remedy}", folder, problem)


def crop_checksums(crops: np.ndarray, chunk: int) -> list[int]:
    """crc32 of every ``chunk`` samples of a crop array.

    crc32 is meant for accidental damage (a cut copy, a bad sector, a flipped bit), not tampering.
    Chosen for its cost: 2.0 GB/s on one core here against blake2b's 0.9, so verifying EmotioNet at
    224 px (150 GB) takes about 75 s of CPU instead of 170.
    """
    crops = np.asarray(crops)  # a plain view: hashing must not go through a checked memory map
    return [zlib.crc32(crops[i:i + chunk]) for i in range(0, len(crops), chunk)]


class _ChunkCheck:
    """Verifies crops.npy against the report's checksums, a chunk the first time it is read.

    The record of verified chunks is an anonymous shared mapping: loader workers forked after the
    split was opened share it, so a chunk is hashed once per process tree rather than once per
    worker. A process that unpickles the split (spawned workers) maps the file again and starts
    its own record.
    """

    def __init__(self, folder: Path, crops: np.ndarray, chunk: int, expected: Sequence[int]):
        self.folder, self.crops, self.chunk = folder, np.asarray(crops), chunk
        self.expected = list(expected)
        self._shared = mmap.mmap(-1, max(1, len(self.expected)))
        self.done = np.frombuffer(self._shared, np.uint8, count=len(self.expected))

    @classmethod
    def of(cls, folder: Path, crops: np.ndarray, report: dict) -> "_ChunkCheck | None":
        """The check a report asks for, or None for a cache written before checksums."""
        sums = report.get("crop_checksums")
        return None if sums is None else cls(folder, crops, int(sums["samples_per_chunk"]), sums["crc32"])

    def touch(self, index: Any) -> None:
        """Verify the chunks a ``crops[index]`` read touches (those not verified yet)."""
        n = len(self.crops)
        if isinstance(index, (int, np.integer)):  # a loader's path: one lookup once verified
            if -n <= index < n:
                c = int(index) % n // self.chunk
                if not self.done[c]:
                    self.verify([c])
            return
        chunks = np.unique(_rows(index, n) // self.chunk)
        self.verify(chunks[self.done[chunks] == 0])

    def verify(self, chunks: Sequence[int], first_only: bool = True) -> None:
        """Hash the given chunks; raise :class:`CacheError` (and mark the folder) on a mismatch."""
        bad = []
        for c in map(int, chunks):
            start = c * self.chunk
            if zlib.crc32(self.crops[start:start + self.chunk]) == self.expected[c]:
                self.done[c] = 1
            else:
                bad.append(c)
                if first_only:
                    break
        if bad:
            problem = _describe_chunks(bad, self.chunk, len(self.crops))
            raise _damaged(self.folder, problem, marked=_mark_damaged(self.folder, problem))


def _rows(index: Any, n: int) -> np.ndarray:
    """The sample rows ``crops[index]`` reads (out-of-range ones left to numpy to refuse)."""
    if isinstance(index, tuple):
        index = index[0] if index else slice(None)
    if isinstance(index, slice):
        return np.arange(*index.indices(n))
    if index is None or index is Ellipsis:
        return np.arange(n)
    rows = np.asarray(index)
    if rows.dtype == bool:  # a mask over samples, or over samples and pixels
        return np.flatnonzero(rows.reshape(len(rows), -1).any(1)) if rows.ndim else np.arange(n)
    if not np.issubdtype(rows.dtype, np.integer):
        return np.zeros(0, np.int64)
    rows = rows.ravel()
    return rows[(rows >= -n) & (rows < n)] % n


def _describe_chunks(bad: Sequence[int], chunk: int, n: int) -> str:
    spans = [f"chunk {c} (samples {c * chunk}-{min(n, (c + 1) * chunk) - 1})" for c in bad[:3]]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"the crops of {', '.join(spans)}{more} of crops.npy do not match their checksum"


def _mark_damaged(folder: Path, problem: str) -> bool:
    """Leave a note that the next align_manifest reads as "align again"; False if it cannot."""
    try:
        files.write_text(folder / DAMAGED, problem + "\n")
    except OSError:  # a read-only cache: the message says to delete it instead
        return False
    return True


class _CheckedCrops(np.memmap):
    """The crops memory map; reading samples through it verifies their chunks first.

    Views it returns are ordinary (unchecked) slices of the same mapping.
    """

    _check: _ChunkCheck | None = None

    def __getitem__(self, index: Any) -> Any:
        if self._check is not None:
            self._check.touch(index)
        return super().__getitem__(index)


def _read_report(path: Path) -> dict:
    try:
        report = json.loads((path / "report.json").read_text())
        AlignmentSettings.coerce(report["settings"])  # garbled settings fail here
        n, records = report["aligned"], report["samples"]
        if not isinstance(n, int) or not isinstance(report["aus"], list) or len(records) != n:
            raise ValueError(f"{n} samples aligned but {len(records)} sample records")
        _check_integrity_fields(report)
    except FileNotFoundError:
        raise _damaged(path, "report.json is missing") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise _damaged(path, f"report.json is unreadable ({type(e).__name__}: {e})") from None
    return report


def _check_integrity_fields(report: dict) -> None:
    """The file sizes and checksums a report records fit its counts (older caches have neither)."""
    files = report.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(v, int) for v in files.values())):
        raise ValueError(f"file sizes {files!r} are not byte counts")
    sums = report.get("crop_checksums")
    if sums is not None:
        n, chunk = report["aligned"], sums["samples_per_chunk"]
        if not (isinstance(chunk, int) and chunk > 0 and len(sums["crc32"]) == -(-n // chunk)):
            raise ValueError(f"{len(sums['crc32'])} checksums for {n} samples in chunks of {chunk}")


def _check_size(path: Path, name: str, want: int | None) -> None:
    try:
        got = (path / name).stat().st_size
    except FileNotFoundError:
        raise _damaged(path, f"{name} is missing") from None
    if want is not None and got != want:
        raise _damaged(path, f"{name} has {got} bytes, its report says {want} (truncated or overwritten)")


def _read_samples(path: Path, report: dict) -> dict[str, np.ndarray]:
    """samples.npz's arrays, checked against the report (zip's own crc32 covers their bytes)."""
    _check_size(path, "samples.npz", report.get("files", {}).get("samples.npz"))
    n, k = report["aligned"], len(report["aus"])
    try:
        with np.load(path / "samples.npz") as z:
            arrays = {name: z[name] for name in ("labels", "mask", "face_found", "lines")}
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _damaged(path, f"samples.npz is unreadable ({type(e).__name__}: {e})") from None
    shapes = {name: a.shape for name, a in arrays.items()}
    if shapes != {"labels": (n, k), "mask": (n, k), "face_found": (n,), "lines": (n,)}:
        raise _damaged(path, f"samples.npz holds {shapes}, the report {n} samples of {k} AUs")
    return arrays


def _npy_layout(file: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, Fortran order and data offset from an .npy header."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"unexpected .npy version {version}")
        shape, fortran, dtype = readers[version](f)
        return shape, dtype, fortran, f.tell()


def _map_crops(path: Path, report: dict, checked: bool) -> tuple[np.memmap, _ChunkCheck | None]:
    """crops.npy memory-mapped once its header and size match the report, and its lazy check."""
    n, size = report["aligned"], report["settings"]["crop_size"]
    file = path / "crops.npy"
    _check_size(path, "crops.npy", report.get("files", {}).get("crops.npy"))
    try:
        shape, dtype, fortran, offset = _npy_layout(file)
    except (ValueError, EOFError) as e:
        raise _damaged(path, f"crops.npy has no valid header ({e})") from None
    if shape != (n, size, size, 3) or dtype != np.uint8 or fortran:
        raise _damaged(path, f"crops.npy holds {shape} {dtype}, the report {n} crops of {size} px")
    # Caches written before the report recorded sizes are checked against the size their header implies.
    want = offset + n * size * size * 3
    if file.stat().st_size != want:
        raise _damaged(path, f"crops.npy has {file.stat().st_size} bytes, {want} expected (truncated)")
    crops = np.load(file, mmap_mode="r")
    check = _ChunkCheck.of(path, crops, report) if checked else None
    if check is None:
        return crops, None
    crops = crops.view(_CheckedCrops)
    crops._check = check
    return crops, check


@dataclass
class AlignedSplit:
    """An opened cache: crops memory-mapped, labels in memory, the report as written.

    Opening checks what is cheap (the report and samples.npz parse and agree, crops.npy has the
    recorded size and layout); the crops' checksums are verified a chunk at a time as samples are
    read, or all at once by :meth:`verify`. Either raises :class:`CacheError`.
    """

    path: Path
    crops: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    labels: np.ndarray  # (N, K) float32 0/1
    mask: np.ndarray  # (N, K) bool, True where labelled
    face_found: np.ndarray  # (N,) bool, False where the center crop stood in
    lines: np.ndarray  # (N,) manifest line of each sample
    report: dict
    checks: _ChunkCheck | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.crops)

    def __getstate__(self) -> dict:
        # Pickling (spawned loader workers) must not copy the pixels: the worker maps the file again
        # and keeps its own record of verified chunks.
        state = dict(self.__dict__)
        state["crops"] = None
        state["checks"] = self.checks is not None
        return state

    def __setstate__(self, state: dict) -> None:
        checked = state.pop("checks")
        self.__dict__.update(state)
        self.crops, self.checks = _map_crops(self.path, self.report, checked)

    @classmethod
    def open(cls, path: str | Path, check_crops: bool = True) -> "AlignedSplit":
        """Open a finished cache; ``check_crops=False`` reads crops without verifying their checksums."""
        path = Path(path)
        report = _read_report(path)
        if (path / DAMAGED).is_file():
            raise _damaged(path, (path / DAMAGED).read_text().strip() + " (found while reading it earlier)")
        arrays = _read_samples(path, report)
        crops, checks = _map_crops(path, report, check_crops)
        return cls(path, crops, arrays["labels"], arrays["mask"], arrays["face_found"], arrays["lines"], report,
                   checks)

    def verify(self) -> bool:
        """Hash every chunk of crops now; raise :class:`CacheError` naming all that fail.

        Returns False when the cache was written before crops had checksums (nothing to verify).
        """
        check = self.checks or _ChunkCheck.of(self.path, self.crops, self.report)
        if check is None:
            return False
        check.verify(range(len(check.expected)), first_only=False)
        return True


def align_manifest(manifest: Manifest, cache_dir: str | Path, settings: AlignmentSettings = AlignmentSettings(),
                   root: str | Path | None = None, name: str | None = None, workers: int = 0,
                   device: str | None = None, detector: FaceDetector | None = None,
                   progress: bool = False, checkpoint_every: int = 1024, ranks: Ranks | None = None) -> Path:
    """Align every image of a manifest into a cache folder; return that folder (reused if present).

    ``workers`` threads decode images ahead of detection (0: each batch is decoded when its turn
    comes); at most 64 MP of them are held at once, so huge photos cannot exhaust memory. With a
    GPU, a few workers keep it fed.

    Rows whose image is missing or cannot be decoded are left out and listed in the report; an
    image without a detectable face gets the center crop, flagged ``no_face``.

    Every ``checkpoint_every`` images the crops are flushed and journalled: an interrupted call
    leaves ``.<cache name>.partial`` behind, and the next call with the same manifest and settings
    aligns only the rest. A second process aligning the same cache at the same time (e.g. another
    job) works in a private folder; the first to finish wins.

    ``ranks``: the processes of a distributed job (:class:`~datamodules.alignment.ranks.Ranks`), every one
    calling with the same manifest. The images are then shared out: rank 0 holds the partial
    folder, each rank aligns every ``world``-th batch of the images still to do (on its own GPU
    when there are GPUs: the same batches one process would detect) and journals them, and rank 0 writes the same cache one process would. ``cache_dir`` must
    be a folder every rank sees (a shared filesystem across nodes). A killed rank ends the job
    (torchrun and Lightning stop the others); the rerun, with any number of ranks, aligns only
    what no journal holds.

    The cache found is the one of the images' bytes: a project copied or moved with its cache
    folder reuses it (images whose size or mtime the cache did not note are read once to compare).

    A finished cache that fails the cheap checks of :meth:`AlignedSplit.open`, or that a reader
    marked when a chunk failed its checksum, is deleted (with a warning naming it and what was
    wrong) and aligned again.
    """
    ranks = ranks or Ranks()
    cache_dir = Path(cache_dir)
    name = name or Path(manifest.path).stem
    key = final = work = lock = plan = None
    try:
        if ranks.rank == 0:  # decides for every rank: which folder, which images are left
            try:
                record, hashed = _identify(manifest, settings, root, cache_dir=cache_dir, name=name)
                if hashed:
                    log.info("%s: hashed %d of %d images (their size or mtime is not what a cache noted)",
                             manifest.path, hashed, len(manifest))
                key = record.key
                final = cache_dir / f"{name}-{key[:16]}"
                work, lock, todo = _start(manifest, final, settings)
                # The folder that is or becomes the cache notes the images' stat now: a cache copied
                # without its mtimes is hashed once, then found by its stat again.
                _note_images(work if work is not None else final, record)
                plan = (final, work, todo)
            except Exception as e:
                ranks.broadcast(f"{type(e).__name__}: {e}")  # the others raise too instead of waiting
                raise
        plan = ranks.broadcast(plan)
        if isinstance(plan, str):
            raise RuntimeError(f"aligning {manifest.path} failed on rank 0: {plan}")
        final, work, todo = plan
        if progress and ranks.rank == 0 and todo is not None and len(todo) < len(manifest):
            print(f"  resuming: {len(manifest) - len(todo)}/{len(manifest)} images aligned before", flush=True)
        if todo is not None:
            if ranks.distributed:
                _check_shared(work, ranks)
            start = time.perf_counter()
            _align_rows(manifest, work, _share(todo, settings.batch_size, ranks), settings, root, workers, device or ranks.device(),
                        detector, progress, checkpoint_every, ranks)
            ranks.barrier()  # every share journalled
            if ranks.rank == 0:
                _finish_cache(manifest, work, key, settings, resumed=len(manifest) - len(todo),
                              elapsed=time.perf_counter() - start, ranks=ranks.world)
        if ranks.rank == 0 and work is not None:
            _publish(work, final)
    finally:
        if ranks.rank == 0:
            _release(lock)
            if lock is None and work is not None and work.exists():  # a private folder is not resumed
                shutil.rmtree(work, ignore_errors=True)
    ranks.barrier()  # the cache is in place before any rank opens it
    return final


def _start(manifest: Manifest, final: Path, settings: AlignmentSettings) -> tuple[Path | None, int | None, Any]:
    """Where the alignment of ``final`` stands: (work folder, its lock, the rows to align).

    No work folder: ``final`` is intact. No rows: the work folder holds a finished cache that was
    not renamed yet. The lock (None for a private folder) is the caller's to release.
    """
    if _problem(final) is None:
        return None, None, None
    final.parent.mkdir(parents=True, exist_ok=True)
    work, lock = _claim(final.parent / f".{final.name}.partial")
    try:
        problem = _problem(final)
        if problem is None:  # finished by another process while we waited
            _release(lock)
            if lock is None:
                shutil.rmtree(work, ignore_errors=True)
            return None, None, None
        if final.exists() and (lock is not None or fcntl is None):  # else the lock's holder discards it
            _discard(final, problem)
        if (work / "report.json").is_file() and (problem := _problem(work)) is not None:
            log.warning("%s: the finished alignment in %s is damaged (%s); aligning again", manifest.path, work,
                        problem)
            (work / "report.json").unlink()
        if (work / "report.json").is_file():  # complete but not yet renamed
            return work, lock, None
        done = _resume(work, len(manifest), settings.crop_size)
    except BaseException:
        _release(lock)
        if lock is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    todo = np.flatnonzero(~done)
    if len(todo) < len(manifest):
        log.info("%s: resuming an interrupted alignment, %d of %d images done before", manifest.path,
                 len(manifest) - len(todo), len(manifest))
    return work, lock, todo


def _share(todo: np.ndarray, batch_size: int, ranks: Ranks) -> np.ndarray:
    """This rank's images: whole detection batches, cut at fixed rows of the manifest (row //
    batch_size), every ``world``-th one, so that each rank gets the same mix of large and small
    images whatever order the manifest has. MTCNN's result for an image moves a little with the
    images that share its batch; with batches fixed by the manifest (and journalled whole), a
    shared or resumed alignment detects the same batches as one uninterrupted process.

    >>> _share(np.array([0, 1, 2, 3, 4, 5, 6, 8, 9]), 3, Ranks(1, 2)).tolist()
    [3, 4, 5, 9]
    """
    return todo[(todo // batch_size) % ranks.world == ranks.rank]


def _check_shared(work: Path, ranks: Ranks) -> None:
    """Every rank sees rank 0's work folder, or every rank says which do not."""
    seen = ranks.gather(work.is_dir())
    if not all(seen):
        missing = [r for r, ok in enumerate(seen) if not ok]
        raise RuntimeError(f"ranks {missing} do not see the alignment folder {work} that rank 0 made: the cache "
                           "folder must be on a filesystem every node shares (or align on one node first)")


def _problem(folder: Path) -> str | None:
    """What is wrong with a finished cache folder (None when it is intact, as far as is cheap to check)."""
    if not folder.is_dir():
        return "missing"
    try:
        report = AlignedSplit.open(folder, check_crops=False).report
    except CacheError as e:
        return e.problem
    if "crop_checksums" not in report:
        log.info("alignment cache %s predates crop checksums: its sizes are checked, its bytes are not "
                 "(delete it to align again with checksums)", folder)
    return None


def _discard(folder: Path, problem: str) -> None:
    """Remove a damaged cache (under the partial folder's lock where there are locks, so that a
    cache another process has just realigned is not taken for the damaged one).

    Deleted rather than kept aside: a full disk is a common cause, and a second copy of a large
    cache would make its realignment fail the same way.
    """
    log.warning("alignment cache %s is damaged (%s): removing it and aligning again", folder, problem)
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.damaged-", dir=folder.parent))
    try:
        os.replace(folder, aside)  # frees the name at once, whatever the removal below leaves
    except FileNotFoundError:  # without locks (Windows) another process may have removed it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _publish(work: Path, final: Path) -> None:
    try:
        os.replace(work, final)
    except OSError:
        # Another process finished the same cache first (e.g. two ranks): theirs is identical.
        if _problem(final) is not None:
            raise
        shutil.rmtree(work, ignore_errors=True)


def _claim(partial: Path) -> tuple[Path, int | None]:
    """The shared partial folder, locked for this process; or a private one if another holds it."""
    if fcntl is not None:
        partial.mkdir(exist_ok=True)
        fd = os.open(partial, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(partial).st_ino == os.fstat(fd).st_ino:  # not renamed away meanwhile
                return partial, fd
        except OSError:
            pass
        os.close(fd)
    return Path(tempfile.mkdtemp(prefix=f"{partial.name[:-len('.partial')]}.tmp-", dir=partial.parent)), None


def _release(lock: int | None) -> None:
    if lock is not None:
        os.close(lock)  # closing the descriptor drops the flock


# The journal of an alignment: one per writing process, a line per flushed chunk of images.
JOURNAL = "progress.jsonl"


def _journal_name(ranks: Ranks) -> str:
    return JOURNAL if not ranks.distributed else f"progress.rank{ranks.rank}.jsonl"


def _read_journals(out: Path, n: int, truncate: bool = False):
    """What the journals in ``out`` hold: per image whether it is done and its report record,
    and the unreadable rows. ``truncate`` drops a line torn by a kill from its file."""
    done = np.zeros(n, bool)
    records: list[dict | None] = [None] * n
    unreadable: list[dict] = []
    for journal in sorted(out.glob("progress*.jsonl")):
        valid = 0
        with open(journal, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # the torn last line of a kill: those images are aligned again
                idx = np.asarray(entry["indices"], dtype=np.int64)
                done[idx] = True
                for i, rec in zip(idx.tolist(), entry["records"]):
                    records[i] = rec
                unreadable += entry["unreadable"]
                valid += len(line)
        if truncate:
            os.truncate(journal, valid)
    return done, records, unreadable


def _resume(out: Path, n: int, size: int) -> np.ndarray:
    """Make ``out`` ready to align into: the crops of an interrupted run are kept when its journals
    and crops.npy fit this manifest, else it starts empty. Returns which images are done."""
    crops_path = out / "crops.npy"
    journals = list(out.glob("progress*.jsonl"))
    if journals and crops_path.is_file():
        try:
            shape, dtype, _, _ = _npy_layout(crops_path)
            if shape == (n, size, size, 3) and dtype == np.uint8:
                return _read_journals(out, n, truncate=True)[0]
        except (OSError, ValueError, EOFError):
            pass
    for journal in journals:
        journal.unlink()
    # A sparse file of the final size, header written: the writers fill in their rows.
    np.lib.format.open_memmap(crops_path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
    (out / JOURNAL).write_bytes(b"")
    return np.zeros(n, bool)


class _CropWriter:
    """Writes crops into their rows of crops.npy with positioned writes.

    Not through a memory map: ranks on other nodes write other rows of the same file over a
    shared filesystem, and a mapped page holding the end of one rank's row and the start of
    another's would be written back whole by both.
    """

    def __init__(self, path: Path):
        shape, _, _, self.offset = _npy_layout(path)
        self.row = int(np.prod(shape[1:]))
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, i: int, crop: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(crop, dtype=np.uint8)).cast("B")
        if len(data) != self.row:
            raise ValueError(f"a crop of {len(data)} bytes for rows of {self.row}")
        at = self.offset + i * self.row
        while data:
            written = os.pwrite(self.fd, data, at)
            data, at = data[written:], at + written

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _align_rows(manifest: Manifest, out: Path, rows: np.ndarray, settings: AlignmentSettings, root, workers: int,
                device, detector: FaceDetector | None, progress: bool, checkpoint_every: int, ranks: Ranks) -> None:
    """Align the images of ``rows`` into ``out``'s crops.npy, journalling them a chunk at a time."""
    centered = settings.method == "center"
    size = settings.crop_size
    detector = None if centered or not len(rows) else detector or FaceDetector(settings, device)
    # The decoder prediction uses (allowlist, pixel limit), in threads, ahead of detection and
    # bounded in pixels as well as in count: a folder of 50 MP photos holds a few at a time.
    images = [Source(manifest.resolve(int(i), root), "image", key=int(i)) for i in rows]
    prepare = None if centered else partial(detection_copy, max_side=settings.detect_max_side)
    decoded = frames(images, workers=workers, prepare=prepare, ahead=2 * settings.batch_size)
    writer = _CropWriter(out / "crops.npy")
    block_ends = set(rows[np.r_[np.diff(rows // settings.batch_size) != 0, True]].tolist()) if len(rows) else set()
    journal = out / _journal_name(ranks)
    who = f"rank {ranks.rank}: " if ranks.distributed else ""
    start, count = time.perf_counter(), 0
    chunk: dict[str, list] = {"indices": [], "records": [], "unreadable": []}  # done since the last journal line

    def commit() -> None:
        if not chunk["indices"]:
            return
        writer.sync()  # the crops first: a journalled image is on disk
        with open(journal, "a") as f:
            f.write(json.dumps(chunk) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for v in chunk.values():
            v.clear()

    try:
        for items in _manifest_batches(decoded, settings.batch_size):
            good = [f for f in items if f.pixels is not None]
            for f in items:
                if f.error is not None:
                    i = f.source.key
                    chunk["unreadable"].append({"line": int(manifest.lines[i]), "image": manifest.images[i],
                                                "error": str(f.error)})
            groups: dict[tuple, list[Frame]] = {}
            for f in good:
                groups.setdefault(f.copy[0].shape if f.copy else (), []).append(f)
            done: dict[int, dict] = {}
            if centered:
                for f in good:
                    i = f.source.key
                    writer.write(i, center_crop(f.pixels, size))
                    done[i] = {"line": int(manifest.lines[i]), "image": manifest.images[i], "status": CENTER}
                groups = {}
            for group in groups.values():
                dets = detector.detect_copies([f.copy[0] for f in group], [f.copy[1] for f in group])
                for f, det in zip(group, dets):
                    i = f.source.key
                    rec = {"line": int(manifest.lines[i]), "image": manifest.images[i], "faces": len(det)}
                    if len(det):
                        j = det.pick(settings.selection)
                        writer.write(i, crop_face(f.pixels, det.boxes[j], det.landmarks[j], settings))
                        rec.update(status=FACE, box=det.boxes[j].round(1).tolist(),
                                   landmarks=det.landmarks[j].round(1).tolist(), score=round(float(det.scores[j]), 4))
                    else:
                        writer.write(i, center_crop(f.pixels, size))
                        rec.update(status=NO_FACE)
                    done[i] = rec
            for f in items:
                chunk["indices"].append(f.source.key)
                chunk["records"].append(done.get(f.source.key))  # None: unreadable
            for f in good:  # released before the next batch is decoded
                f.pixels = f.copy = None
            if len(chunk["indices"]) >= checkpoint_every and items[-1].source.key in block_ends:
                commit()  # whole blocks only: a resumed run detects the batches an uninterrupted one would
            count += len(items)
            if progress:
                step = max(1, len(rows) // 10)
                tty = sys.stdout.isatty()
                if tty or count // step != (count - len(items)) // step or count == len(rows):
                    rate = count / max(time.perf_counter() - start, 1e-9)
                    print(f"{chr(13) if tty else ''}  {who}aligned {count}/{len(rows)} ({rate:.1f} images/s)",
                          end="" if tty else "\n", flush=True)
        if progress and sys.stdout.isatty():
            print()
        commit()
    finally:
        writer.close()


def _manifest_batches(decoded: Iterable[Frame], batch_size: int) -> Iterator[list[Frame]]:
    """Detection batches that never cross a block of the manifest (row // batch_size, see
    :func:`_share`); within a block, :func:`~datamodules.io.sources.batches` cuts them by size and pixels."""
    for _, block in itertools.groupby(decoded, key=lambda f: f.source.key // batch_size):
        yield from batches(block, batch_size)


def _finish_cache(manifest: Manifest, out: Path, key: str, settings: AlignmentSettings, resumed: int,
                  elapsed: float, ranks: int = 1) -> None:
    """The cache from the journals of every writer: compacted crops, samples, checksums, report."""
    n, size = len(manifest), settings.crop_size
    done, records, unreadable = _read_journals(out, n)
    if not done.all():  # every rank passed the barrier, so a gap is a bug, not a kill
        raise RuntimeError(f"alignment of {manifest.path}: {int((~done).sum())} images were not journalled "
                           f"(first: line {int(manifest.lines[np.flatnonzero(~done)[0]])})")
    keep = np.array([r is not None for r in records], bool)
    found = np.array([r is not None and r["status"] == FACE for r in records], bool)
    kept = np.flatnonzero(keep)
    if len(kept) < n:  # compact: unreadable rows leave no hole in the array
        crops = np.load(out / "crops.npy", mmap_mode="r")
        compact = np.lib.format.open_memmap(out / "crops.tmp.npy", mode="w+", dtype=np.uint8,
                                            shape=(len(kept), size, size, 3))
        for j in range(0, len(kept), 1024):
            compact[j:j + 1024] = crops[kept[j:j + 1024]]
        compact.flush()
        del crops, compact
        os.replace(out / "crops.tmp.npy", out / "crops.npy")
    np.savez(out / "samples.npz", labels=manifest.labels[kept], mask=manifest.mask[kept],
             face_found=found[kept], lines=manifest.lines[kept])
    for file in ("crops.npy", "samples.npz"):  # on the disk before a report vouches for them
        files.sync(out / file)
    final_crops = np.load(out / "crops.npy", mmap_mode="r")
    chunk = max(1, CHECKSUM_CHUNK_BYTES // (size * size * 3))
    samples = [records[i] for i in kept]
    unreadable.sort(key=lambda r: r["line"])
    n_face = int(found.sum())
    report = {
        "manifest": str(manifest.path),
        "key": key,
        "settings": asdict(settings),
        "aus": list(manifest.aus),
        "images": n,
        "aligned": len(kept),
        "faces_found": n_face,
        "no_face": len(kept) - n_face,
        "unreadable": len(unreadable),
        "face_rate": round(n_face / max(len(kept), 1), 4),
        "multiple_faces": sum(r.get("faces", 0) > 1 for r in samples),
        "resumed": resumed,  # images taken over from an interrupted run
        "ranks": ranks,  # processes that aligned (this run's part)
        "seconds": round(elapsed, 2),
        "images_per_second": round((n - resumed) / max(elapsed, 1e-9), 2),
        "skipped_rows": unreadable,
        "no_face_rows": [{"line": r["line"], "image": r["image"]} for r in samples if r["status"] == NO_FACE],
        "samples": samples,
        # What opening the cache checks: the files' sizes, and a crc32 per chunk of crops for reads.
        "files": {file: (out / file).stat().st_size for file in ("crops.npy", "samples.npz")},
        "crop_checksums": {"algorithm": "crc32", "samples_per_chunk": chunk,
                           "crc32": crop_checksums(final_crops, chunk)},
    }
    aligned_sheet(AlignedSplit(out, final_crops, manifest.labels[kept], manifest.mask[kept], found[kept],
                               manifest.lines[kept], report), out / "aligned_sheet.png")
    # Last, and whole: a torn report must not mark a cache complete. The journals go after it, so
    # that a kill in between leaves a finished cache (published by the next call), not a restart.
    files.write_text(out / "report.json", json.dumps(report, indent=1))
    for journal in out.glob("progress*.jsonl"):
        journal.unlink()


def summarize(report: dict) -> str:
    """One line for a console: what alignment did to a split."""
    if report["settings"].get("method") == "center":
        return (f"{Path(report['manifest']).name}: {report['images']} images center-cropped (no detection), "
                f"{report['unreadable']} unreadable, {report['images_per_second']} images/s")
    return (f"{Path(report['manifest']).name}: {report['images']} images, {report['faces_found']} faces found "
            f"({100 * report['face_rate']:.1f}%), {report['no_face']} center-cropped, "
            f"{report['unreadable']} unreadable, {report['images_per_second']} images/s")


def aligned_sheet(split: AlignedSplit, path: str | Path, n: int = 48, cols: int = 12) -> None:
    """A grid of aligned crops with the template landmarks drawn; no-face fallbacks in red."""
    idx = np.linspace(0, len(split) - 1, min(n, len(split))).astype(int)
    tiles = []
    settings = AlignmentSettings.coerce(split.report["settings"])
    template = settings.template() if settings.method == "mtcnn" else []  # the others warp no landmarks
    for i in idx:
        tile = np.ascontiguousarray(split.crops[i][..., ::-1])
        for p in template:
            cv2.circle(tile, (int(p[0]), int(p[1])), 1, (0, 255, 0), -1)
        if not split.face_found[i] and settings.method != "center":
            cv2.rectangle(tile, (0, 0), (tile.shape[1] - 1, tile.shape[0] - 1), (0, 0, 255), 2)
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)], 0)
    cv2.imwrite(str(path), grid)
