"""benchmarks/gpu_check.py --smoke: the GPU acceptance run's code paths on the CPU, figures checked.

The FLOPs per image are checked against a count made here by hand (each convolution's and
linear layer's multiply-adds from its shapes), not by the counter the check itself uses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from datamodules.io.manifest import EMOTIONET_AUS
from lightning_modules.au_detector import AUNet

ROOT = Path(__file__).resolve().parents[1]


def hand_count(backbone: str, crop: int) -> tuple[float, float]:
    """FLOPs per image of the paper's AUNet (forward, forward + backward), from layer shapes.

    A convolution costs 2 * (Cin / groups) * kh * kw * Cout * Hout * Wout forward; its backward
    costs that again for the weights' gradient and again for the input's, unless the input needs
    none (the first convolution of each branch). Linear layers likewise. Normalisation, pooling
    and the loss are not model FLOPs.
    """
    model = yaml.safe_load((ROOT / "experiments" / "configs" / "emotionet_resnet152.yaml").read_text())["model"]
    net = AUNet(EMOTIONET_AUS, backbone, model["branches"], aux_heads=model["aux_heads"])
    forward = backward = 0.0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal forward, backward
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops = 2 * module.in_channels // module.groups * kh * kw * output[0].numel()
        else:
            flops = 2 * module.in_features * module.out_features
        forward += flops
        backward += flops * (2 if inputs[0].requires_grad else 1)

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    net(torch.zeros(1, 3, crop, crop))
    return forward, forward + backward


@pytest.mark.slow
def test_smoke_run_reports_sane_figures(tmp_path):
    out = tmp_path / "x.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert "| check | figure | value | note |" in done.stdout and report["table"] in done.stdout
    s, train = report["settings"], report["train"]
    assert (report["smoke"], s["device"], s["backbone"], s["crop_size"]) == (True, "cpu", "resnet18", 64)

    eager = train["eager"]
    forward, total = hand_count(s["backbone"], s["crop_size"])
    assert eager["flops_per_image_forward"] == pytest.approx(forward, rel=0.01)
    assert eager["flops_per_image"] == pytest.approx(total, rel=0.01)
    for row in (eager, train["compiled"]):  # the smoke compiles too (Dynamo, eager backend)
        assert row["images_per_s"] > 0 and row["step_ms"] > 0
        assert row["achieved_flops"] == pytest.approx(eager["flops_per_image"] * row["images_per_s"])
        assert row["mfu"] is None and row["peak_memory_bytes"] is None  # CPU: no peak, no CUDA memory
    assert train["compiled"]["compile_s"] >= 0
    assert report["device"]["peak_flops"] is None and "CUDA" in report["device"]["peak_source"]
    lb = train["largest_batch"]
    assert lb["batch"] == lb["cap"] == 8 and lb["capped"] and all(ok for _, ok in lb["tries"])

    assert report["ddp"]["processes"] == 2 and report["ddp"]["backend"] == "gloo"
    assert report["ddp"]["images_per_s"] == pytest.approx(2 * report["ddp"]["images_per_s_per_process"])
    assert report["ddp"]["images_per_s"] > 0

    mtcnn = report["mtcnn"]
    assert mtcnn["device"]["scenes_per_s"] > 0 and mtcnn["cpu"]["scenes_per_s"] > 0
    assert mtcnn["device"]["faces"] >= 1  # SynthAU scenes hold a face each
    for precision in ("32-true", "bf16-mixed"):
        assert report["predict"][precision]["images_per_s"] > 0 and report["predict"][precision]["faces"] >= 1

    video = report["video"]
    assert video["every_1"]["frames"] == video["every_10"]["frames"] == 24  # 3 s at 8 fps
    assert video["every_1"]["faces"] >= 24 and abs(video["faces_change"]) <= 0.05
    assert video["speedup"] == pytest.approx(video["every_10"]["frames_per_s"] / video["every_1"]["frames_per_s"])

    loader = report["loader"]
    assert loader["crops_per_s_per_core"] > 0 and loader["crop_size"] == 64
    best = max(eager["images_per_s"], train["compiled"]["images_per_s"])
    assert loader["cores_per_gpu"] == pytest.approx(best / loader["crops_per_s_per_core"])
    print(f"gpu_check --smoke: {seconds:.1f} s")
