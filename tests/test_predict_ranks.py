"""``au-detect predict`` over two CPU ranks (gloo, Lightning's predict loop): the joined output equals
one process's, a killed rank's job run again finishes without a row twice, shares cut in order."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.io.sources import Source, expand
from datamodules.synthau.video import VideoSettings, clip_names, render_videos
from experiments.cli import main
from experiments.predict import run
from experiments.prediction_outputs import curves_path, events_path, people_path
from experiments.predict_ranks import SHARES_SUFFIX, PredictTrainer, cut_shares
from lightning_modules.serving.predictor import AUPredictor

from .training_helpers import video_predictor

ROOT = Path(__file__).resolve().parents[1]
TWO_RANKS = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Rows, not decisions, are compared."""
    return video_predictor().save(tmp_path_factory.mktemp("ranks") / "model")


def _inputs(synthau: Path, root: Path, clips: int, seconds: float) -> list[str]:
    """Photos, bad files, videos and photos after them, and a path that is not there."""
    folder = root / "mixed"
    folder.mkdir()
    photos = sorted((synthau / "images" / "test").glob("*.jpg"))
    for i, p in enumerate(photos[:5]):
        shutil.copy(p, folder / f"a{i}.jpg")
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "b_notes.jpg").write_text("not an image\n")
    render_videos(root / "clips", VideoSettings(clips=clips, people=(2, 3), seconds=seconds, fps=8.0, width=320,
                                                height=240, seed=5))
    for i in range(clips):
        shutil.copy(root / "clips" / clip_names(i)[0], folder / f"c{i}.avi")
    for i, p in enumerate(photos[5:8]):
        shutil.copy(p, folder / f"d{i}.jpg")
    (folder / "e_broken.mp4").write_bytes(os.urandom(2048))
    return [str(folder), str(root / "gone.jpg")]


def _one_process(model: Path, inputs: list[str], folder: Path) -> tuple[list[str], Path]:
    """The inputs and the reference, ``folder/one.csv``: one process, one thread (each of two ranks
    on two cores runs one: float sums over other thread counts differ in the last digits, ~6e-5
    at most here)."""
    out = folder / "one.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = AUPredictor.load(str(model), "cpu")
        predictor.detector.every = 10  # the detection prior, as the command's --detect_every has it
        run(predictor, inputs, str(out), batch_frames=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    return inputs, out


def _command(model: Path, inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cli", "predict", "--model", str(model), "--input", *inputs,
            "--out", str(out), "--batch_frames", "8", "--detect_every", "10", *TWO_RANKS, *extra]


def _assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns and rows in the same order: text equal, numbers (probabilities, boxes, frames,
    person ids) within 1e-5, missing where missing."""
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for column in want.columns:
        a, b = _typed(got[column]), _typed(want[column])
        if a.dtype == object or b.dtype == object:
            assert list(a) == list(b), column
        else:
            assert np.array_equal(np.isnan(a), np.isnan(b)), column
            assert np.nanmax(np.abs(a - b), initial=0.0) <= 1e-5, column


def _typed(values: pd.Series) -> np.ndarray:
    """A column as floats (missing: NaN) when every cell given is a number, else as text ("" missing)."""
    text = values.astype(object).where(values.notna(), "").astype(str)
    numbers = pd.to_numeric(text.where(text != "", None), errors="coerce")
    if numbers.notna().sum() == (text != "").sum():
        return numbers.to_numpy(float)
    return text.to_numpy(object)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False, dtype=str)


@pytest.mark.slow
def test_two_ranks_join_into_the_rows_of_one_process(model, synthau, tmp_path):
    inputs, reference = _one_process(model, _inputs(synthau, tmp_path, clips=1, seconds=3.0), tmp_path)
    out = tmp_path / "two.csv"
    done = subprocess.run(_command(model, inputs, out, "--share_images", "2"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks took shares: photos two at a time, the video whole
    assert "[rank 0] share" in done.stdout and "[rank 1] share" in done.stdout and "(video)" in done.stdout
    statuses = {r["status"] for r in csv.DictReader(reference.open(newline=""))}
    assert {"ok", "empty", "unreadable", "broken_video", "missing"} <= statuses
    got, want = _read(out), _read(reference)
    _assert_same_rows(got, want)
    assert list(got["source"]) == list(want["source"])  # input order, whatever rank did what
    assert events_path(out).read_text() == events_path(reference).read_text()
    assert people_path(out).read_text() == people_path(reference).read_text()
    assert sorted(p.name for p in curves_path(out).iterdir()) == sorted(p.name for p in curves_path(reference).iterdir())
    assert not out.with_name(out.name + SHARES_SUFFIX).exists() and not out.with_name(out.name + ".partial").exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
def test_a_killed_rank_job_run_again_finishes_with_no_row_twice(model, synthau, tmp_path):
    inputs, reference = _one_process(model, _inputs(synthau, tmp_path, clips=3, seconds=6.0), tmp_path)
    out = tmp_path / "rows.parquet"
    shares = out.with_name(out.name + SHARES_SUFFIX)
    command = _command(model, inputs, out, "--share_images", "3", "--checkpoint_s", "0")
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # a share done and one on its way: kill rank 1
            if list(shares.glob("*.done.json")) and list(shares.glob("*.resume.json")):
                break
            assert job.poll() is None, "the job ended before a rank could be killed"
            time.sleep(0.1)
        ranks = _children(job.pid)
        assert ranks, "no rank 1 process"
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        job.wait(timeout=120)  # Lightning ends the job when a rank dies
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0 and not out.exists()
    before = len(list(shares.glob("*.done.json")))
    assert before >= 1
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{before} of" in done.stdout and "shares done before" in done.stdout
    total = len(cut_shares(expand(inputs), 3))
    assert done.stdout.count("] share ") == total - before  # only the shares not done
    got, want = _read(out), _read(reference)
    _assert_same_rows(got, want)
    keys = list(zip(got["source"], got["frame"], got["face"]))
    assert len(keys) == len(set(keys))  # no row twice
    assert not shares.exists()


@pytest.mark.slow
def test_fewer_shares_than_ranks(model, synthau, tmp_path):
    """One photo, two ranks: the idle rank waits, the photo's row is written."""
    photo = sorted((synthau / "images" / "test").glob("*.jpg"))[0]
    out = tmp_path / "one.csv"
    done = subprocess.run(_command(model, [str(photo)], out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["source"] for r in csv.DictReader(out.open(newline=""))][:1] == [str(photo)]


def test_shares_keep_input_order_videos_whole():
    photo = [Source(f"p{i}.jpg", "image") for i in range(5)]
    video, broken = Source("v.mp4", "video"), Source("x.mp4", "video", error=ValueError("broken"))
    shares = cut_shares([*photo[:3], video, broken, *photo[3:]], share_images=2)
    assert [[s.path for s in sh.sources] for sh in shares] == [
        ["p0.jpg", "p1.jpg"], ["p2.jpg"], ["v.mp4"], ["x.mp4", "p3.jpg"], ["p4.jpg"]]
    assert [sh.video for sh in shares] == [False, False, True, False, False]
    with pytest.raises(ValueError, match="--share_images must be at least 1"):
        cut_shares(photo, 0)


def test_one_process_unless_ranks_are_asked_for(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not PredictTrainer().distributed
    assert PredictTrainer(devices=2).distributed and PredictTrainer(devices="auto").distributed
    assert PredictTrainer(num_nodes=2).distributed
    monkeypatch.setenv("WORLD_SIZE", "4")  # started by torchrun or SLURM
    assert PredictTrainer().distributed


@pytest.mark.parametrize("option, message", [
    (["--annotate", "drawn"], "--annotate: annotated copies are made by one process"),
    (["--device", "cpu"], "--device cpu: with --trainer.devices"),
])
def test_options_one_process_needs_are_refused_with_ranks(model, tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        main(["predict", "--model", str(model), "--input", str(tmp_path), "--out", str(tmp_path / "x.csv"),
              *TWO_RANKS, *option])
