"""The scale benchmark's parts on small sizes, so that they do not rot: the growth fit, the
generated manifest and crop cache against what they were made from, and every stage's measurement."""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.scale import (FLAG_EXPONENT, growth_exponent, label_arrays, measure_loader, measure_sampler,
                              measure_thresholds, print_table, process_memory, run_child, write_crop_cache,
                              write_scale_manifest)
from datamodules.alignment.crop_cache import AlignedSplit
from datamodules.io.manifest import EMOTIONET_AUS, read_manifest

SIZES = np.array([1e4, 1e5, 1e6])


def test_growth_exponent_recovers_known_powers():
    assert growth_exponent(SIZES, 3e-7 * SIZES**1.5) == pytest.approx(1.5)
    assert growth_exponent(SIZES, 0.2 + 0 * SIZES) == pytest.approx(0.0, abs=1e-12)
    n_log_n = growth_exponent(SIZES, SIZES * np.log(SIZES))
    assert 1.05 < n_log_n < FLAG_EXPONENT  # N log N is not flagged, N^1.2 is
    assert growth_exponent(SIZES, SIZES**1.2) > FLAG_EXPONENT
    assert np.isnan(growth_exponent(SIZES, [1.0, 0.0, 2.0]))


def test_table_flags_only_what_grows_worse_than_n_log_n(capsys):
    print_table("t", "rows", [10_000, 100_000, 1_000_000], {"linear": [0.01, 0.1, 1.0], "square": [1, 100, 10_000]},
                no_exponent=[])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"| exponent | 1.00 | **2.00** (> {FLAG_EXPONENT}) |"


@pytest.mark.slow
def test_generated_manifest_parses_to_what_was_written(tmp_path):
    path = tmp_path / "m.tsv"
    written = write_scale_manifest(path, 600, seed=1)
    m = read_manifest(path)
    labels, mask = label_arrays(600, seed=1)
    assert len(m) == 600 and m.aus == EMOTIONET_AUS and set(m.extra) == {"identity", "expression"}
    np.testing.assert_array_equal(m.labels, labels)
    np.testing.assert_array_equal(m.mask, mask)
    assert m.labels.sum(0).astype(int).tolist() == written["positives"]
    assert (~m.mask).sum(0).tolist() == written["unlabelled"]
    # SynthAU's label model: most AUs rare, a few common; head movements unlabelled most often
    rate = m.positive_rate()
    assert (rate < 0.05).sum() >= 8 and rate.max() > 0.15
    assert (~m.mask).mean(0)[EMOTIONET_AUS.index(51)] > (~m.mask).mean(0)[EMOTIONET_AUS.index(12)]
    # the child process the benchmark measures in finds the same rows and counts
    found = run_child("manifest", None, path=str(path), repeats=1)
    assert (found["rows"], found["positives"], found["unlabelled"]) == (600, written["positives"],
                                                                         written["unlabelled"])
    assert found["seconds"] > 0


def test_sampler_and_threshold_measurements_run():
    sampler = measure_sampler(300, repeats=1)
    assert sampler["first_epoch_s"] >= sampler["construct_s"] > 0
    thresholds = measure_thresholds(300, repeats=1)
    assert min(thresholds[k] for k in ("fit_s", "au_scores_s", "heldout_s")) > 0


@pytest.mark.slow
def test_crop_cache_opens_and_loader_memory_is_read(tmp_path):
    folder = write_crop_cache(tmp_path / "cache", 300, size=32)
    split = AlignedSplit.open(folder)
    assert len(split) == 300 and split.crops.shape == (300, 32, 32, 3)
    assert split.verify()  # the checksums written match the crops
    labels, mask = label_arrays(300)
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.mask, mask)
    np.asarray(split.crops).sum()  # touch every page
    mine = process_memory(os.getpid(), str((folder / "crops.npy").resolve()))
    assert mine["mapped_rss"] > 0.5 and mine["rss"] >= mine["pss"] > 0
    run = measure_loader(str(folder), workers=1, batches=3, every=1)
    assert run["samples"] == 3 * 64 and set(run["processes"]) == {"rank", "worker 0"}
    assert run["processes"]["worker 0"]["private_dirty"] > 0
