"""Failure safety as a user meets it: killed stages leave nothing that looks finished, bad input gives one
clear line and a non-zero exit code, an unreachable tracking server fails fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import float_train_cmd, float_train_env, write_micro_params

REPO = Path(__file__).resolve().parents[1]


def test_sigkill_during_pack_then_rerun(tiny_world, tmp_path):
    out = tmp_path / "packed"
    cmd = [sys.executable, str(REPO / "pipeline" / "pack.py"), "--dataroot", str(tiny_world), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob("packed.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)  # wait until packing has started writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed pack left an output that looks finished"
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "metas" / "info.json").is_file() and not list(tmp_path.glob("packed.tmp-*"))


def _global_step(last: Path) -> int:
    """Optimizer steps recorded in a resume checkpoint (0 while none is written yet)."""
    try:
        return torch.load(last, map_location="cpu", weights_only=True)["train_state"]["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def _curve_without_times(out: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in json.loads((out / "curve.json").read_text())]


def test_sigkill_during_float_train_leaves_no_best_checkpoint_and_resume_matches_uninterrupted(packed_world, tmp_path):
    # 8 micro training samples, batch 2: 4 steps per epoch, a resume checkpoint after every step.
    params = write_micro_params(tmp_path, float={"epochs": 2, "warmup_steps": 1, "ckpt_every_steps": 1, "threads": 1})
    ref, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    for out in (ref, killed):
        out.mkdir()
    res = subprocess.run(float_train_cmd(params, ref, packed_world), cwd=ref, env=float_train_env(ref),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]

    cmd = float_train_cmd(params, killed, packed_world, resume=True)
    proc = subprocess.Popen(cmd, cwd=killed, env=float_train_env(killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while _global_step(killed / "last.pt") < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # wait until training is inside epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "float-train finished before it could be killed"
    assert not (killed / "float.json").exists(), "a killed float-train left metrics that look finished"
    assert not (killed / "best.pt").exists(), "a killed float-train left an epoch-1 best checkpoint that loads fine"

    res = subprocess.run(cmd, cwd=killed, env=float_train_env(killed), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    expected = json.loads((ref / "float.json").read_text())
    got = json.loads((killed / "float.json").read_text())
    assert got == expected
    assert _curve_without_times(killed) == _curve_without_times(ref)
    assert not list(killed.glob("*.tmp*")), "temporary files left behind"


def test_wrong_param_type_is_one_line_and_nonzero(tmp_path, packed_world):
    params = write_micro_params(tmp_path, float={"lr": "fast"})
    res = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "float_train.py"), "--params", str(params), "--packed",
         str(packed_world)],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {params}: float.lr: expected a number, got 'fast'" in res.stderr


def test_unreachable_mlflow_server_fails_fast(tmp_path, packed_world):
    params = write_micro_params(tmp_path, float={"epochs": 1})
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing listens on the discard port
    start = time.time()
    res = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "float_train.py"), "--params", str(params), "--packed",
         str(packed_world), "--best", str(tmp_path / "b.pt"), "--last", str(tmp_path / "l.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in res.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("preset", ["r101"])
def test_unknown_preset_on_the_command_line(tmp_path, preset):
    params = write_micro_params(tmp_path, model={"preset": preset})
    res = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "predict.py"), "--params", str(params)],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "unknown preset 'r101'" in res.stderr and "Traceback" not in res.stderr


def test_mlflow_ui_binds_localhost_by_default():
    """`mlflow ui` (plain, as the README says) and `make ui` listen on 127.0.0.1 only."""
    import mlflow.cli

    host = next(p for p in mlflow.cli.server.params if p.name == "host")
    assert host.default == "127.0.0.1", "the pinned MLflow would expose the UI to the network"
    ui_recipe = (REPO / "Makefile").read_text().split("\nui:")[1].split("\n\n")[0]
    assert "mlflow ui" in ui_recipe and "--host 127.0.0.1" in ui_recipe and "0.0.0.0" not in ui_recipe


def _run_entrypoint(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pipeline" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_truncated_checkpoint_from_the_command_line(tmp_path, packed_world):
    params = write_micro_params(tmp_path)
    ckpt = tmp_path / "float-checkpoint-best.pt"
    torch.save({"model": {"w": torch.ones(1000)}, "preset": "micro"}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    res = _run_entrypoint("predict.py", "--params", str(params), "--packed", str(packed_world), "--checkpoint",
                          str(ckpt), cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {ckpt}: not a readable checkpoint (truncated or corrupt" in res.stderr


def test_corrupt_lmdb_record_from_the_command_line(tmp_path, packed_world):
    import shutil

    import lmdb

    packed = tmp_path / "packed"
    shutil.copytree(packed_world, packed)
    env = lmdb.open(str(packed / "val_lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        blob = bytearray(txn.get(b"0"))
        blob[-100] ^= 0xFF  # flip bits inside a JPEG
        txn.put(b"0", bytes(blob))
    env.close()
    params = write_micro_params(tmp_path)
    ckpt = tmp_path / "float.pt"
    from maptr.config import load_model_config, load_params
    from maptr.models.maptr import build_maptr
    from maptr.training.checkpoint import save_checkpoint

    model = build_maptr(load_model_config(load_params(params)))
    save_checkpoint(ckpt, {"model": model.state_dict(), "preset": "micro"})
    res = _run_entrypoint("predict.py", "--params", str(params), "--packed", str(packed), "--checkpoint", str(ckpt),
                          cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {packed / 'val_lmdb'} record 0: image payload fails its checksum" in res.stderr
    assert "re-run the pack stage" in res.stderr


def test_missing_table_from_the_command_line(tiny_world, tmp_path):
    import shutil

    root = tmp_path / "nuscenes"
    shutil.copytree(tiny_world, root)
    (root / "v1.0-trainval" / "calibrated_sensor.json").unlink()
    res = _run_entrypoint("pack.py", "--dataroot", str(root), "--out", str(tmp_path / "packed"), cwd=REPO)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "calibrated_sensor.json: table missing" in res.stderr
    assert not (tmp_path / "packed").exists()


def test_single_node_torchrun_commands_use_a_loopback_rendezvous():
    """The commands a user copies: one machine never needs to listen on the network; the README says when
    a multi-node run must."""
    docs = {name: (REPO / name).read_text() for name in ("README.md", "pipeline/float_train.py", "pipeline/qat.py")}
    commands = [(name, line) for name, text in docs.items() for line in text.splitlines() if "torchrun --" in line]
    assert len(commands) >= 4
    for name, line in commands:
        if "--nnodes" in line:
            assert "--rdzv-endpoint=" in line, f"{name}: {line}"
        else:
            assert "--standalone" in line or "--rdzv-endpoint=127.0.0.1:" in line, f"{name}: {line}"
    readme = " ".join(docs["README.md"].split())
    assert "Only a multi-node run must listen on the network" in readme and "GLOO_SOCKET_IFNAME=lo" in readme


class _Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("which", ["float", "resume"])
def test_pickle_payload_checkpoint_is_refused_and_never_run(packed_world, tmp_path, capsys, mlflow_store, which):
    from conftest import run_entrypoint_here

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "stage": "float", "extra": _Payload(marker)}, evil)
    params = write_micro_params(tmp_path, float={"epochs": 1, "num_workers": 0})
    if which == "float":
        args = ["predict.py", "--params", str(params), "--packed", str(packed_world), "--checkpoint", str(evil)]
    else:
        args = ["float_train.py", "--params", str(params), "--packed", str(packed_world), "--best",
                str(tmp_path / "best.pt"), "--last", str(evil), "--resume"]  # fmt: skip
    assert run_entrypoint_here(*args) == 2
    assert f"error: {evil}: not a readable checkpoint" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "best.pt").exists()
