"""AUDataModule: batches, masks, normalisation, balanced sampling, AU-aware flips."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from datamodules.au_datamodule import AUDataModule
from datamodules.augmentation import AUAugmentation, flip_permutation
from datamodules.io.manifest import EMOTIONET_AUS, read_manifest
from datamodules.sampling import MultilabelBalancedSampler
from datamodules.synthau.face import FaceSpec, render_face, sample_identity

from .training_helpers import SMALL, SMALL_ALIGNMENT


@pytest.fixture(scope="module")
def data(synthau, tmp_path_factory) -> AUDataModule:
    dm = AUDataModule(data_root=str(synthau), synth=SMALL, cache_dir=str(tmp_path_factory.mktemp("dm_cache")),
                      alignment=SMALL_ALIGNMENT, batch_size=16, num_workers=0, balanced_sampling=True)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_carry_images_labels_mask_and_index(data, synthau):
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (12, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["labels"].shape == (12, 23) and batch["mask"].dtype == torch.bool
    assert batch["index"].tolist() == list(range(12))
    m = read_manifest(synthau / "val.tsv")
    raw = np.array([line.split("\t")[1:24] for line in (synthau / "val.tsv").read_text().splitlines()[1:]], int)
    # 999 is masked, never a negative; 0 and 1 pass through
    np.testing.assert_array_equal(batch["mask"].numpy(), raw != 999)
    np.testing.assert_array_equal(batch["labels"].numpy(), (raw == 1).astype(np.float32))
    np.testing.assert_array_equal(batch["labels"].numpy(), m.labels)


def test_normalised_on_the_device(data):
    batch = next(iter(data.val_dataloader()))
    raw = batch["image"].clone()
    out = data.on_after_batch_transfer(batch, 0)["image"]
    assert out.dtype == torch.float32
    mean, std = torch.tensor(data.hparams.mean), torch.tensor(data.hparams.std)
    expected = (raw.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_uses_the_balanced_sampler(data):
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, MultilabelBalancedSampler)
    assert len(loader.sampler) == 96
    idx = np.array(list(loader.sampler))
    split = data.splits["train"]
    raw = split.labels.sum(0) / np.maximum(split.mask.sum(0), 1)
    drawn = (split.labels[idx] * split.mask[idx]).sum(0) / np.maximum(split.mask[idx].sum(0), 1)
    rare = (raw > 0) & (raw < 0.05)
    assert drawn[rare].mean() > 2 * raw[rare].mean()
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 64, 64)


def test_partial_manifests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="train_manifest, val_manifest and test_manifest together"):
        AUDataModule(train_manifest=str(tmp_path / "t.tsv"))


def test_flip_swaps_left_and_right_aus():
    aus = list(EMOTIONET_AUS)
    perm = flip_permutation(aus)
    i51, i52, i55, i56 = (aus.index(a) for a in (51, 52, 55, 56))
    aug = AUAugmentation(aus, flip_p=1.0)
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :2] = 255  # a bright left edge
    labels = np.zeros(23, np.float32)
    labels[i51], labels[i55], labels[aus.index(12)] = 1, 1, 1
    mask = np.ones(23, bool)
    mask[i52] = False
    flipped, y, m = aug.flip(image, labels, mask)
    assert flipped[:, -2:].min() == 255 and flipped[:, :2].max() == 0  # the edge moved right
    assert y[i52] == 1 and y[i51] == 0 and y[i56] == 1 and y[i55] == 0 and y[aus.index(12)] == 1
    assert not m[i51] and m[i52]  # the mask travels with its AU
    assert sorted(perm.tolist()) == list(range(23))


def test_flipped_turn_left_is_a_turn_right():
    """Mirroring a rendered AU51 face (head turned left) gives the AU52 face, as the label swap says."""
    ident = sample_identity(np.random.default_rng(2))
    ident.hair_style = 0  # the renderer's face is left/right symmetric apart from the pose
    light = np.array([0.0, 0.0, 1.0])
    left, _, _ = render_face(FaceSpec(ident, {51: 1.0}), 160, light, 0.5, np.random.default_rng(0))
    right, _, _ = render_face(FaceSpec(ident, {52: 1.0}), 160, light, 0.5, np.random.default_rng(0))
    mirrored = left[:, ::-1].astype(np.float32)
    assert np.abs(mirrored - right).mean() < 0.25 * np.abs(left.astype(np.float32) - right).mean()


def test_flip_through_the_dataset(data):
    """With flip_p=1 and no jitter, the sample is the mirrored crop with 51/52 and 55/56 swapped."""
    aus = list(EMOTIONET_AUS)
    ds = data.dataset("train")
    aug = AUAugmentation(aus, flip_p=1.0)
    aug.transform = lambda image: {"image": image}  # photometric jitter off: compare pixels exactly
    ds.transform = aug
    split = data.splits["train"]
    i = int(np.flatnonzero(split.labels[:, aus.index(51)] + split.labels[:, aus.index(55)] > 0)[0]) \
        if (split.labels[:, [aus.index(51), aus.index(55)]] > 0).any() else 0
    sample = ds[i]
    np.testing.assert_array_equal(sample["image"].numpy().transpose(1, 2, 0), split.crops[i][:, ::-1])
    perm = flip_permutation(aus)
    np.testing.assert_array_equal(sample["labels"].numpy(), split.labels[i][perm])
    np.testing.assert_array_equal(sample["mask"].numpy(), split.mask[i][perm])


def test_url_manifests_are_downloaded_then_aligned(synthau, image_server, tmp_path, caplog):
    """Manifests of URLs: prepare_data downloads, drops the rows whose image is gone (counted), aligns."""
    paths = {}
    for split in ("train", "val", "test"):
        lines = (synthau / f"{split}.tsv").read_text().splitlines()
        rows = [lines[0]] + [f"{image_server}/{line}" for line in lines[1:13]]
        if split == "train":
            rows[3] = rows[3].replace("/images/", "/gone/", 1)  # a dead link, as many EmotioNet URLs are
        paths[split] = tmp_path / f"{split}.tsv"
        paths[split].write_text("\n".join(rows) + "\n")
    dm = AUDataModule(train_manifest=str(paths["train"]), val_manifest=str(paths["val"]),
                      test_manifest=str(paths["test"]), cache_dir=str(tmp_path / "cache"),
                      download_dir=str(tmp_path / "downloads"), alignment=SMALL_ALIGNMENT, batch_size=4,
                      num_workers=0)
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert any("1 of 12 rows dropped" in r.getMessage() for r in caplog.records)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 11 and len(dm.splits["val"]) == 12
    assert dm.splits["train"].lines.tolist() == list(range(2, 13))  # lines of the local manifest
    assert len(list((tmp_path / "downloads" / "images").iterdir())) == 35
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)


def test_fit_realigns_a_truncated_cache(data, tmp_path, caplog):
    """setup("fit") on caches where val's crops.npy was cut short: val is aligned again (the warning
    names its folder), train is reused, and the val batches hold the original crops."""
    cache = tmp_path / "cache"
    shutil.copytree(data.hparams.cache_dir, cache)
    (val,) = cache.glob("val-*")
    (train,) = cache.glob("train-*")
    original = np.array(data.splits["val"].crops)
    train_mtime = (train / "crops.npy").stat().st_mtime_ns
    os.truncate(val / "crops.npy", (val / "crops.npy").stat().st_size - 4096)
    dm = AUDataModule(data_root=data.hparams.data_root, synth=SMALL, cache_dir=str(cache), alignment=SMALL_ALIGNMENT,
                      batch_size=16, num_workers=0)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert any(str(val) in r.getMessage() and "crops.npy" in r.getMessage() for r in caplog.records)
    assert dm.splits["val"].path == val and (train / "crops.npy").stat().st_mtime_ns == train_mtime
    np.testing.assert_array_equal(dm.splits["val"].crops, original)
    batch = next(iter(dm.val_dataloader()))
    np.testing.assert_array_equal(batch["image"].permute(0, 2, 3, 1).numpy(), original)
