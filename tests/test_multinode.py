"""Two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, one gloo process each) fit into one MLflow run
on a shared ``mlflow server``, with the thresholds one process computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from .training_helpers import free_port, matches_one_process, small_fit_args, write_mlflow_yaml

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_two_nodes_fit_one_run(synthau_13_val, tmp_path, mlflow_server):
    """Each "node" is a torchrun agent of its own, started in its own folder as on its own machine;
    they meet at the c10d rendezvous of node 0. The data, cache and checkpoints are on the shared
    filesystem (here: tmp_path). Only global rank 0 writes to the tracking server."""
    root = synthau_13_val  # val: 13 scenes
    cfg = write_mlflow_yaml(tmp_path / "mlflow.yaml", mlflow_server, "two-nodes")
    args = small_fit_args(root, tmp_path / "cache", cfg, tmp_path / "runs", epochs=1, train_batches=2)
    args += ["--data.synth.num_images", "130", "--data.batch_size", "4",
             "--mlflow_artifacts.log_model", "false",  # what is compared is the checkpoint
             "--trainer.accelerator", "cpu",
             "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in range(2):
        (tmp_path / f"node{node}").mkdir()
        nodes.append(subprocess.Popen(
            [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "au-detect-test",
             "--no-python", str(BIN / "au-detect"), "fit", *args],
            cwd=tmp_path / f"node{node}", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in nodes:
            proc.kill()
    for node, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {node}:\n{out[-3000:]}"
    assert sum("MLflow run " in out for out in outputs) == 1  # only global rank 0 speaks for the run

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.num_nodes"] == "2" and run.data.params["trainer.devices"] == "1"
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "thresholds.json", str(tmp_path))).read_text())
    matches_one_process(tmp_path / "runs", tmp_path / "cache", run, np.array(list(stored["thresholds"].values())),
                        ranks=2)
    leftovers = [p for n in range(2) for p in (tmp_path / f"node{n}").iterdir()]
    assert not leftovers, leftovers  # nothing written to a node's own folder
