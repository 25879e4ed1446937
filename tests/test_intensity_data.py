"""AU intensity levels from the manifest's ``AU<n>_intensity`` columns to the batches: matched to the
aligned samples by manifest line, 999 masked, malformed values refused, flips swapping them."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.au_datamodule import AUDataModule
from datamodules.augmentation import AUAugmentation, flip_permutation
from datamodules.io.manifest import ManifestError, read_levels, read_manifest

from .training_helpers import SMALL, SMALL_ALIGNMENT

AUS = (1, 2, 12, 51, 52)
LEVEL_AUS = (1, 12, 51, 52)  # AU2 has no intensity column: masked throughout
BASE_KEYS = {"image", "labels", "mask", "index"}


def _levels_of(row: int, au: int) -> str:
    """A varied, reproducible level per row and AU, 999 now and then, one written as pandas would."""
    v = (3 * row + au) % 8
    return "999" if v == 7 else "4.0" if v == 6 else str(v % 6)


def _write(path: Path, rows: list[tuple[str, list[str], list[str]]], level_aus: tuple[int, ...]) -> Path:
    header = ["image", *(f"AU{a}" for a in AUS), "expression", *(f"AU{a}_intensity" for a in level_aus)]
    path.write_text("\n".join("\t".join(r) for r in [header, *([img, *y, "x", *lv] for img, y, lv in rows)]) + "\n")
    return path


@pytest.fixture(scope="module")
def hand_manifest(synthau, tmp_path_factory) -> Path:
    """Ten of SynthAU's validation images with hand-made levels, and an unreadable image on line 5
    (so the aligned split has one sample less, and every later sample sits one place earlier)."""
    folder = tmp_path_factory.mktemp("levels")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    images = sorted(str(p) for p in (synthau / "images" / "val").glob("*.jpg"))[:10]
    rows = []
    for i, image in enumerate(images):
        labels = ["1" if (i + a) % 3 == 0 else "999" if (i + a) % 7 == 0 else "0" for a in AUS]
        rows.append((image, labels, [_levels_of(i, a) for a in LEVEL_AUS]))
    rows.insert(3, (str(folder / "broken.jpg"), ["0"] * len(AUS), ["2"] * len(LEVEL_AUS)))  # line 5
    return _write(folder / "levels.tsv", rows, LEVEL_AUS)


def _module(manifest: Path, cache: Path, **kw) -> AUDataModule:
    return AUDataModule(train_manifest=str(manifest), val_manifest=str(manifest), test_manifest=str(manifest),
                        aus=AUS, cache_dir=str(cache), alignment=SMALL_ALIGNMENT, batch_size=32, num_workers=0,
                        **kw)


@pytest.fixture(scope="module")
def levels_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("levels_cache")


@pytest.fixture(scope="module")
def levels_data(hand_manifest, levels_cache) -> AUDataModule:
    dm = _module(hand_manifest, levels_cache)
    dm.setup("validate")
    return dm


def _expected_by_line(path: Path) -> dict[int, tuple[list[float], list[bool]]]:
    """Per manifest line, the levels and mask as written (AU2 absent: masked)."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    out = {}
    for number, text in enumerate(lines[1:], start=2):
        cells = dict(zip(header, text.split("\t")))
        raw = [cells.get(f"AU{a}_intensity", "999") for a in AUS]
        out[number] = ([0.0 if v == "999" else float(v) for v in raw], [v != "999" for v in raw])
    return out


def test_batches_carry_each_samples_levels_by_line(levels_data, hand_manifest):
    assert levels_data.has_intensity
    split = levels_data.splits["val"]
    assert len(split) == 10 and 5 not in split.lines.tolist()  # the unreadable row was left out
    batch = next(iter(levels_data.val_dataloader()))
    assert set(batch) == BASE_KEYS | {"intensity", "intensity_mask"}
    assert batch["intensity"].dtype == torch.float32 and batch["intensity"].shape == (10, len(AUS))
    assert batch["intensity_mask"].dtype == torch.bool
    want = _expected_by_line(hand_manifest)
    for i, line in enumerate(split.lines.tolist()):
        levels, known = want[line]
        assert batch["intensity"][i].tolist() == levels, line
        assert batch["intensity_mask"][i].tolist() == known, line
    # rows after the dropped one keep their own levels, not their predecessor's
    assert split.lines.tolist()[3] == 6 and batch["intensity"][3].tolist() == want[6][0]
    assert not batch["intensity_mask"][:, AUS.index(2)].any()  # no column: masked out
    assert (~batch["intensity_mask"][:, [AUS.index(a) for a in LEVEL_AUS]]).any()  # some 999s
    assert (batch["intensity"][~batch["intensity_mask"]] == 0).all()
    np.testing.assert_array_equal(batch["labels"].numpy(), split.labels)  # occurrence as before


def test_missing_columns_are_logged(hand_manifest, levels_data, levels_cache, caplog):
    dm = _module(hand_manifest, levels_cache)  # the cache levels_data aligned is found again
    with caplog.at_level(logging.INFO, logger="datamodules.au_datamodule"):
        dm.setup("validate")
    assert f"{hand_manifest} (val): no intensity column for AU 2: their intensities are masked out" in caplog.text


def test_flip_swaps_levels_with_labels(levels_data):
    """Through the dataset, with jitter off: the levels and their mask follow the 51/52 swap."""
    ds = levels_data.dataset("val")
    aug = AUAugmentation(AUS, flip_p=1.0)
    aug.transform = lambda image: {"image": image}
    ds.transform = aug
    perm = flip_permutation(AUS)
    assert perm.tolist() == [0, 1, 2, 4, 3]
    levels, known = levels_data.intensity_levels["val"]
    assert (levels[:, 3] != levels[:, 4]).any()  # the swap is visible
    for i in range(len(ds)):
        sample = ds[i]
        np.testing.assert_array_equal(sample["intensity"].numpy(), levels[i][perm])
        np.testing.assert_array_equal(sample["intensity_mask"].numpy(), known[i][perm])
        np.testing.assert_array_equal(sample["labels"].numpy(), levels_data.splits["val"].labels[i][perm])


def test_flip_call_stays_compatible():
    aug = AUAugmentation(AUS, flip_p=1.0)
    image = np.zeros((8, 8, 3), np.uint8)
    labels, mask = np.array([0, 0, 0, 1, 0], np.float32), np.array([1, 1, 1, 1, 0], bool)
    level, known = np.array([0, 0, 0, 3, 5], np.uint8), np.array([1, 1, 1, 1, 0], bool)
    assert len(aug(image, labels, mask)) == 3
    _, y, m, lv, k = aug.flip(image, labels, mask, level, known)
    assert y.tolist() == [0, 0, 0, 0, 1] and m.tolist() == [1, 1, 1, 0, 1]
    assert lv.tolist() == [0, 0, 0, 5, 3] and k.tolist() == [1, 1, 1, 0, 1]
    out = aug(image, labels, mask, level, known)
    assert len(out) == 5 and out[3].tolist() == [0, 0, 0, 5, 3]


@pytest.mark.parametrize("bad", ["6", "-1", "2.5", "x", "", "1e0", "٣"])
def test_bad_levels_are_refused_naming_file_line_and_column(hand_manifest, tmp_path, bad):
    lines = hand_manifest.read_text().splitlines()
    cells = lines[6].split("\t")  # line 7
    cells[-3] = bad  # AU12_intensity, column 9
    lines[6] = "\t".join(cells)
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    message = f"{path}:7: column 9 (AU12_intensity): value {bad!r} is not an intensity level 0-5 or 999"
    with pytest.raises(ManifestError, match=re.escape(message)):
        read_levels(read_manifest(path, aus=AUS))
    dm = _module(path, tmp_path / "cache")
    with pytest.raises(ManifestError, match=":7: column 9"):
        dm.setup("validate")  # refused before any alignment
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_read_levels_values_and_mask(hand_manifest):
    m = read_manifest(hand_manifest, aus=AUS)
    levels, known = read_levels(m)
    assert levels.dtype == np.uint8 and levels.shape == known.shape == (11, 5)
    want = _expected_by_line(hand_manifest)
    for i, line in enumerate(m.lines.tolist()):
        assert levels[i].tolist() == want[line][0] and known[i].tolist() == want[line][1]
    sub, sub_known = read_levels(m, (52, 2))
    np.testing.assert_array_equal(sub, levels[:, [4, 1]])
    np.testing.assert_array_equal(sub_known, known[:, [4, 1]])


def test_no_intensity_columns_no_new_keys(synthau, tmp_path):
    """A manifest without intensity columns: batches exactly as before."""
    lines = (synthau / "val.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    keep = [j for j, h in enumerate(header) if not h.endswith("_intensity")]
    assert len(keep) < len(header)
    path = tmp_path / "val.tsv"
    path.write_text("\n".join("\t".join(line.split("\t")[j] for j in keep) for line in lines[:7]) + "\n")
    dm = AUDataModule(train_manifest=str(path), val_manifest=str(path), test_manifest=str(path),
                      image_root=str(synthau), cache_dir=str(tmp_path / "cache"), alignment=SMALL_ALIGNMENT,
                      batch_size=8, num_workers=0)
    assert not dm.has_intensity
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == BASE_KEYS and not dm.intensity_levels


def test_synthau_batches_carry_its_levels(synthau, tmp_path):
    """SynthAU's own manifests: every validation sample's levels as its manifest line writes them."""
    dm = AUDataModule(data_root=str(synthau), synth=SMALL, cache_dir=str(tmp_path), alignment=SMALL_ALIGNMENT,
                      batch_size=32, num_workers=0)
    assert dm.has_intensity
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    m = read_manifest(synthau / "val.tsv")
    levels, known = read_levels(m)
    row = {line: i for i, line in enumerate(m.lines.tolist())}
    idx = [row[line] for line in dm.splits["val"].lines.tolist()]
    np.testing.assert_array_equal(batch["intensity"].numpy(), levels[idx].astype(np.float32))
    np.testing.assert_array_equal(batch["intensity_mask"].numpy(), known[idx])
    np.testing.assert_array_equal(batch["intensity_mask"].numpy(), batch["mask"].numpy())  # 999 in both
    assert (batch["intensity"][batch["labels"] == 1] >= 1).all()
