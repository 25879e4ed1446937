"""Alignment shared out over the processes of a torchrun job (2 CPU ranks, gloo), killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datamodules.alignment.crop_cache import AlignedSplit, align_manifest
from datamodules.io.manifest import read_manifest
from datamodules.alignment.ranks import Ranks

from datamodules.alignment.align import AlignmentSettings

from .training_helpers import free_port

BIN = Path(sys.executable).parent
SETTINGS = AlignmentSettings(crop_size=64, batch_size=4)  # small batches: a kill lands between journal lines


def _manifest_with_bad_rows(synthau: Path, folder: Path, rows: int = 40) -> Path:
    """The first ``rows`` training rows, plus a missing and an undecodable image in between."""
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines = (synthau / "train.tsv").read_text().splitlines()
    header, body = lines[0], lines[1:rows + 1]
    assert header.startswith("image\t")

    def pointing_to(line: str, image: str) -> str:
        return "\t".join([image, *line.split("\t")[1:]])

    body = [pointing_to(line, str(synthau / line.split("\t")[0])) for line in body]
    body.insert(7, pointing_to(body[0], str(folder / "missing.jpg")))
    body.insert(23, pointing_to(body[1], str(folder / "broken.jpg")))
    path = folder / "part.tsv"
    path.write_text("\n".join([header, *body]) + "\n")
    return path


def _torchrun(manifest: Path, cache: Path, *extra: str) -> subprocess.Popen:
    port = free_port()
    return subprocess.Popen(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "--no-python", str(BIN / "au-detect"), "align", "--manifests", f"[{manifest}]", "--cache_dir", str(cache),
         "--alignment.crop_size", str(SETTINGS.crop_size), "--alignment.batch_size", str(SETTINGS.batch_size), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the process torchrun started as ``rank`` (read from its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _journalled(folder: Path) -> int:
    return sum(len(json.loads(line)["indices"]) for journal in folder.glob("*.partial/progress*.jsonl")
               for line in journal.read_text().splitlines() if line.endswith("}"))


@pytest.mark.slow
def test_two_ranks_align_the_cache_one_process_writes_and_survive_a_killed_rank(synthau, tmp_path):
    """torchrun, 2 CPU ranks: rank 1 is SIGKILLed mid-way (torchrun stops rank 0 too); the rerun
    aligns only what no journal holds, and the cache equals one uninterrupted process's: the same
    samples, report records and skipped rows (the ranks detect the same batches), crops within
    one grey level (thread counts move MTCNN's float results)."""
    manifest = _manifest_with_bad_rows(synthau, tmp_path / "data")
    cache = tmp_path / "cache"
    job = _torchrun(manifest, cache, "--checkpoint_every", "4")
    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None and _journalled(cache) < 6:
        time.sleep(0.05)
    assert job.poll() is None, f"the alignment ended before a rank could be killed:\n{job.stdout.read()[-3000:]}"
    victim = _rank_pid(job.pid, 1)  # with --no-python, the ranks are torchrun's own children
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    job.wait(120)
    assert job.returncode != 0
    kept = _journalled(cache)
    assert 6 <= kept < 42 and not any(cache.glob("part-*/report.json"))

    rerun = _torchrun(manifest, cache)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    assert "aligning with 2 processes" in out and f"resuming: {kept}/42" in out
    (folder,) = [p for p in cache.iterdir()]  # no partial folder left behind
    two = AlignedSplit.open(folder)
    assert two.report["ranks"] == 2 and two.report["resumed"] == kept

    one = AlignedSplit.open(align_manifest(read_manifest(manifest), tmp_path / "single", SETTINGS))
    assert two.path.name == one.path.name  # the same key: same manifest, images and settings
    assert len(one) == len(two) == 40
    np.testing.assert_array_equal(two.labels, one.labels)
    np.testing.assert_array_equal(two.mask, one.mask)
    np.testing.assert_array_equal(two.lines, one.lines)
    np.testing.assert_array_equal(two.face_found, one.face_found)
    assert two.report["samples"] == one.report["samples"]
    assert two.report["skipped_rows"] == one.report["skipped_rows"] and len(one.report["skipped_rows"]) == 2
    assert np.abs(two.crops.astype(int) - one.crops.astype(int)).max() <= 1
    two.verify()


def test_one_rank_shares_nothing():
    """Without a process group, the ranks are one process, which aligns every image."""
    from datamodules.alignment.crop_cache import _share

    ranks = Ranks.current()
    assert (ranks.rank, ranks.world, ranks.distributed) == (0, 1, False)
    np.testing.assert_array_equal(_share(np.arange(5), 2, ranks), np.arange(5))
    assert ranks.broadcast("x") == "x" and ranks.gather(3) == [3]
