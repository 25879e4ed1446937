"""Reading AU manifests in EmotioNet form: values, masks, errors with file/line/column, image checks."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
