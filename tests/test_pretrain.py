"""The pretraining stage: ArcFace head, face verification, the two modules and their data, and
the backbone checkpoints the AU model loads."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from datamodules.io.manifest import read_manifest
from datamodules.pretrain_datamodule import PretrainDataModule
from lightning_modules.au_detector import AUNet
from lightning_modules.backbones import create_backbone
from lightning_modules.pretrain import (ArcMarginHead, ExpressionModule, FaceRecognitionModule, best_threshold,
                                        verification_pairs, verification_scores)
from tests.training_helpers import SMALL_ALIGNMENT


def _trainer(tmp: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)


@pytest.fixture(scope="module")
def cache(aligned_train) -> Path:
    """The session's aligned SynthAU cache: the pretraining data reads train.tsv in EmotioNet form,
    so it finds the same cache (same key) and aligns nothing again."""
    return aligned_train.path.parent


def _datamodule(synthau: Path, cache: Path, task: str, **kw) -> PretrainDataModule:
    dm = PretrainDataModule(task=task, data_root=str(synthau), cache_dir=str(cache), alignment=SMALL_ALIGNMENT,
                            batch_size=16, num_workers=0, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _names_of(dm: PretrainDataModule, stage: str, synthau: Path, column: str) -> list[str]:
    """The class column of each sample of a split, read from the manifest by manifest line."""
    manifest = read_manifest(synthau / "train.tsv")
    row_of_line = {int(line): i for i, line in enumerate(manifest.lines)}
    ds = dm.datasets[stage]
    return [manifest.extra[column][row_of_line[int(dm.split.lines[r])]] for r in ds.rows]


@pytest.fixture(scope="module")
def face_run(synthau, cache, tmp_path_factory):
    L.seed_everything(0)
    dm = _datamodule(synthau, cache, "identity")
    model = FaceRecognitionModule(dm.num_classes, backbone="resnet18", embedding_dim=32)
    trainer = _trainer(tmp_path_factory.mktemp("face"))
    trainer.fit(model, dm)
    return dm, model, trainer


@pytest.fixture(scope="module")
def expression_run(synthau, cache, tmp_path_factory):
    L.seed_everything(0)
    dm = _datamodule(synthau, cache, "expression")
    model = ExpressionModule(dm.num_classes, backbone="resnet18", label_smoothing=0.1)
    trainer = _trainer(tmp_path_factory.mktemp("expression"))
    trainer.fit(model, dm)
    return dm, model, trainer


# -- (a) the ArcFace head ----------------------------------------------------------------------

def _head_at_angles(thetas: list[float], scale: float, margin: float, easy_margin: bool = False):
    """A 2-class head in 2-D, class 0 along x; features at the given angles to it (labels 0)."""
    head = ArcMarginHead(2, 2, scale=scale, margin=margin, easy_margin=easy_margin)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # norms differ: normalised away
    x = torch.tensor([[math.cos(t), math.sin(t)] for t in thetas]) * 5
    return head, x, torch.zeros(len(thetas), dtype=torch.long)


def test_arc_margin_zero_is_scaled_cosine():
    torch.manual_seed(0)
    head = ArcMarginHead(8, 5, scale=16.0, margin=0.0)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T
    assert torch.allclose(head(x, y), 16 * cos, atol=1e-5)
    assert torch.allclose(head(x), 16 * cos, atol=1e-5)


def test_arc_margin_target_logit_is_cos_theta_plus_m():
    s, m = 30.0, 0.5
    thetas = [0.3, 1.2, 2.4]  # theta + m < pi for all three
    head, x, y = _head_at_angles(thetas, s, m)
    logits = head(x, y)
    for k, t in enumerate(thetas):
        assert logits[k, 0].item() == pytest.approx(s * math.cos(t + m), abs=1e-4)
        # the other class (along y) keeps the plain cosine
        assert logits[k, 1].item() == pytest.approx(s * math.cos(math.pi / 2 - t), abs=1e-4)
    # without labels: no margin anywhere
    assert head(x)[:, 0].tolist() == pytest.approx([s * math.cos(t) for t in thetas], abs=1e-4)


def test_arc_margin_fallback_past_pi():
    s, m = 10.0, 0.5
    t = 3.0  # theta + m > pi: cos(theta) - m * sin(m) takes over (sin(pi - m) = sin(m))
    head, x, y = _head_at_angles([t], s, m)
    assert head(x, y)[0, 0].item() == pytest.approx(s * (math.cos(t) - m * math.sin(m)), abs=1e-4)
    easy, x, y = _head_at_angles([2.0, 0.4], s, m, easy_margin=True)  # cos < 0: no margin; cos > 0: margin
    assert easy(x, y)[:, 0].tolist() == pytest.approx([s * math.cos(2.0), s * math.cos(0.9)], abs=1e-4)


def test_arc_margin_gradients_finite():
    head = ArcMarginHead(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():  # one feature exactly on its class centre: cos = 1
        x[0] = head.weight[1]
    y = torch.tensor([1, 0, 2, 1, 0])
    F.cross_entropy(head(x, y), y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


# -- (b) face recognition ----------------------------------------------------------------------

def test_verification_on_separable_embeddings():
    g = torch.Generator().manual_seed(1)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(6, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(5, 3, generator=g)
    emb, labels = torch.cat([a, b]), torch.tensor([0] * 6 + [1] * 5)
    r = verification_scores(emb, labels, seed=0)
    assert r["accuracy"] == 1.0 and r["auc"] == pytest.approx(1.0)
    assert r["positive_pairs"] == 15 + 10 == r["negative_pairs"]
    # the threshold separates: every positive pair at or above it, every negative below
    e = F.normalize(emb, dim=1)
    sim = e @ e.T
    same = labels[:, None] == labels[None]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    assert sim[same & off].min() >= r["threshold"] > sim[~same].max()
    # one identity only, or no identity with two images: no verification
    assert verification_scores(emb[:6], labels[:6]) is None
    assert verification_scores(emb[:2], torch.tensor([0, 1])) is None


def test_verification_pairs_and_threshold_by_hand():
    labels = torch.tensor([3, 3, 3, 7, 7, 9])
    i, j, same = verification_pairs(labels, seed=5)
    assert int(same.sum()) == 4 and int((~same).sum()) == 4
    assert (labels[i[same]] == labels[j[same]]).all() and (labels[i[~same]] != labels[j[~same]]).all()
    assert len({(int(a), int(b)) for a, b in zip(i[~same], j[~same])}) == 4  # distinct negatives
    again = verification_pairs(labels, seed=5)
    assert all(torch.equal(p, q) for p, q in zip((i, j, same), again))  # seeded
    # overlapping scores: the best threshold is found among the distinct values
    scores = torch.tensor([0.9, 0.7, 0.4, 0.6, 0.2, 0.1])
    same = torch.tensor([True, True, True, False, False, False])
    acc, t = best_threshold(scores, same)
    assert acc == pytest.approx(5 / 6) and t == pytest.approx(0.4)  # the lower of the tied thresholds 0.4 / 0.7
    assert best_threshold(torch.tensor([0.5, 0.5]), torch.tensor([False, False]))[0] == 1.0  # "never the same"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_threshold_matches_brute_force_with_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(200, generator=g) * 20).round() / 20  # many ties
    same = torch.rand(200, generator=g) < 0.2 + 0.6 * scores
    s, y = scores.double().numpy(), same.numpy()
    candidates = np.r_[np.unique(s), s.max() + 1e-6]  # ascending, then "never the same"
    accuracy = np.array([accuracy_score(y, s >= t) for t in candidates])
    best = int(np.argmax(accuracy))  # the first maximum: the lowest threshold
    assert best_threshold(scores, same) == (accuracy[best], candidates[best])


def test_identity_split_holds_out_whole_identities(face_run, synthau):
    dm, _, _ = face_run
    train_names = _names_of(dm, "train", synthau, "identity")
    val_names = _names_of(dm, "val", synthau, "identity")
    assert set(train_names).isdisjoint(val_names) and len(set(val_names)) >= 2
    assert set(train_names) == set(dm.train_classes) and set(val_names) == set(dm.val_classes)
    assert dm.num_classes == len(set(train_names))
    # labels: training identities 0..num_classes-1 (the ArcFace classes), the held-out ones after
    train_labels, val_labels = dm.datasets["train"].labels, dm.datasets["val"].labels
    assert train_labels.max() < dm.num_classes <= val_labels.min()
    assert [dm.classes[k] for k in train_labels] == train_names
    assert [dm.classes[k] for k in val_labels] == val_names
    # the held-out people can be verified: some of them have two images
    assert len(val_names) > len(set(val_names))
    again = _datamodule(synthau, dm.hparams.cache_dir, "identity")
    assert again.val_classes == dm.val_classes  # seeded


def _validation_outputs(dm: PretrainDataModule, model: L.LightningModule) -> tuple[np.ndarray, np.ndarray]:
    """The trained model's outputs on the validation loader, in evaluation, with the labels."""
    outputs, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            batch = dm.on_after_batch_transfer(batch, 0)
            outputs.append(model(batch["image"]).numpy())
            labels.append(batch["label"].numpy())
    return np.concatenate(outputs), np.concatenate(labels)


def test_face_pretraining_logs_verification(face_run):
    """The logged verification figures, recomputed from the last validation's embeddings: cosine
    scores of the seeded pairs, ROC AUC by scikit-learn, the best accuracy over every threshold
    (the lowest of tied ones) by brute force."""
    dm, model, trainer = face_run
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and 0.0 <= float(m["train/accuracy"]) <= 1.0  # augmented batches
    emb, labels = _validation_outputs(dm, model)
    i, j, same = (t.numpy() for t in verification_pairs(torch.from_numpy(labels), seed=model.hparams.verification_seed,
                                                         max_pairs=model.hparams.max_pairs))
    assert same.any() and not same.all()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    scores = (unit[i] * unit[j]).sum(1)
    candidates = np.r_[np.unique(scores), scores.max() + 1e-6]
    accuracy = np.array([accuracy_score(same, scores >= t) for t in candidates])
    best = int(np.argmax(accuracy))
    assert float(m["val/verification_accuracy"]) == pytest.approx(accuracy[best], abs=1e-6)
    assert float(m["val/verification_threshold"]) == pytest.approx(candidates[best], abs=1e-5)
    assert float(m["val/verification_auc"]) == pytest.approx(roc_auc_score(same, scores), abs=1e-5)
    assert trainer.global_step == 3
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 64, 64)
    assert batch["label"].dtype == torch.long and batch["index"].dtype == torch.long
    model.eval()
    with torch.no_grad():
        emb = model(dm.on_after_batch_transfer(batch, 0)["image"])
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5)


# -- (c) expressions ---------------------------------------------------------------------------

def test_expression_pretraining(expression_run, synthau):
    dm, model, trainer = expression_run
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"])
    # the logged validation figures, recomputed from the last validation's logits with scikit-learn
    logits, labels = _validation_outputs(dm, model)
    predicted = logits.argmax(1)
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    assert float(m["val/accuracy"]) == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    # macro over the classes in the labels or the predictions (torchmetrics' and scikit-learn's rule)
    assert float(m["val/f1_macro"]) == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-6)
    assert float(m["val/loss"]) == pytest.approx(log_loss(labels, probs, labels=range(dm.num_classes)), abs=1e-5)
    assert dm.num_classes == len(dm.classes) == model.head.out_features
    # samples split, not classes; labels follow the sorted names
    assert dm.classes == sorted(dm.classes)
    for stage in ("train", "val"):
        assert [dm.classes[k] for k in dm.datasets[stage].labels] == _names_of(dm, stage, synthau, "expression")
    assert set(dm.datasets["train"].rows).isdisjoint(dm.datasets["val"].rows)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == len(dm.split)


def test_expression_class_list_and_weights(synthau, cache):
    from datamodules.synthau.labels import EXPRESSIONS

    fixed = list(EXPRESSIONS)
    dm = _datamodule(synthau, cache, "expression", classes=fixed)
    assert dm.classes == fixed and dm.num_classes == 8
    model = ExpressionModule(8, backbone="resnet18", class_weights=[1.0] * 7 + [2.0])
    assert model.class_weights.tolist() == [1.0] * 7 + [2.0]
    with pytest.raises(ValueError, match="class_weights"):
        ExpressionModule(8, backbone="resnet18", class_weights=[1.0])
    with pytest.raises(ValueError, match="not in data.classes"):
        _datamodule(synthau, cache, "expression", classes=fixed[:3])


# -- (d) backbone checkpoints the AU model loads ------------------------------------------------

@pytest.mark.parametrize("run", ["face_run", "expression_run"])
def test_saved_backbone_loads_into_au_model(run, request, tmp_path):
    _, model, _ = request.getfixturevalue(run)
    path = model.save_backbone(tmp_path / "backbone.pt")
    expected = model.backbone_state_dict()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"state_dict"} and set(saved["state_dict"]) == {f"backbone.{k}" for k in expected}

    net, report = create_backbone("resnet18", str(path))
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(expected)
    assert report.stripped == ["backbone."]
    for k, v in net.state_dict().items():
        assert torch.equal(v, expected[k]), k

    au = AUNet(aus=(1, 2), backbone="resnet18", weights={"face": str(path)})
    assert "0 missing" in au.load_reports["face"] and f"{len(expected)} tensors loaded" in au.load_reports["face"]
    random_start = create_backbone("resnet18")[0].state_dict()
    for k, v in au.branches["face"].state_dict().items():
        assert torch.equal(v, expected[k]), k
    # the loaded weights are the trained ones, not a fresh random start
    assert not torch.equal(au.branches["face"].state_dict()["conv1.weight"], random_start["conv1.weight"])
    trained = [k for k in expected if k.endswith("running_mean")]
    assert any(not torch.equal(expected[k], random_start[k]) for k in trained)  # BN statistics moved


# -- (e) an image-folder tree -----------------------------------------------------------------

def test_image_folder_source(synthau, tmp_path):
    manifest = read_manifest(synthau / "train.tsv")
    tree = tmp_path / "faces"
    expected = {}
    for c, name in enumerate(["bob", "alice", "carol"]):
        (tree / name).mkdir(parents=True)
        for k in range(3):
            src = Path(manifest.resolve(3 * c + k))
            dst = tree / name / f"{k}_{src.name}"
            shutil.copy(src, dst)
            expected[os.path.abspath(dst)] = name
    (tree / "alice" / "notes.txt").write_text("not an image")
    cache = tmp_path / "cache"
    dm = PretrainDataModule(task="expression", image_folder=str(tree), cache_dir=str(cache), alignment=SMALL_ALIGNMENT,
                            batch_size=4, num_workers=0, val_fraction=0.34, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == ["alice", "bob", "carol"] and dm.num_classes == 3
    derived = read_manifest(next(cache.glob("imagefolder-faces-*.tsv")), aus=(1,))
    assert not derived.mask.any()  # the dummy AU column is all 999
    seen = {}
    for stage in ("train", "val"):
        ds = dm.datasets[stage]
        for r, label in zip(ds.rows, ds.labels):
            row = int(np.flatnonzero(derived.lines == dm.split.lines[r])[0])
            seen[derived.images[row]] = dm.classes[label]
    assert seen == expected
    assert len(dm.datasets["val"]) == 3  # one per class
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 64, 64)
    assert abs(float(batch["image"].mean())) < 3

    ident = PretrainDataModule(task="identity", image_folder=str(tree), cache_dir=str(cache),
                               alignment=SMALL_ALIGNMENT, num_workers=0)
    with pytest.raises(ValueError, match="at least 4 identities"):
        ident.setup()


def test_source_errors(tmp_path, synthau):
    with pytest.raises(FileNotFoundError, match="SynthAU has not been generated"):
        PretrainDataModule(data_root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="not both"):
        PretrainDataModule(manifest=str(synthau / "train.tsv"), image_folder=str(tmp_path))
    with pytest.raises(ValueError, match="task"):
        PretrainDataModule(task="age")
    with pytest.raises(ValueError, match="'gender' column"):
        PretrainDataModule(data_root=str(synthau), column="gender", cache_dir=str(tmp_path)).setup()
