"""The intensity head: rank-consistent levels, intensities that never contradict occurrence, the
ordinal loss against a hand computation, and a detector that trains and evaluates with it."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from callbacks.au_report import au_report, logged_intensity
from lightning_modules.au_detector import AUDetector, AUNet
from lightning_modules.intensity import intensity_scores
from lightning_modules.intensity_head import (OrdinalHead, expected_level, ordinal_loss, ordinal_pos_weight,
                                              reported_intensity)


def test_levels_are_rank_consistent_for_any_weights():
    torch.manual_seed(0)
    head = OrdinalHead(16, 6)
    with torch.no_grad():
        head.offsets.normal_(0, 3)  # whatever training makes of them
        head.score.weight.normal_(0, 3)
    p = torch.sigmoid(head(torch.randn(200, 16) * 5))
    assert (p[..., 1:] <= p[..., :-1]).all()  # P(level > j) never rises with j
    level = expected_level(head(torch.randn(50, 16)))
    assert ((level >= 1) & (level <= 5)).all()


def test_reported_intensity_never_contradicts_the_decision():
    torch.manual_seed(1)
    cumulative = torch.randn(500, 4, 4) * 4
    decisions = torch.rand(500, 4) > 0.6
    reported = reported_intensity(cumulative, decisions)
    assert (reported[~decisions] == 0).all()
    assert (reported[decisions] >= 1).all() and (reported <= 5).all()


def test_ordinal_loss_equals_the_binary_cross_entropy_of_the_four_questions():
    cumulative = torch.tensor([[[2.0, 0.5, -1.0, -3.0], [1.0, 1.0, 1.0, 1.0]],
                               [[0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]]])
    levels = torch.tensor([[3.0, 0.0], [999.0, 5.0]])
    mask = torch.tensor([[True, True], [False, True]])
    # Only (0, 0) at level 3 -> answers 1,1,0,0 and (1, 1) at level 5 -> 1,1,1,1 count: the absent
    # AU (level 0) and the unknown one teach the head nothing.
    logits = torch.tensor([[2.0, 0.5, -1.0, -3.0], [3.0, 2.0, 1.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    by_hand = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    assert ordinal_loss(cumulative, levels, mask).item() == pytest.approx(by_hand.item(), abs=1e-6)
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 5.0, 5.0]])
    per_au = weight[[0, 1]]  # AU 0 for the first entry, AU 1 for the second
    weighted = -(per_au * targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    assert ordinal_loss(cumulative, levels, mask, weight).item() == pytest.approx(weighted.item(), abs=1e-6)
    trained = cumulative.clone().requires_grad_()
    none = ordinal_loss(trained, torch.zeros(2, 2), mask)  # no AU present: nothing to learn, still a graph
    assert none.item() == 0 and none.grad_fn is not None


def test_balancing_weights_rare_high_levels_up():
    w = ordinal_pos_weight([[50, 30, 15, 4, 1], [0, 0, 0, 0, 0]])
    assert (w[0, 1:] > w[0, :-1]).all()  # the rarer "above", the heavier
    assert torch.equal(w[1], torch.ones(4))  # an AU never present: unweighted


class _Levels(Dataset):
    """Images whose brightness is the AU's level: a tiny task the head can learn."""

    def __init__(self, n: int = 96, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.levels = rng.integers(0, 6, size=(n, 2)).astype(np.float32)
        self.levels[rng.uniform(size=(n, 2)) < 0.1] = 999

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> dict:
        level = self.levels[i]
        known = level != 999
        value = np.where(known, level, 0)
        image = np.zeros((3, 32, 32), np.float32)
        image[0, :16] = value[0] / 5
        image[1, 16:] = value[1] / 5
        return {"image": torch.from_numpy(image), "labels": torch.from_numpy((value > 0).astype(np.float32)),
                "mask": torch.from_numpy(known), "intensity": torch.from_numpy(value.astype(np.float32)),
                "intensity_mask": torch.from_numpy(known), "index": i}


def test_a_detector_with_the_head_trains_and_logs_icc_pcc_mae():
    torch.manual_seed(0)
    model = AUDetector(aus=[6, 12], backbone="resnet10t", branches=["face"], loss="bce", intensity_data=True,
                       intensity_level_counts=[[10, 10, 10, 5, 5], [10, 10, 10, 5, 5]],
                       optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    assert model.with_intensity and model.net.intensity_head is not None
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    train, val = DataLoader(_Levels(96, 0), batch_size=16), DataLoader(_Levels(48, 1), batch_size=16)
    trainer.fit(model, train, val)
    metrics = trainer.callback_metrics
    assert {"train/loss_intensity", "val/intensity_icc", "val/intensity_pcc", "val/intensity_mae",
            "val/intensity_icc/AU12"} <= set(metrics)
    # the per-AU report of the epoch: the logged figures, in its icc, pcc and mae columns
    scores = {"support": [48, 48], "positives": [20, 20], "f1": [0.5, 0.6], "accuracy": [0.7, 0.8],
              "mean_f1": 0.55, "mean_accuracy": 0.75}
    rows = au_report(model.aus, scores, scores, np.array([0.5, 0.5]),
                     intensity=logged_intensity(metrics, model.aus))
    assert list(rows[0])[-3:] == ["icc", "pcc", "mae"]
    for row, suffix in zip(rows, ("/AU6", "/AU12", "")):
        for key in ("icc", "pcc", "mae"):
            assert row[key] == round(float(metrics[f"val/intensity_{key}{suffix}"]), 4), (row["AU"], key)
    assert logged_intensity({"val/f1": 0.5}, model.aus) is None  # no head: no columns
    assert "icc" not in au_report(model.aus, scores, scores, np.array([0.5, 0.5]))[0]
    trainer.test(model, val, verbose=False)
    # the logged test figures are those of the reported intensities, recomputed here
    data = _Levels(48, 1)
    batch = next(iter(DataLoader(data, batch_size=48)))
    model.eval()
    _, decisions, reported = model.net.predict_intensity(batch["image"])
    assert (reported[~decisions] == 0).all() and (reported[decisions] >= 1).all()
    ref = intensity_scores(reported, batch["intensity"], batch["intensity_mask"])
    assert trainer.callback_metrics["test/intensity_icc"].item() == pytest.approx(ref["mean_icc"], abs=1e-5)
    assert trainer.callback_metrics["test/intensity_mae"].item() == pytest.approx(ref["mean_mae"], abs=1e-5)


def test_occurrence_only_models_are_unchanged():
    model = AUDetector(aus=[6, 12], backbone="resnet10t", branches=["face"], loss="bce")
    assert not model.with_intensity and model.net.intensity_head is None
    assert not any("intensity" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="needs AU<n>_intensity columns"):
        AUDetector(aus=[6], backbone="resnet10t", branches=["face"], loss="bce", intensity=True)
    off = AUDetector(aus=[6], backbone="resnet10t", branches=["face"], loss="bce", intensity=False,
                     intensity_data=True)
    assert off.net.intensity_head is None  # the ablation's row without the head
    with pytest.raises(ValueError, match="no intensity head"):
        AUNet(aus=[6], backbone="resnet10t", branches=["face"]).eval().predict_intensity(torch.zeros(1, 3, 32, 32))


def _intensity_predictor(aus=(1, 2, 12), crop=48):
    from datamodules.alignment.align import AlignmentSettings
    from lightning_modules.serving.predictor import AUPredictor

    torch.manual_seed(3)
    net = AUNet(aus=list(aus), backbone="resnet18", branches=["face"], intensity=True).eval()
    with torch.no_grad():
        net.thresholds.copy_(torch.tensor([0.3, 0.5, 0.7])[:len(aus)])
        net.head.bias.copy_(torch.tensor([0.5, 0.0, -0.5])[:len(aus)])  # some AUs on, some off
    spec = {"aus": list(aus), "backbone": "resnet18", "branches": ["face"], "aux_heads": False, "intensity": True}
    return AUPredictor(net, AlignmentSettings(crop_size=crop), spec, device="cpu")


def test_predict_rows_carry_intensities_that_never_contradict_the_decisions(synthau, tmp_path):
    """Every row of a predict run over SynthAU's test split: AU<n>_intensity is 0 exactly where
    AU<n> is 0, and in [1, 5] where it is 1; the saved predictor reloads with its head."""
    import csv as csv_module

    from experiments.predict import run as run_predict
    from lightning_modules.serving.predictor import AUPredictor, columns

    predictor = _intensity_predictor()
    assert predictor.has_intensity
    out = tmp_path / "rows.csv"
    run_predict(predictor, [str(synthau / "images" / "test")], str(out), progress=False)
    with open(out, newline="") as f:
        rows = list(csv_module.DictReader(f))
    assert list(rows[0]) == columns(predictor.aus, intensity=True, person=True)
    faces = [r for r in rows if r["status"] == "ok"]
    assert len(faces) >= 10
    seen = set()
    for r in faces:
        for au in ("AU1", "AU2", "AU12"):
            level, decided = float(r[f"{au}_intensity"]), int(r[au])
            assert (level == 0) if not decided else (1 <= level <= 5), (r["source"], au, level, decided)
            seen.add(decided)
    assert seen == {0, 1}  # both sides of the rule were exercised
    reloaded = AUPredictor.from_dir(predictor.save(tmp_path / "saved"), device="cpu")
    assert reloaded.has_intensity
    crops = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    for a, b in zip(predictor.classify_intensity(crops), reloaded.classify_intensity(crops)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_pyfunc_signature_names_the_intensity_columns():
    from lightning_modules.serving.pyfunc import signature

    names = signature([1, 12], intensity=True).outputs.input_names()
    assert names[-2:] == ["AU1_intensity", "AU12_intensity"]
    assert "AU1_intensity" not in signature([1, 12]).outputs.input_names()


@pytest.mark.parametrize("detach", [True, False])
def test_a_detached_head_leaves_occurrence_training_as_without_it(detach):
    """Same start, same batches, plain SGD: with ``intensity_detach`` the branches and the
    occurrence head end where an occurrence-only model ends (the head changes nothing upstream);
    trained jointly, they do not."""
    torch.manual_seed(0)
    joint = AUDetector(aus=[6, 12], backbone="resnet10t", branches=["face"], loss="bce", intensity_data=True,
                       intensity_detach=detach)
    alone = AUDetector(aus=[6, 12], backbone="resnet10t", branches=["face"], loss="bce", intensity=False,
                       intensity_data=True)
    alone.load_state_dict({k: v for k, v in joint.state_dict().items() if "intensity" not in k})
    batches = list(DataLoader(_Levels(48, 2), batch_size=16))
    for model in (joint, alone):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for batch in batches:
            optimizer.zero_grad()
            model.model_step(batch)[0].backward()
            optimizer.step()
    shared = {k: v for k, v in alone.state_dict().items() if "intensity" not in k and v.is_floating_point()}
    gap = max((joint.state_dict()[k] - v).abs().max().item() for k, v in shared.items())
    assert (gap < 1e-6) if detach else (gap > 1e-4), gap
