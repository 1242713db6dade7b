"""Tracking-server trouble as a user meets it: found at every stage's start within seconds (before any work),
never fatal once a stage runs, reported at the end; runs of killed processes do not stay RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_entrypoint_here, write_micro_params

from maptr.training.tracking import StageRun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hanging_server():
    """An HTTP server that answers /health and leaves every API call hanging (until the test ends)."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                release.wait(30)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_server_answering_health_but_hanging_fails_at_stage_start_within_seconds(
    hanging_server, packed_world, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", hanging_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    params = write_micro_params(tmp_path, float={"epochs": 1})
    start = time.monotonic()
    code = run_entrypoint_here("float_train.py", "--params", str(params), "--packed", str(packed_world), "--best",
                               str(tmp_path / "best.pt"), "--metrics", str(tmp_path / "float.json"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"error: MLflow tracking server {hanging_server} is unreachable" in err
    assert "/api/2.0/mlflow/experiments/get-by-name" in err and time.monotonic() - start < 15
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "float.json").exists()


@pytest.mark.parametrize(
    "script", ["sensitivity.py", "calibrate.py", "qat.py", "export.py", "compile.py", "validate.py"]
)
def test_every_tracked_stage_checks_the_server_before_any_work(script, tmp_path, monkeypatch, capsys):
    # Inputs at their default paths are missing too: the tracking check must come first, not at the end.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.chdir(tmp_path)
    params = write_micro_params(tmp_path)
    code = run_entrypoint_here(script, "--params", str(params))
    err = capsys.readouterr().err
    assert code == 2 and "error: MLflow tracking server http://127.0.0.1:9 is unreachable" in err, err[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_queued_metrics_are_logged_once_the_server_answers_again(monkeypatch, capsys, mlflow_store):
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(StageRun, "RETRY_PAUSE_S", 0.0, raising=False)
    monkeypatch.setattr(StageRun, "QUIET_S", 0.0, raising=False)
    real, calls = mlflow.log_metrics, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if 2 <= len(calls) <= 5:  # steps 1 and 2 fail twice each (two tries per call)
            raise MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed")
        return real(*args, **kwargs)

    with StageRun("float-train", {}) as run:
        monkeypatch.setattr(mlflow, "log_metrics", flaky)
        for step in range(4):
            run.log_metrics({"loss": float(step)}, step=step)
        run_id = mlflow.active_run().info.run_id
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_store)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "metrics (step 1) failed" in err and "answering again" in err and "not logged" not in err
    assert client.get_run(run_id).info.status == "FINISHED"


_STAGE_THAT_HANGS = textwrap.dedent("""
    import sys, time
    from maptr import cli
    from maptr.training.tracking import StageRun

    def main():
        with StageRun("float-train", {}) as run:
            print(run._mlflow.active_run().info.run_id, flush=True)
            time.sleep(60)

    cli.run(main)
""")


def test_runs_of_killed_stages_do_not_stay_running(mlflow_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stages = [subprocess.Popen([sys.executable, "-c", _STAGE_THAT_HANGS], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    terminated_id, killed_id = (stage.stdout.readline().strip() for stage in stages)  # their runs are open
    stages[0].send_signal(signal.SIGTERM)  # a scheduler, or torchrun stopping its workers
    stages[1].send_signal(signal.SIGKILL)  # nothing runs in the process any more: the next stage ends its run
    assert stages[0].wait(timeout=60) == 143 and stages[1].wait(timeout=60) == -signal.SIGKILL
    assert client.get_run(terminated_id).info.status == "KILLED"
    with StageRun("next-stage", {}):
        pass
    assert client.get_run(killed_id).info.status == "KILLED"
