"""``model.target_rate: prior``: selective learning aims each AU at its training prior."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from experiments.lightning_cli import AUDetectCLI

from .training_helpers import small_fit_args, write_mlflow_yaml


def _manifest_priors(path) -> dict[str, float]:
    """Positive share among labelled entries per AU column, read with the csv module (999 = unlabelled)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    priors = {}
    for column in (c for c in rows[0] if c.startswith("AU")):
        values = [int(r[column]) for r in rows if int(r[column]) != 999]
        priors[column] = sum(values) / len(values) if values else float("nan")
    return priors


def test_prior_targets_make_each_batch_weighted_share_equal_the_training_prior(synthau, fit_cache, tmp_path):
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = small_fit_args(synthau, fit_cache, cfg, tmp_path / "runs")
    cli = AUDetectCLI(args=[*args, "--model.loss", "selective", "--model.target_rate", "prior",
                            "--trainer.logger", "false"], run=False)
    model, data = cli.model, cli.datamodule

    # The priors come from the data (linked when the classes are made) and equal the manifest's own counts.
    reference = _manifest_priors(synthau / "train.tsv")
    columns = [f"AU{a}" for a in model.aus]
    assert model.hparams.au_priors == pytest.approx([reference[c] for c in columns], nan_ok=True)
    assert model.hparams.au_priors == data.au_priors
    targets = model.criterion.target_rate.numpy()

    data.prepare_data()
    data.setup("fit")
    checked = 0
    for i, batch in enumerate(data.train_dataloader()):
        labels, mask = batch["labels"], batch["mask"]
        weights = model.criterion.weights(labels, mask)
        positive = mask & (labels > 0.5)
        both = positive.any(0) & (mask & ~positive).any(0)
        share = (weights * positive).sum(0) / weights.sum(0).clamp_min(1e-12)
        for k in torch.nonzero(both).flatten().tolist():
            assert share[k].item() == pytest.approx(reference[columns[k]], abs=1e-5), (i, columns[k])
            assert targets[k] == pytest.approx(reference[columns[k]], abs=1e-6)
            checked += 1
        if i == 5:
            break
    assert checked >= 20, checked  # the balanced sampler puts both classes of most AUs in a batch


def test_prior_needs_priors_and_per_au_lists_must_match_the_aus():
    from lightning_modules.au_detector import AUDetector

    with pytest.raises(ValueError, match="au_priors"):
        AUDetector(aus=[1, 2], backbone="resnet18", target_rate="prior")
    with pytest.raises(ValueError, match="3 values for 2 AUs"):
        AUDetector(aus=[1, 2], backbone="resnet18", target_rate=[0.2, 0.3, 0.4])
    model = AUDetector(aus=[1, 2, 4], backbone="resnet18", target_rate="prior", au_priors=[0.1, float("nan"), 0.0])
    assert np.allclose(model.criterion.target_rate.numpy(), [0.1, 0.5, 1e-3])
