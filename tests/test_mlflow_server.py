"""Real components on loopback: an `mlflow server` on 127.0.0.1 (free port, sqlite, temporary folder)
receives a tiny float-train under torchrun, read back through the client; torchrun with two nodes (two
agents, c10d rendezvous on 127.0.0.1) trains to the same metrics as two processes on one node and logs
one group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import float_train_cmd, float_train_env, write_micro_params

from maptr.training.lineage import dvc_dir_md5

SERVER_START_S = 180  # ~12 s on an idle machine; several times that on a busy 2-core one
FLOAT = {"epochs": 2, "batch_size": 2, "num_workers": 0, "warmup_steps": 1, "log_every_steps": 1, "cache_mb": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>, sqlite store and proxied artifacts in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
           "--workers", "1"]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + SERVER_START_S
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                tail = (root / "server.log").read_text()[-2000:]
                pytest.fail(f"mlflow server did not answer in {SERVER_START_S} s: {tail}")
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def train(server: str, out: Path, packed: Path, group: str, launcher: list[list[str]]) -> dict:
    """float-train (micro, 2 epochs) under each command prefix of ``launcher`` at once (one per torchrun
    agent), logging to ``server`` in group ``group``; returns float.json."""
    out.mkdir(parents=True, exist_ok=True)
    params = write_micro_params(out, float=FLOAT)
    script = float_train_cmd(params, out, packed)[1:]  # [float_train.py, --params ..., outputs in out]
    env = {**float_train_env(out), "MLFLOW_TRACKING_URI": server, "MAPTR_RUN_GROUP": group,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
           "GLOO_SOCKET_IFNAME": "lo", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip
    procs = [subprocess.Popen([*prefix, *script], cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for prefix in launcher]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return json.loads((out / "float.json").read_text())


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--max_restarts", "0", *args]


@pytest.fixture(scope="module")
def one_node(server, packed_world, tmp_path_factory):
    """Two processes on one node (`--nproc_per_node=2`)."""
    out = tmp_path_factory.mktemp("one_node")
    return out, train(server, out, packed_world, "one-node", [torchrun("--nproc_per_node", "2")])


def group_runs(server: str, group: str) -> tuple:
    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    runs = [r for r in runs if r.info.run_name.endswith(f" {group}") or r.info.run_name.startswith(f"{group} (")]
    parents = [r for r in runs if r.data.tags.get("maptr.role") == "group"]
    children = [r for r in runs if r not in parents]
    return client, experiment, parents, children


def test_float_train_logged_to_a_real_server_reads_back(server, one_node, packed_world, tmp_path):
    out, metrics = one_node
    client, experiment, parents, children = group_runs(server, "one-node")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,), (run,) = parents, children
    assert parent.info.run_name == "one-node (micro)" and run.info.run_name == "float-train · one-node"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
    assert parent.data.params["float.epochs"] == "2" and parent.data.params["model.preset"] == "micro"
    assert run.data.tags["params_hash"] == parent.data.tags["params_hash"]
    # final val metrics under the shared keys; the per-epoch history under epoch/, step = epoch
    for key in ("mAP", "AP_divider", "AP_ped_crossing", "AP_boundary", "AP_boundary_1.5"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    curve = json.loads((out / "curve.json").read_text())
    history = client.get_metric_history(run.info.run_id, "epoch/mAP")
    assert [(m.step, m.value) for m in history] == [(e["epoch"], pytest.approx(e["mAP"])) for e in curve]
    assert not any(k.startswith(("best/", "val/")) for k in run.data.metrics)
    # opened when the stage started: the run spans the training epochs; system metrics sampled
    epoch_seconds = [m.value for m in client.get_metric_history(run.info.run_id, "epoch/seconds")]
    assert len(epoch_seconds) == 2 and (run.info.end_time - run.info.start_time) / 1000 >= sum(epoch_seconds)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dvc_dir_md5(packed_world)
    assert json.loads(dataset_input.dataset.profile)["train_samples"] == 8
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    # the best checkpoint as an artifact: a state_dict file that loads with weights_only=True
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/best.pt",
                                               dst_path=str(tmp_path), tracking_uri=server)  # fmt: skip
    state = torch.load(path, weights_only=True)
    assert state["preset"] == "micro" and all(isinstance(v, torch.Tensor) for v in state["model"].values())


def test_torchrun_two_nodes_on_loopback_match_one_node_and_log_one_group(server, one_node, packed_world, tmp_path):
    _, one = one_node
    port = str(free_port())
    node = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                    f"127.0.0.1:{port}", "--rdzv_id", "maptr-two-nodes", "--local_addr", "127.0.0.1")  # fmt: skip
    two = train(server, tmp_path, packed_world, "two-nodes", [node, node])
    assert two == one  # same world size, same shards, same batches: the same numbers
    _, _, parents, children = group_runs(server, "two-nodes")
    assert len(parents) == 1 and [r.data.tags["stage"] for r in children] == ["float-train"]  # rank 0 alone
    assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert children[0].data.metrics["mAP"] == pytest.approx(two["mAP"])
