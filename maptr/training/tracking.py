"""MLflow tracking for every stage: one run per stage, nested in its chain run's group, in one experiment.

Groups, run names and the experiment's kind: :mod:`maptr.training.run_group`.

Default store: ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlartifacts``, absolute
paths, so that runs made in DVC's temporary workspaces (``dvc exp run --temp`` / ``--queue``, which run
under ``<repo>/.dvc/tmp/exps/...``) land in the same database that a plain ``mlflow ui`` in the repository
root shows. ``MLFLOW_TRACKING_URI`` points it at a tracking server instead; an unreachable server fails
within seconds with the URI in the message.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from maptr.config import load_params
from maptr.training import run_group

EXPERIMENT = "maptr-pipeline"


class TrackingError(RuntimeError):
    """The tracking store cannot be used: names the URI and the fix."""


def repo_root() -> Path:
    """The project root, also from inside a DVC temporary experiment workspace."""
    cwd = Path.cwd().resolve()
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    if marker in str(cwd) + os.sep:
        return Path((str(cwd) + os.sep).split(marker)[0])
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return cwd


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable HTTP tracking server (MLflow itself would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)  # noqa: S310 (user-given URI)
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it or unset MLFLOW_TRACKING_URI "
            "to log to the local mlflow.db"
        ) from None


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested params -> MLflow's flat ``a.b.c`` keys (lists are logged as their text)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


class StageRun:
    """An MLflow run for one stage; a no-op on non-zero ranks so that only rank 0 writes.

    Usage::

        with StageRun("float-train", params={"float": {...}}, enabled=is_rank0) as run:
            run.log_metrics({"mAP": 0.3}, step=epoch)
            run.log_artifact("metrics/float.json")
    """

    def __init__(self, stage: str, params: dict[str, Any], enabled: bool = True, tags: dict[str, str] | None = None,
                 params_file: str | Path | None = None, system_metrics: bool = False):  # fmt: skip
        self.stage, self.params, self.enabled, self.tags = stage, params, enabled, tags or {}
        self.params_file, self.system_metrics = params_file, system_metrics
        self._mlflow = None
        self.run_id = self.parent_id = self.experiment_id = self.group = None

    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        # Fail fast instead of MLflow's long retry loops on a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        uri = tracking_uri()
        check_server(uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        location = None if uri.startswith("http") else (repo_root() / "mlartifacts").as_uri()
        client = mlflow.MlflowClient()
        self.experiment_id = run_group.ensure_experiment(client, name, location)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        all_params = load_params(self.params_file) if self.params_file else {}
        self.group = group = run_group.group_context(all_params)
        self.parent_id = run_group.parent_run(client, self.experiment_id, group, all_params)
        tags = {"stage": self.stage, "git_revision": git_revision(), **group.tags(), **self.tags}
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
        run = mlflow.start_run(run_name=run_group.stage_run_name(self.stage, group), parent_run_id=self.parent_id,
                               tags=tags, log_system_metrics=self.system_metrics)  # fmt: skip
        self.run_id = run.info.run_id
        flat = {k: str(v) if isinstance(v, list) else v for k, v in flatten("", self.params).items()}
        mlflow.log_params(flat)
        self._mlflow = mlflow
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None:
            killed = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
            status = "FINISHED" if exc_type is None else "KILLED" if killed else "FAILED"
            self._mlflow.end_run(status=status)
            run_group.end_parent(self._mlflow.MlflowClient(), self.parent_id, status)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)
