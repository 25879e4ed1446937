"""``au-detect predict --out rows.parquet``: the rows of the CSV, typed, read back by pandas and
pyarrow equal to the CSV of the same run; written in row groups; a cell that does not parse named."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules.alignment.align import AlignmentSettings
from datamodules.synthau.video import VideoSettings, clip_names, render_videos
from experiments.predict import events_path, run
from lightning_modules.au_detector import AUNet
from lightning_modules.serving.parquet_rows import column_type, csv_to_parquet, row_schema
from lightning_modules.serving.predictor import AUPredictor

from .training_helpers import interrupted_after

AUS = [1, 12, 25]


@pytest.fixture(scope="module")
def predictor() -> AUPredictor:
    torch.manual_seed(0)
    net = AUNet(AUS, "resnet18", ["face"], intensity=True).eval()
    spec = {"aus": AUS, "backbone": "resnet18", "branches": ["face"], "aux_heads": False, "intensity": True}
    return AUPredictor(net, AlignmentSettings(crop_size=64, min_face_size=20), spec, device="cpu")


@pytest.fixture(scope="module")
def inputs(synthau, tmp_path_factory) -> list[str]:
    """Photos with faces, one whose name a spreadsheet would run and that needs CSV quoting, a
    short clip of people, a missing file and a damaged one."""
    root = tmp_path_factory.mktemp("parquet_inputs")
    photos = sorted((synthau / "images" / "test").glob("*.jpg"))[:4]
    for p in photos:
        shutil.copy(p, root / p.name)
    shutil.copy(photos[0], root / '=1+1, "quoted".jpg')
    (root / "damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    render_videos(root / "clips", VideoSettings(clips=1, people=(2, 2), seconds=3.0, fps=8.0, width=320,
                                                height=240, seed=3), workers=1)
    return [str(root / p.name) for p in photos] + [str(root / '=1+1, "quoted".jpg'), str(root / "missing.jpg"),
                                                   str(root / "damaged.jpg"), str(root / "clips" / clip_names(0)[0])]


def _csv_frame(path: Path, header: list[str]) -> pd.DataFrame:
    """The CSV read with the Parquet schema's types, by hand: empty numeric cells null."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    data = {}
    for name in header:
        kind = column_type(name)
        cells = [r[name] for r in rows]
        if kind == pa.string():
            data[name] = pd.array(cells, dtype="string")
        elif kind == pa.float64():
            data[name] = pd.array([float(c) if c != "" else None for c in cells], dtype="Float64")
        else:
            data[name] = pd.array([int(c) if c != "" else None for c in cells],
                                  dtype="Int8" if kind == pa.int8() else "Int64")
    return pd.DataFrame(data)


def test_parquet_rows_equal_the_csv_of_the_same_run(predictor, inputs, tmp_path):
    csv_out, parquet_out = tmp_path / "rows.csv", tmp_path / "rows.parquet"
    run(predictor, inputs, str(csv_out), progress=False, csv_formulas="keep")
    run(predictor, inputs, str(parquet_out), progress=False)
    assert not (tmp_path / "rows.parquet.partial").exists()
    with open(csv_out, newline="") as f:
        header = next(csv.reader(f))
    expected = _csv_frame(csv_out, header)
    statuses = set(expected["status"])
    assert {"ok", "missing", "unreadable"} <= statuses and expected["person"].notna().any()
    assert expected["source"].str.endswith('=1+1, "quoted".jpg').any()  # commas and quotes through the journal

    table = pq.read_table(parquet_out)
    assert table.schema == row_schema(header)
    assert table.num_rows == len(expected)
    by_arrow = table.to_pandas(types_mapper=pd.ArrowDtype)
    by_pandas = pd.read_parquet(parquet_out, dtype_backend="numpy_nullable")
    pd.testing.assert_frame_equal(by_pandas, expected, check_dtype=False)
    for name in header:  # pyarrow's own view, value by value, nulls where the CSV is empty
        got, want = by_arrow[name].tolist(), expected[name].tolist()
        for g, w in zip(got, want):
            if w is pd.NA or (isinstance(w, float) and math.isnan(w)):
                assert g is pd.NA or g is None, name
            else:
                assert g == w, name
    assert (tmp_path / "rows.events.csv").exists() == events_path(csv_out).exists()
    ok = by_pandas[by_pandas["status"] == "ok"]
    assert ok["AU12"].dtype == "Int8" and set(ok["AU12"].unique()) <= {0, 1}
    assert np.all((ok["AU12_intensity"] == 0) == (ok["AU12"] == 0))


def test_rows_go_in_row_groups_of_the_size_asked(tmp_path):
    header = ["source", "frame", "time_s", "face", "person", "status", "message", "AU12_prob", "AU12"]
    rows = [{"source": f"v,{i // 10}.mp4", "frame": i, "time_s": i / 10, "face": 0, "person": i % 3,
             "status": "ok", "message": "", "AU12_prob": i / 100, "AU12": i % 2} for i in range(50)]
    rows[7].update(face="", person="", status="no_face", message='line\nbreak, "quoted"', AU12_prob="", AU12="")
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)
    assert csv_to_parquet(path, tmp_path / "rows.parquet", header, row_group_rows=7) == 50
    file = pq.ParquetFile(tmp_path / "rows.parquet")
    assert file.metadata.num_row_groups == 8
    assert [file.metadata.row_group(i).num_rows for i in range(8)] == [7] * 7 + [1]
    table = file.read()
    assert table.column("frame").to_pylist() == list(range(50))
    assert table.column("message")[7].as_py() == 'line\nbreak, "quoted"'
    assert table.column("AU12")[7].as_py() is None and table.column("person")[7].as_py() is None
    assert table.column("message")[0].as_py() == ""  # an empty string stays a string


def test_a_cell_that_does_not_parse_is_named_and_nothing_is_left(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("source,frame,AU12_prob\na.jpg,,0.5\nb.jpg,,not a number\n")
    with pytest.raises(ValueError, match=r"rows\.csv: the rows do not convert to Parquet"):
        csv_to_parquet(path, tmp_path / "rows.parquet", ["source", "frame", "AU12_prob"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]


def test_an_interrupted_parquet_run_resumes_to_the_same_file(predictor, inputs, tmp_path, monkeypatch):
    """Stopped after two batches (the standing saved after each), the same command goes on from
    the journal: the Parquet file equals an uninterrupted run's, no row twice."""
    whole = tmp_path / "whole.parquet"
    run(predictor, inputs, str(whole), progress=False, batch_frames=4)
    out = tmp_path / "rows.parquet"
    real = predictor.predict_batches
    monkeypatch.setattr(predictor, "predict_batches", interrupted_after(real, 2))
    with pytest.raises(KeyboardInterrupt):
        run(predictor, inputs, str(out), progress=False, batch_frames=4, checkpoint_s=0)
    assert not out.exists() and (tmp_path / "rows.parquet.partial").exists()
    monkeypatch.setattr(predictor, "predict_batches", real)
    run(predictor, inputs, str(out), progress=False, batch_frames=4, checkpoint_s=0)
    assert pq.read_table(out).equals(pq.read_table(whole))
    assert not (tmp_path / "rows.parquet.partial").exists()
