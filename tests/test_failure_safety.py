"""Failure safety as a user meets it: killed stages leave nothing that looks finished, bad input gives one
clear line and a non-zero exit code, an unreachable tracking server fails fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_micro_params

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
