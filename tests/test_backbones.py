"""Backbone weights: local checkpoints loaded safely and completely, or a clear error."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lightning_modules.au_detector import AUNet
from lightning_modules.backbones import WeightsError, create_backbone, load_backbone_weights


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    net, _ = create_backbone("resnet18")
    return net.state_dict()


def _same(a: torch.nn.Module, state: dict) -> bool:
    own = a.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k in own)


def test_lightning_checkpoint_with_prefixes_and_a_head(source, tmp_path):
    """A pretraining checkpoint: {"state_dict": {"model.backbone.<key>": ..., "model.head.weight": ...}}."""
    state = {f"model.backbone.{k}": v for k, v in source.items()}
    state["model.head.weight"] = torch.zeros(10, 512)
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    net, _ = create_backbone("resnet18")
    report = load_backbone_weights(net, path)
    assert report.stripped == ["model.", "backbone."]
    assert report.unexpected == ["head.weight"] and report.missing == []
    assert report.loaded == len(source)
    assert _same(net, source)


def test_safetensors_and_module_prefix(source, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in source.items()}, str(path))
    net, report = create_backbone("resnet18", str(path))
    assert report.loaded == len(source) and _same(net, source)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": collections.Counter(a=1), "fn": os.getcwd}, path)  # not tensors-only
    with pytest.raises(WeightsError, match=r"evil.pt: refused, it holds objects that are not tensors"):
        create_backbone("resnet18", str(path))


def test_missing_tensors_are_an_error_unless_allowed(source, tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in source.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(WeightsError, match="not in the file"):
        create_backbone("resnet18", str(path))
    net, report = create_backbone("resnet18", str(path), allow_missing=True)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)


def test_wrong_architecture_names_the_tensor(tmp_path):
    other, _ = create_backbone("resnet34")
    path = tmp_path / "r34.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError):  # resnet34 has more blocks: missing ones for resnet18 are unexpected
        create_backbone("resnet50", str(path))
    r50, _ = create_backbone("resnet50")
    torch.save(r50.state_dict(), path)
    with pytest.raises(WeightsError, match=r"has shape .* expects"):
        create_backbone("resnet18", str(path))


def test_unreadable_sources(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        create_backbone("resnet18", str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt: not a readable torch checkpoint"):
        create_backbone("resnet18", str(tmp_path / "junk.pt"))
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="no tensor matches"):
        create_backbone("resnet18", str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a timm ResNet"):
        create_backbone("vit_base_patch16_224")


@pytest.mark.slow
def test_timm_weights_offline_is_a_clear_error():
    code = ("from lightning_modules.backbones import create_backbone\n"
            "create_backbone('resnet18', 'timm')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network here: fail fast instead of retrying
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "WeightsError: timm pretrained weights for resnet18 could not be fetched" in proc.stderr
    assert "pass the file path" in proc.stderr


def test_aunet_branches_take_their_own_weights(source, tmp_path):
    path = tmp_path / "face.pt"
    torch.save(source, path)
    net = AUNet(aus=(1, 2, 12), backbone="resnet18", weights={"face": str(path)})
    assert _same(net.branches["face"], source)
    assert not _same(net.branches["emotion"], source)  # random, and said so
    assert net.load_reports["emotion"] == "random initialisation"
    assert "512" not in net.load_reports["face"] and "tensors loaded" in net.load_reports["face"]
    x = torch.randn(2, 3, 64, 64)
    probs, decisions = net.predict(x)
    assert probs.shape == (2, 3) and torch.equal(decisions, probs >= 0.5)
    with pytest.raises(ValueError, match="branches"):
        AUNet(branches=("face", "nose"))
