"""MLflow tracking for every stage: one run per stage, nested in its chain run's group, in one experiment.

Groups, run names and the experiment's kind: :mod:`maptr.training.run_group`.

Default store: ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlartifacts``, absolute
paths, so that runs made in DVC's temporary workspaces (``dvc exp run --temp`` / ``--queue``, which run
under ``<repo>/.dvc/tmp/exps/...``) land in the same database that a plain ``mlflow ui`` in the repository
root shows. ``MLFLOW_TRACKING_URI`` points it at a tracking server instead.

Server trouble: every stage checks the store when it starts (:func:`check_tracking`: an unreachable server,
or one that answers ``/health`` but not its API, fails within seconds with the URI in the message, before
any work). Once a stage runs, tracking never stops it: a failed call is retried, then queued and retried
later, and what could not be logged is listed on stderr when the stage ends (the local outputs hold it).
A run whose process was killed (SIGKILL) is ended as KILLED by the next stage that starts on that machine.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
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


def _check_seconds() -> float:
    """Seconds the start-of-stage check waits for each answer (never more than MLflow's own timeout)."""
    return min(5.0, float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")))


def _unreachable(uri: str, why: str) -> TrackingError:
    return TrackingError(
        f"MLflow tracking server {uri} is unreachable ({why}); start it or unset MLFLOW_TRACKING_URI "
        "to log to the local mlflow.db"
    )


def check_server(uri: str, timeout: float | None = None) -> None:
    """Fail fast on an HTTP tracking server that does not answer: ``/health``, then one read-only API call
    (a server can answer the first and hang on the second). MLflow itself would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    timeout = _check_seconds() if timeout is None else timeout
    base = uri.rstrip("/")
    name = urllib.parse.quote(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    for url in (f"{base}/health", f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"):
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (user-given URI)
                pass
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or url.endswith("/health"):  # a 404 from the API is "no such experiment yet"
                raise _unreachable(uri, f"{url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise _unreachable(uri, f"{url}: {getattr(exc, 'reason', exc)}") from None


def check_tracking() -> None:
    """Called first by every stage that logs to MLflow: the tracking store must answer before any work."""
    check_server(tracking_uri())


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested params -> MLflow's flat ``a.b.c`` keys (lists are logged as their text)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """What a tracking call raises when the store is in trouble (not when the call itself is wrong)."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, OSError


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class StageRun:
    """An MLflow run for one stage; a no-op on non-zero ranks so that only rank 0 writes.

    Usage::

        with StageRun("float-train", params={"float": {...}}, enabled=is_rank0) as run:
            run.log_metrics({"mAP": 0.3}, step=epoch)
            run.log_artifact("metrics/float.json")

    Opening the run checks the store and fails fast (TrackingError), unless ``fail_fast`` is False (trouble
    then only warns and nothing is logged). Stages open their run when they start (``params_file``: the
    whole params file, for the run's group; see maptr.training.run_group).
    After that nothing it does raises for tracking trouble: see the module docstring.
    """

    RETRIES = 2  # tries of a call before it is queued
    RETRY_PAUSE_S = 1.0
    QUIET_S = 30.0  # after a failed call, later calls are only queued for this long (training goes on)

    def __init__(self, stage: str, params: dict[str, Any], enabled: bool = True, tags: dict[str, str] | None = None,
                 fail_fast: bool = True, params_file: str | Path | None = None,
                 system_metrics: bool = False):  # fmt: skip
        self.stage, self.params, self.enabled, self.tags = stage, params, enabled, tags or {}
        self.fail_fast, self.params_file, self.system_metrics = fail_fast, params_file, system_metrics
        self._mlflow = None
        self.run_id = self.parent_id = self.experiment_id = self.group = None  # set once the run is open
        self._pending: collections.deque[tuple[str, Callable[[], object]]] = collections.deque()
        self._failed_at: float | None = None  # monotonic time of the last failed call, None while all is well
        self.uri = ""

    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        # Fail fast instead of MLflow's long retry loops on a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = tracking_uri()
        try:
            self._mlflow = self._start()
        except TrackingError as exc:
            if self.fail_fast:
                raise
            _warn(f"{exc}. Nothing of stage {self.stage} was logged; its local outputs hold it")
        return self

    def _start(self):
        """Check the store, end runs that killed processes left RUNNING, start this stage's run."""
        uri = self.uri
        check_server(uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        all_params = load_params(self.params_file) if self.params_file else {}
        try:
            location = None if uri.startswith("http") else (repo_root() / "mlartifacts").as_uri()
            client = mlflow.MlflowClient()
            self.experiment_id = run_group.ensure_experiment(client, name, location)
            mlflow.set_experiment(experiment_id=self.experiment_id)
            end_stale_runs(self.experiment_id)
            self.group = run_group.group_context(all_params)
            self.parent_id = run_group.parent_run(client, self.experiment_id, self.group, all_params)
            run = mlflow.start_run(run_name=run_group.stage_run_name(self.stage, self.group), tags=self._run_tags(),
                                   parent_run_id=self.parent_id, log_system_metrics=self.system_metrics)  # fmt: skip
            self.run_id = run.info.run_id
            flat = {k: str(v) if isinstance(v, list) else v for k, v in flatten("", self.params).items()}
            mlflow.log_params(flat)
        except _tracking_errors() as exc:
            raise TrackingError(f"MLflow tracking store {uri}: cannot start a run ({_first_line(exc)}); "
                                "check the server or unset MLFLOW_TRACKING_URI") from None  # fmt: skip
        return mlflow

    def _run_tags(self) -> dict[str, str]:
        # host and pid let a later stage find this run if the process is killed before it ends it
        tags = {"stage": self.stage, "git_revision": git_revision(), "host": socket.gethostname(),
                "pid": str(os.getpid()), **self.group.tags(), **self.tags}  # fmt: skip
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
        return tags

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is None:
            return
        if exc_type is None:
            status = "FINISHED"
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        mlflow, self._mlflow = self._mlflow, None
        delivered = self._flush(tries=1)
        try:
            mlflow.end_run(status=status)  # pops this process's active run first, then tells the store
            run_group.end_parent(mlflow.MlflowClient(), self.parent_id, status)
        except _tracking_errors():
            self._pending.append(("the run's end status", lambda: None))
        if not delivered or self._pending:
            _warn(
                f"MLflow {self.uri}: not logged: {self._describe_pending()}; the stage's local outputs hold "
                "these figures and files (a run left RUNNING is ended as KILLED by the next stage here)"
            )

    # ----------------------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], object]) -> None:
        """Run tracking call ``fn`` (described by ``what``), or queue it while the store is in trouble."""
        if self._mlflow is None:
            return
        self._pending.append((what, fn))
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.QUIET_S:
            return  # the store failed moments ago: do not stall training on it again yet
        self._flush(tries=self.RETRIES)

    def _flush(self, tries: int) -> bool:
        """Send the queued calls in order; False (and the rest kept) at the first that fails ``tries`` times."""
        while self._pending:
            what, fn = self._pending[0]
            for attempt in range(tries):
                try:
                    fn()
                    break
                except _tracking_errors() as exc:
                    error = exc
                    if attempt + 1 < tries:
                        time.sleep(self.RETRY_PAUSE_S)
            else:
                if self._failed_at is None:
                    _warn(f"MLflow {self.uri}: {what} failed ({_first_line(error)}); the stage goes on, "
                          f"tracking calls are queued and retried every {self.QUIET_S:.0f} s")  # fmt: skip
                self._failed_at = time.monotonic()
                return False
            self._pending.popleft()
        if self._failed_at is not None:
            _warn(f"MLflow {self.uri}: answering again; the queued calls were logged")
            self._failed_at = None
        return True

    def _describe_pending(self) -> str:
        """The queued calls by kind: ``9 x train metrics (step 3, ..., step 11), 2 x artifact (a.json, b.png)``."""
        groups: dict[str, list[str]] = {}
        for what, _ in self._pending:
            kind, _, detail = what.partition(" (")
            groups.setdefault(kind, []).append(detail.rstrip(")"))
        parts = []
        for kind, details in groups.items():
            shown = details if len(details) <= 3 else [details[0], "...", details[-1]]
            span = f" ({', '.join(shown)})" if any(details) else ""
            parts.append(f"{len(details)} x {kind}{span}")
        return ", ".join(parts)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            values, mlflow = {k: float(v) for k, v in metrics.items()}, self._mlflow
            # named by their common key prefix: train/ (step = global step) and epoch/ (step = epoch) count apart
            prefixes = {k.partition("/")[0] for k in values if "/" in k}
            kind = f"{prefixes.pop()} metrics" if len(prefixes) == 1 else "metrics"
            self.call(f"{kind} (step {step})", lambda: mlflow.log_metrics(values, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            mlflow = self._mlflow
            self.call(f"artifact ({path})", lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            mlflow = self._mlflow
            self.call("tags", lambda: mlflow.set_tags(tags))


def end_stale_runs(experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of ``experiment_id`` started on this machine by a process that no
    longer exists (killed before it could end its run), and their groups with them; returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'")
    ended = []
    for run in runs:
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and not _process_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
            parent = run.data.tags.get("mlflow.parentRunId")  # its group, left RUNNING with it
            if parent and client.get_run(parent).info.status == "RUNNING":
                client.set_terminated(parent, status="KILLED")
    if ended:
        _warn(f"MLflow: ended {len(ended)} run(s) left RUNNING by a killed process as KILLED")
    return ended


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
