"""A DDP fit on 2 CPU processes (gloo) is one MLflow run whose thresholds and scores are those one
process computes from the same model's predictions. Two launches: Lightning's own
(``--trainer.devices 2``, one command), and two torchrun "nodes" on 127.0.0.1 meeting at a c10d
rendezvous (``--trainer.num_nodes 2``), each started in its own folder as on its own machine, with
the data, cache and checkpoints on the shared filesystem (here: tmp_path) and a shared
``mlflow server``. (A killed fit's resume: test_crash_consistency.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from callbacks.soft_threshold import MIN_POSITIVES, fit_thresholds
from datamodules.alignment.crop_cache import AlignedSplit
from lightning_modules.au_detector import AUDetector
from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.metrics import au_scores

from .training_helpers import free_port, small_fit_args, write_mlflow_yaml

BIN = Path(sys.executable).parent


def matches_one_process(runs: Path, cache: Path, run, thresholds: np.ndarray, ranks: int) -> None:
    """A distributed fit's run against one process: the best checkpoint's model on the whole
    validation cache (13 samples, which DistributedSampler pads) gives the thresholds and scores
    the run logged, and the checkpoint carries the run's id."""
    (ckpt,) = [p for p in runs.glob("**/*.ckpt") if p.name != "last.ckpt"]
    assert load_checkpoint(ckpt)["mlflow_run_id"] == run.info.run_id
    model = AUDetector.load_from_checkpoint(ckpt, map_location="cpu").eval()
    np.testing.assert_allclose(model.thresholds.numpy(), thresholds, atol=1e-6)
    (val_cache,) = [p for p in cache.iterdir() if p.name.startswith("val-")]
    split = AlignedSplit.open(val_cache)
    assert len(split) == 13 and split.report["ranks"] == ranks  # aligned in setup, the images shared by the ranks
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(np.array(split.crops)).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        probs = torch.sigmoid(model(x)).numpy()
    single = fit_thresholds(probs, split.labels, split.mask, "f1", MIN_POSITIVES)  # the callback's default rule
    np.testing.assert_allclose(single, thresholds, atol=1e-5)
    metrics = run.data.metrics
    at_half = au_scores(probs, split.labels, split.mask, 0.5)
    at_fitted = au_scores(probs, split.labels, split.mask, single)
    assert metrics["val/f1"] == pytest.approx(at_half["mean_f1"], abs=1e-5)
    assert metrics["val/accuracy"] == pytest.approx(at_half["mean_accuracy"], abs=1e-5)
    assert metrics["val/f1_fitted"] == pytest.approx(at_fitted["mean_f1"], abs=1e-5)


def _one_command(args: list[str], folder: Path) -> list[str]:
    done = subprocess.run([str(BIN / "au-detect"), "fit", *args], cwd=folder, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [done.stdout + done.stderr]


def _two_nodes(args: list[str], folder: Path) -> list[str]:
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in range(2):
        (folder / f"node{node}").mkdir()
        nodes.append(subprocess.Popen(
            [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "au-detect-test",
             "--no-python", str(BIN / "au-detect"), "fit", *args],
            cwd=folder / f"node{node}", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in nodes:
            proc.kill()
    for node, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {node}:\n{out[-3000:]}"
    leftovers = [p for n in range(2) for p in (folder / f"node{n}").iterdir()]
    assert not leftovers, leftovers  # nothing written to a node's own folder
    return outputs


LAUNCHES = {"devices": (["--trainer.devices", "2"], _one_command),
            "nodes": (["--trainer.num_nodes", "2", "--trainer.devices", "1"], _two_nodes)}


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_ddp_fit_is_one_run_that_matches_one_process(launch, synthau_13_val, tmp_path, request):
    """Validation on 2 ranks (DistributedSampler pads 13 samples to 14) fits the thresholds and
    scores one process computes; the two ranks aligned the data together; only global rank 0
    speaks for the run."""
    uri = request.getfixturevalue("mlflow_server") if launch == "nodes" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"ddp-{launch}"
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", uri, experiment)
    options, start = LAUNCHES[launch]
    args = [*small_fit_args(synthau_13_val, tmp_path / "cache", cfg, tmp_path / "runs", epochs=1, train_batches=2),
            "--data.synth.num_images", "130", "--data.batch_size", "4",  # val: 13 scenes
            "--mlflow_artifacts.log_model", "false",  # what is compared is the checkpoint
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", *options]
    outputs = start(args, tmp_path)
    assert sum(out.count("MLflow run ") for out in outputs) == 1, outputs

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.strategy"] == "ddp"
    given = dict(zip(options[::2], options[1::2]))  # the launch's own options, as the run's params
    assert {k: run.data.params[k.removeprefix("--")] for k in given} == given
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "thresholds.json", str(tmp_path))).read_text())
    matches_one_process(tmp_path / "runs", tmp_path / "cache", run, np.array(list(stored["thresholds"].values())),
                        ranks=2)
