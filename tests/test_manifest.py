"""Reading AU manifests in EmotioNet form: values, masks, errors with file/line/column, image checks."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.io import manifest as manifest_module
from datamodules.io.manifest import (
    DISFA_AUS,
    EMOTIONET_AUS,
    ManifestError,
    au_column_name,
    read_manifest,
)

AUS3 = (1, 2, 4)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jpeg(path: Path, size: int = 32, colour: tuple[int, int, int] = (200, 120, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)  # noise, so the JPEG has enough bytes to truncate meaningfully
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    arr[: size // 2] = colour
    Image.fromarray(arr).save(path, quality=90)
    return path


def test_au_column_name():
    assert au_column_name(12) == "AU12"
    assert au_column_name(1) == "AU1"


def test_tsv_with_header_999_is_masked_not_negative(tmp_path):
    m = read_manifest(
        write(tmp_path / "train.tsv", "image\tAU1\tAU2\tAU4\n" "a.jpg\t1\t0\t999\n" "b.jpg\t999\t1\t0\n" "c.jpg\t0\t0\t1\n"),
        aus=AUS3,
    )
    assert len(m) == 3
    assert m.aus == AUS3
    assert m.images == ["a.jpg", "b.jpg", "c.jpg"]
    assert m.labels.dtype == np.float32 and m.mask.dtype == bool
    np.testing.assert_array_equal(m.labels, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(m.mask, [[1, 1, 0], [0, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(m.lines, [2, 3, 4])
    assert m.extra == {}
    assert m.skipped == []


def test_csv_with_header_and_float_values_with_spaces(tmp_path):
    m = read_manifest(
        write(tmp_path / "val.csv", "image,AU1,AU2,AU4\nx/a.png, 1.0 ,0.0,999.0\nx/b.png,0,1,1\n"), aus=AUS3
    )
    assert m.images == ["x/a.png", "x/b.png"]
    np.testing.assert_array_equal(m.labels, [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(m.mask, [[1, 1, 0], [1, 1, 1]])


def test_unknown_suffix_sniffs_tab(tmp_path):
    m = read_manifest(write(tmp_path / "list.lst", "image\tAU1\tAU2\tAU4\na.jpg\t0\t1\t0\n"), aus=AUS3)
    np.testing.assert_array_equal(m.labels, [[0, 1, 0]])


def test_headerless_emotionet_order_extra_columns_ignored(tmp_path):
    k = len(EMOTIONET_AUS)
    row1 = ["http://x.org/1.jpg"] + ["0"] * k + ["junk", "more"]
    row2 = ["http://x.org/2.jpg"] + ["999"] * k
    row1[1 + EMOTIONET_AUS.index(12)] = "1"  # AU12 positive
    row2[1 + EMOTIONET_AUS.index(56)] = "1"  # the last AU
    row2[1 + EMOTIONET_AUS.index(1)] = "0"
    path = write(tmp_path / "emotionet.txt", "\t".join(row1) + "\n\n" + "\t".join(row2) + "\n")
    m = read_manifest(path, has_header=False)
    assert m.aus == EMOTIONET_AUS and m.labels.shape == (2, 23)
    assert m.images == ["http://x.org/1.jpg", "http://x.org/2.jpg"]
    np.testing.assert_array_equal(np.flatnonzero(m.labels[0]), [EMOTIONET_AUS.index(12)])
    np.testing.assert_array_equal(np.flatnonzero(m.labels[1]), [22])
    assert m.mask[0].all()
    np.testing.assert_array_equal(np.flatnonzero(m.mask[1]), [0, 22])
    np.testing.assert_array_equal(m.lines, [1, 3])  # the blank line still counts


def test_headerless_file_read_with_header_hints_has_header(tmp_path):
    path = write(tmp_path / "raw.tsv", "http://x/1.jpg\t1\t0\t999\nhttp://x/2.jpg\t0\t0\t0\n")
    with pytest.raises(ManifestError, match="has_header=False"):
        read_manifest(path, aus=AUS3)


def test_au_name_variants_and_column_order(tmp_path):
    # columns in another order than aus, with names AU01 / "au 2" / "4"
    path = write(tmp_path / "v.tsv", "4\tfile\tAU01\tau 2\n1\tp.jpg\t0\t999\n0\tq.jpg\t1\t1\n")
    m = read_manifest(path, aus=AUS3, image_column="file")
    assert m.images == ["p.jpg", "q.jpg"]
    np.testing.assert_array_equal(m.labels, [[0, 0, 1], [1, 1, 0]])  # in aus order: AU1, AU2, AU4
    np.testing.assert_array_equal(m.mask, [[1, 0, 1], [1, 1, 1]])


def test_disfa_aus_and_extra_columns(tmp_path):
    header = ["image", "identity"] + [f"AU{a:02d}" for a in reversed(DISFA_AUS)] + ["AU7", "expression"]
    vals1 = ["s1/0001.jpg", "SN001"] + ["0"] * 12 + ["1", "happiness"]
    vals2 = ["s2/0001.jpg", "SN002"] + ["1"] * 12 + ["0", "neutral"]
    vals1[2] = "1"  # first AU column in the file is AU26
    path = write(tmp_path / "disfa.csv", "\n".join(",".join(r) for r in (header, vals1, vals2)) + "\n")
    m = read_manifest(path, aus=DISFA_AUS)
    assert m.aus == DISFA_AUS
    assert m.extra == {"identity": ["SN001", "SN002"], "AU7": ["1", "0"], "expression": ["happiness", "neutral"]}
    np.testing.assert_array_equal(np.flatnonzero(m.labels[0]), [DISFA_AUS.index(26)])
    assert m.labels[1].sum() == 12 and m.mask.all()


def test_value_7_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "train.tsv", "image\tAU1\tAU2\tAU4\n\na.jpg\t1\t0\t0\nb.jpg\t0\t1\t7\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path, aus=AUS3)
    msg = str(e.value)
    assert "train.tsv:4:" in msg
    assert "column 4 (AU4)" in msg
    assert "'7'" in msg


@pytest.mark.parametrize("bad", ["abc", "", "0.5", "nan", "-1"])
def test_other_bad_values(tmp_path, bad):
    path = write(tmp_path / "m.csv", f"image,AU1,AU2,AU4\na.jpg,1,{bad},0\n")
    with pytest.raises(ManifestError, match=re.escape(f"m.csv:2: column 3 (AU2): value '{bad}'")):
        read_manifest(path, aus=AUS3)


def test_missing_au_column_names_the_au_and_found_columns(tmp_path):
    path = write(tmp_path / "m.tsv", "image\tAU1\tAU4\tidentity\na.jpg\t1\t0\tx\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path, aus=AUS3)
    msg = str(e.value)
    assert "m.tsv" in msg and "AU2" in msg and "identity" in msg
    assert "AU1," not in msg.split("columns found")[0]  # only the missing one is named as missing


def test_missing_image_column(tmp_path):
    path = write(tmp_path / "m.tsv", "image\tAU1\tAU2\tAU4\na.jpg\t1\t0\t0\n")
    with pytest.raises(ManifestError, match="'path' not found"):
        read_manifest(path, aus=AUS3, image_column="path")


def test_empty_and_header_only(tmp_path):
    with pytest.raises(ManifestError, match=r"empty\.tsv is empty"):
        read_manifest(write(tmp_path / "empty.tsv", "\n\n"), aus=AUS3)
    with pytest.raises(ManifestError, match=r"head\.tsv has a header but no rows"):
        read_manifest(write(tmp_path / "head.tsv", "image\tAU1\tAU2\tAU4\n\n"), aus=AUS3)
    with pytest.raises(ManifestError, match=r"raw\.tsv is empty"):
        read_manifest(write(tmp_path / "raw.tsv", ""), aus=AUS3, has_header=False)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_manifest(tmp_path / "nope.tsv")


def test_short_row_names_line_and_counts(tmp_path):
    path = write(tmp_path / "m.tsv", "image\tAU1\tAU2\tAU4\na.jpg\t1\t0\t0\nb.jpg\t1\t0\n")
    with pytest.raises(ManifestError, match=r"m\.tsv:3: expected 4 cells, found 3"):
        read_manifest(path, aus=AUS3)
    path = write(tmp_path / "raw.tsv", "a.jpg\t1\t0\n")
    with pytest.raises(ManifestError, match=r"raw\.tsv:1: expected 4 cells, found 3"):
        read_manifest(path, aus=AUS3, has_header=False)


def test_check_images_skips_missing_and_truncated(tmp_path):
    good1 = jpeg(tmp_path / "img" / "good1.jpg", colour=(10, 20, 30))
    jpeg(tmp_path / "img" / "good2.jpg")
    bad = jpeg(tmp_path / "img" / "trunc.jpg", size=64)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    path = write(
        tmp_path / "train.tsv",
        "image\tAU1\tAU2\tAU4\tidentity\n"
        "img/good1.jpg\t1\t0\t0\tp1\n"  # line 2
        "img/missing.jpg\t0\t1\t0\tp2\n"  # line 3
        "img/trunc.jpg\t0\t0\t1\tp3\n"  # line 4
        "http://example.com/never-fetched.jpg\t1\t1\t0\tp4\n"  # line 5
        "img/good2.jpg\t999\t0\t1\tp5\n",  # line 6
    )
    unchecked = read_manifest(path, aus=AUS3)
    assert len(unchecked) == 5 and unchecked.skipped == []

    m = read_manifest(path, aus=AUS3, check_images=True)
    assert [(s.line, s.image) for s in m.skipped] == [(3, "img/missing.jpg"), (4, "img/trunc.jpg")]
    assert m.skipped[0].reason == f"missing image: {tmp_path / 'img' / 'missing.jpg'}"
    assert m.skipped[1].reason.startswith("unreadable image: ")
    assert "truncated" in m.skipped[1].reason.lower()
    assert m.images == ["img/good1.jpg", "http://example.com/never-fetched.jpg", "img/good2.jpg"]
    np.testing.assert_array_equal(m.lines, [2, 5, 6])
    np.testing.assert_array_equal(m.labels, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(m.mask, [[1, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert m.extra["identity"] == ["p1", "p4", "p5"]
    assert m.resolve(0) == str(good1)
    assert m.resolve(1) == "http://example.com/never-fetched.jpg"
    with Image.open(m.resolve(0)) as im:  # the kept path really is the image written
        assert im.getpixel((0, 0)) == pytest.approx((10, 20, 30), abs=4)


def test_check_images_with_root_elsewhere(tmp_path):
    jpeg(tmp_path / "data" / "a.jpg")
    (tmp_path / "lists").mkdir()
    path = write(tmp_path / "lists" / "m.tsv", "image\tAU1\tAU2\tAU4\na.jpg\t1\t0\t0\nb.jpg\t0\t0\t0\n")
    m = read_manifest(path, aus=AUS3, root=tmp_path / "data", check_images=True)
    assert m.images == ["a.jpg"] and [s.line for s in m.skipped] == [3]
    assert m.resolve(0) == str(tmp_path / "data" / "a.jpg")
    assert m.resolve(0, root=tmp_path / "other") == str(tmp_path / "other" / "a.jpg")
    with pytest.raises(ManifestError, match="none of its 2 images"):
        read_manifest(path, aus=AUS3, check_images=True)  # root defaults to lists/: nothing there


def test_resolve_defaults_to_manifest_folder_and_keeps_urls(tmp_path):
    path = write(tmp_path / "m.tsv", "image\tAU1\tAU2\tAU4\nsub/a.jpg\t1\t0\t0\nhttps://h.org/b.jpg?x=1\t0\t0\t0\n")
    m = read_manifest(path, aus=AUS3)
    assert m.resolve(0) == str(tmp_path / "sub" / "a.jpg")
    assert m.resolve(1) == "https://h.org/b.jpg?x=1"
    assert m.resolve(1, root=tmp_path / "x") == "https://h.org/b.jpg?x=1"


def test_subset_keeps_everything_aligned(tmp_path):
    path = write(
        tmp_path / "m.tsv",
        "image\tAU1\tAU2\tAU4\tidentity\na\t1\t0\t0\tA\nb\t0\t1\t999\tB\nc\t0\t0\t1\tC\nd\t1\t1\t1\tD\n",
    )
    m = read_manifest(path, aus=AUS3)
    s = m.subset(np.array([False, True, False, True]))
    assert s.images == ["b", "d"] and s.extra == {"identity": ["B", "D"]}
    np.testing.assert_array_equal(s.labels, [[0, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(s.mask, [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(s.lines, [3, 5])
    t = m.subset([3, 0])
    assert t.images == ["d", "a"] and t.extra["identity"] == ["D", "A"]
    np.testing.assert_array_equal(t.lines, [5, 2])
    assert len(m) == 4  # the original is untouched


def test_positive_rate_matches_hand_count(tmp_path):
    # AU1: labelled 4, positive 2 -> 0.5; AU2: labelled 3 (one 999), positive 1 -> 1/3;
    # AU4: all 999 -> nan
    path = write(
        tmp_path / "m.csv",
        "image,AU1,AU2,AU4\na,1,0,999\nb,0,1,999\nc,0,999,999\nd,1,0,999\n",
    )
    rate = read_manifest(path, aus=AUS3).positive_rate()
    assert rate[0] == pytest.approx(0.5)
    assert rate[1] == pytest.approx(1 / 3)
    assert np.isnan(rate[2])


def test_write_manifest_round_trips_and_leaves_an_unchanged_file_alone(tmp_path):
    from datamodules.io.manifest import write_manifest

    path = tmp_path / "out" / "m.tsv"
    rows = [("a.jpg", 1, 0, 999, "p1"), ("b c.jpg", 0, 1, 0, "p2")]
    write_manifest(path, ["image", "AU1", "AU2", "AU4", "identity"], rows)
    m = read_manifest(path, aus=AUS3)
    assert m.images == ["a.jpg", "b c.jpg"] and m.extra["identity"] == ["p1", "p2"]
    np.testing.assert_array_equal(m.labels, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(m.mask, [[1, 1, 0], [1, 1, 1]])
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    write_manifest(path, ["image", "AU1", "AU2", "AU4", "identity"], rows, only_if_changed=True)
    assert path.stat().st_mtime_ns == before  # its alignment caches stay valid
    write_manifest(path, ["image", "AU1", "AU2", "AU4", "identity"], rows[:1], only_if_changed=True)
    assert len(read_manifest(path, aus=AUS3)) == 1
    with pytest.raises(ValueError, match="tab or line break"):
        write_manifest(path, ["image"], [("x\ty.jpg",)])
    assert len(read_manifest(path, aus=AUS3)) == 1 and [p.name for p in path.parent.iterdir()] == ["m.tsv"]


def test_read_columns_and_image_lists(tmp_path):
    from datamodules.io.manifest import read_columns, read_image_list

    path = write(tmp_path / "ids.csv", "path,identity\nx/1.jpg,7\n\n/abs/2.jpg,8\n")
    assert read_columns(path, ["identity"], image_column="path") == [
        (2, str(tmp_path / "x" / "1.jpg"), ["7"]), (4, "/abs/2.jpg", ["8"])]
    with pytest.raises(ManifestError, match=r"ids.csv:1: no 'expression' column"):
        read_columns(path, ["expression"])
    write(tmp_path / "short.csv", "image,identity\na.jpg\n")
    with pytest.raises(ManifestError, match=r"short.csv:2: expected 2 cells, found 1"):
        read_columns(tmp_path / "short.csv", ["identity"])
    # a plain list has no header: its first line is an image too; a manifest's header is skipped
    write(tmp_path / "list.txt", "a.jpg\nsub/b.png\n")
    assert read_image_list(tmp_path / "list.txt") == [(1, str(tmp_path / "a.jpg")), (2, str(tmp_path / "sub/b.png"))]
    write(tmp_path / "m.tsv", "AU12\timage\n1\tc.jpg\n")
    assert read_image_list(tmp_path / "m.tsv") == [(2, str(tmp_path / "c.jpg"))]
    (tmp_path / "nul.txt").write_bytes(b"a.jpg\nb\x00.jpg\n")
    with pytest.raises(ManifestError, match=r"nul.txt:2: a NUL byte"):
        read_image_list(tmp_path / "nul.txt")


# -- chunks of rows: the same result whatever the chunk size ----------------------------------
# The reader takes its data rows a chunk at a time (module constant ``_CHUNK_ROWS``, 8,192):
# plain chunks in C-level passes, any other chunk row by row. Here the chunk is made 1, 3 or 8
# rows so that a manifest of ~20 rows crosses many boundaries.

CHUNKED_HEADER = ["image", "AU1", "AU2", "AU4", "identity", "note"]


def chunked_manifest(path: Path, n: int, bad: dict[int, str] | None = None) -> tuple[Path, list[int]]:
    """A CSV manifest of ``n`` data rows and the line each row starts on. Blank lines and a cell
    over two lines make the lines differ from row numbers; rows 3 and 17 say `` 1.0 `` or `` 999 ``
    (their chunk is read row by row), some rows end in blank cells. ``bad`` maps a row to a flaw."""
    lines, starts = [",".join(CHUNKED_HEADER)], []
    for i in range(n):
        labels = [str((i * 7 + j * 3) % 5 % 3) for j in range(3)]  # 0, 1 and 2 (-> 999 below)
        labels = ["999" if v == "2" else v for v in labels]
        if i in (3, 17):
            labels = [f" {v}.0 " if v != "999" else " 999 " for v in labels]
        cells = [f"img/{i:02d}.jpg", *labels, f"p{i % 4}", f"n{i}"]
        if i == 5:
            cells[-1] = '"two\nlines"'
        if i % 6 == 4:
            cells += ["", " "]  # blank cells past the header's columns
        flaw = (bad or {}).get(i)
        if flaw == "value":  # the last AU cell of the row
            cells[3] = "7"
        elif flaw == "short":
            cells = cells[:5]  # the last column missing
        elif flaw == "long":
            cells = [*cells[:6], "surplus"]
        elif flaw == "image":
            cells[0] = " "
        elif flaw == "nul":
            cells[4] = "p\0"
        elif flaw == "huge":  # over the csv module's field limit: csv.Error
            cells[5] = "x" * 140_000
        elif flaw is not None:
            raise ValueError(flaw)
        if i in (2, 11):
            lines.append("")
        starts.append(sum(1 + line.count("\n") for line in lines) + 1)
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, starts


def plain_csv_reading(path: Path) -> dict:
    """What the manifest holds, read with the csv module one row at a time, nothing shared
    with the reader: the line each non-blank row starts on, its cells, its values."""
    rows, previous = [], 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            start, previous = previous + 1, reader.line_num
            if any(c.strip() for c in row):
                rows.append((start, [c.strip() for c in row]))
    values = np.array([[int(float(c)) for c in row[1:4]] for _, row in rows[1:]])
    return {"images": [row[0] for _, row in rows[1:]], "lines": [line for line, _ in rows[1:]],
            "labels": (values == 1).astype(np.float32), "mask": values != 999,
            "extra": {"identity": [row[4] for _, row in rows[1:]], "note": [row[5] for _, row in rows[1:]]}}


def read_in_chunks(path: Path, chunk: int, monkeypatch, **kwargs):
    """``read_manifest`` with chunks of ``chunk`` rows: the manifest, or the ManifestError's message."""
    monkeypatch.setattr(manifest_module, "_CHUNK_ROWS", chunk)
    try:
        return read_manifest(path, aus=AUS3, **kwargs)
    except ManifestError as e:
        return str(e)


def assert_same_manifest(got, want) -> None:
    assert got.images == want.images
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.lines, want.lines)
    assert got.extra == want.extra
    assert got.labels.dtype == want.labels.dtype and got.mask.dtype == want.mask.dtype


ONE_CHUNK = 1 << 20  # more rows than any manifest here


@pytest.mark.parametrize("n", [20, 24])  # 24: a whole number of chunks of 1, 3 and 8
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunks_give_the_rows_of_one_chunk_and_of_a_plain_csv_read(tmp_path, monkeypatch, chunk, n):
    path, starts = chunked_manifest(tmp_path / "m.csv", n)
    whole = read_in_chunks(path, ONE_CHUNK, monkeypatch)
    sizes, row_by_row = [], []
    table = manifest_module._Table
    add_chunk, add_rows = table._add_chunk, table._add_rows

    def counted_chunk(self, rows, lines):
        sizes.append(len(rows))
        return add_chunk(self, rows, lines)

    def counted_rows(self, rows, lines):
        row_by_row.append(lines[0])
        return add_rows(self, rows, lines)

    monkeypatch.setattr(table, "_add_chunk", counted_chunk)
    monkeypatch.setattr(table, "_add_rows", counted_rows)
    chunked = read_in_chunks(path, chunk, monkeypatch)
    assert [s for s in sizes if s] == [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    assert 0 < len(row_by_row) < len(sizes)  # both readings of a chunk were used
    assert_same_manifest(chunked, whole)
    plain = plain_csv_reading(path)
    assert chunked.images == plain["images"] and chunked.extra == plain["extra"]
    assert chunked.lines.tolist() == plain["lines"] == starts
    assert starts[6] == starts[5] + 2  # the row after the two-line cell
    np.testing.assert_array_equal(chunked.labels, plain["labels"])
    np.testing.assert_array_equal(chunked.mask, plain["mask"])


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunks_headerless(tmp_path, monkeypatch, chunk):
    rows = [f"img/{i}.jpg\t{i % 2}\t{' 1.0' if i == 7 else '999'}\t0" + ("\tignored" if i % 5 == 0 else "")
            for i in range(20)]
    path = write(tmp_path / "raw.tsv", "\n".join(rows[:9] + [""] + rows[9:]) + "\n")
    whole = read_in_chunks(path, ONE_CHUNK, monkeypatch, has_header=False)
    assert_same_manifest(read_in_chunks(path, chunk, monkeypatch, has_header=False), whole)
    assert whole.lines.tolist() == [*range(1, 10), *range(11, 22)]


# what each flaw's error says after "m.csv:<line>: "
FLAW_MESSAGES = {
    "value": "column 4 (AU4): value '7' is not 0, 1 or 999",
    "short": "expected 6 cells, found 5",
    "long": "expected 6 cells, found 7 (values beyond the header's columns)",
    "image": "column 1 (image): empty image reference",
    "nul": "a NUL byte: not a text file",
    "huge": "field larger than field limit",
}


def near_boundaries(n: int, chunk: int) -> list[int]:
    """The data rows just before, at and just after each boundary between chunks."""
    return sorted({i for b in range(chunk, n, chunk) for i in (b - 1, b, b + 1) if 0 <= i < n})


@pytest.mark.parametrize("flaw", sorted(FLAW_MESSAGES))
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_a_flaw_next_to_a_chunk_boundary_names_its_true_line(tmp_path, monkeypatch, chunk, flaw):
    n = 20
    rows = near_boundaries(n, chunk)
    assert len(rows) >= 5
    for i in rows:
        path, starts = chunked_manifest(tmp_path / "m.csv", n, bad={i: flaw})
        got = read_in_chunks(path, chunk, monkeypatch)
        assert isinstance(got, str), f"row {i}: read without an error"
        assert got == read_in_chunks(path, ONE_CHUNK, monkeypatch), f"row {i}"
        assert got.startswith(f"{path}:{starts[i]}: {FLAW_MESSAGES[flaw]}"), f"row {i}: {got[:200]}"


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_the_first_flaw_in_the_file_is_raised_across_a_boundary(tmp_path, monkeypatch, chunk):
    # two flaws on neighbouring rows, on either side of a boundary or in one chunk: the first
    # one in the file is reported, also when the second stops the csv reading (NUL, csv.Error)
    n = 20
    for i in near_boundaries(n, chunk):
        if i + 1 >= n:
            continue
        for first, second in [("value", "nul"), ("short", "huge"), ("nul", "value"), ("image", "long")]:
            path, starts = chunked_manifest(tmp_path / "m.csv", n, bad={i: first, i + 1: second})
            got = read_in_chunks(path, chunk, monkeypatch)
            assert got == read_in_chunks(path, ONE_CHUNK, monkeypatch), (i, first, second)
            assert isinstance(got, str) and got.startswith(f"{path}:{starts[i]}: {FLAW_MESSAGES[first]}"), \
                (i, first, second, got[:200])
