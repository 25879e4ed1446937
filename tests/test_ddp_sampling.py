"""Balanced sampling under real DDP: 2 CPU processes (gloo), with and without Lightning's wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datamodules.sampling import MultilabelBalancedSampler

SCRIPT = Path(__file__).with_name("ddp_sampling_run.py")


@pytest.mark.slow
@pytest.mark.parametrize("wrapped", [True, False], ids=["lightning-wrapper", "own-sharding"])
def test_two_ranks_partition_one_draw(synthau, aligned_train, tmp_path, wrapped):
    out = tmp_path / "out"
    out.mkdir()
    cache = aligned_train.path.parent
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(synthau), str(cache), str(out), str(int(wrapped))],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sampler = MultilabelBalancedSampler(aligned_train.labels, aligned_train.mask, seed=17)
    draws = []
    for epoch in (0, 1):
        ranks = [json.loads((out / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 for r in ranks)
        a, b = ranks[0]["indices"], ranks[1]["indices"]
        draw = sampler.draw(epoch)
        assert len(a) == len(b) == len(draw) // 2  # 96 drawn: 48 each, 6 batches of 8
        # One draw, split without overlap: the two shares add up to it exactly, as multisets.
        assert Counter(a) + Counter(b) == Counter(draw)
        draws.append(draw)
    assert draws[0] != draws[1]  # a new draw each epoch
