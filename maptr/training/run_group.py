"""One MLflow group per run of the chain: a parent run, the stages as its nested runs.

DVC runs every stage as its own process, so no process holds the parent: each stage finds it (or creates
it) by a stable key, the tag ``maptr.group``, computed from what all stages of one chain run share:

* the invocation: the ``dvc repro`` / ``dvc exp run`` process that spawned the stage (host, pid and
  process start time, found by walking up the process tree from the stage to the first ancestor whose
  environment lacks the ``DVC_STAGE`` that DVC sets for the stage's command), or ``MAPTR_RUN_GROUP`` when
  set (a name chosen by the user: stages run by hand or by a script join that group);
* the DVC experiment name (``DVC_EXP_NAME``, set by ``dvc exp run``),
* the git revision (``DVC_EXP_BASELINE_REV`` inside ``dvc exp run``, else HEAD),
* the hash of the parsed params file.

So one ``dvc repro`` is one group, a second ``dvc repro`` (another process) is another, and every
``dvc exp run`` is its own group named after its experiment. A stage run outside DVC without
``MAPTR_RUN_GROUP`` is a run of its own (no parent), still tagged with revision and params hash.

If two stages of one group ever race to create the parent, both search again after creating and keep
the earliest one; the other is deleted. Run names are meaningful and unique: ``<stage> · <group label>``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GROUP_TAG = "maptr.group"
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # MLflow 3's kind for model training: the UI opens on the runs table
ROLE_TAG = "maptr.role"  # "group" on parent runs


@dataclass(frozen=True)
class GroupContext:
    """Where a stage run belongs: its group's key and label, and the tags every run of the group gets."""

    key: str | None  # None: no group (a stage run by hand, outside DVC and without MAPTR_RUN_GROUP)
    label: str
    git_revision: str
    params_hash: str
    preset: str
    dvc_experiment: str = ""
    invocation: str = ""

    def tags(self) -> dict[str, str]:
        tags = {"git_revision": self.git_revision, "params_hash": self.params_hash, "preset": self.preset}
        if self.key:
            tags[GROUP_TAG] = self.key
        if self.dvc_experiment:
            tags["dvc_experiment"] = self.dvc_experiment
        return tags


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the parsed params (comments and layout do not count), first 12 hex digits."""
    values = {k: v for k, v in params.items() if not str(k).startswith("__")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# The DVC process that spawned this stage
# --------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks since boot) of ``pid`` from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def _proc_env(pid: int, name: str) -> str | None:
    """The value of ``name`` in the environment ``pid`` started with (None: unset or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{name}=".encode()
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def dvc_invocation() -> str:
    """``host:pid:start`` of the DVC process running this stage (the same for all stages of one
    ``dvc repro``), or "" when the stage does not run under DVC."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(64):  # a launcher chain (shell, torchrun, its workers) is a few levels deep
        stat = _proc_stat(pid)
        if stat is None:  # no /proc (not Linux): DVC's shell execs the command, so the parent is DVC
            return f"{host}:{os.getppid()}:"
        parent = stat[0]
        parent_stat = _proc_stat(parent)
        if parent <= 1 or parent_stat is None or _proc_env(parent, "DVC_STAGE") != stage:
            return f"{host}:{parent}:{parent_stat[1] if parent_stat else ''}"
        pid = parent
    return f"{host}:{pid}:"


def group_context(params: dict[str, Any]) -> GroupContext:
    """The group of the stage running in this process (see the module docstring)."""
    from maptr.training.tracking import git_revision

    exp = os.environ.get("DVC_EXP_NAME", "")
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or git_revision()
    phash = params_hash(params)
    preset = str((params.get("model") or {}).get("preset", ""))
    named = os.environ.get("MAPTR_RUN_GROUP", "")
    invocation = named or dvc_invocation()
    if not invocation:
        return GroupContext(None, f"{rev[:7]} {time.strftime('%m-%d %H:%M:%S')}", rev, phash, preset)
    key = hashlib.sha256(json.dumps([invocation, exp, rev, phash]).encode()).hexdigest()[:16]
    label = exp or named or f"repro {rev[:7]} {key[:4]}"
    return GroupContext(key, label, rev, phash, preset, exp, invocation)


# --------------------------------------------------------------------------------------------------
# Experiment, parent run, stage runs
# --------------------------------------------------------------------------------------------------
def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if missing, tagged as a model-training experiment so that MLflow's UI
    opens on its runs (untagged, MLflow 3 opens the GenAI overview, "Traces 0")."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=artifact_location, tags={KIND_TAG: KIND})
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(KIND_TAG) != KIND:
            client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
    return experiment_id


def _group_runs(client, experiment_id: str, key: str) -> list:
    """Parent runs of group ``key``, earliest first (ties broken by run id, the same order everywhere)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{GROUP_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'group'", max_results=50
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def parent_run(client, experiment_id: str, group: GroupContext, params: dict[str, Any]) -> str | None:
    """The id of the group's parent run, found by its key or created (with the whole params file as
    params); marked RUNNING again while a stage of the group runs. None for a run without group."""
    if group.key is None:
        return None
    found = _group_runs(client, experiment_id, group.key)
    if not found:
        run = client.create_run(experiment_id, run_name=f"{group.label} ({group.preset})",
                                tags={**group.tags(), ROLE_TAG: "group", "invocation": group.invocation})  # fmt: skip
        _log_group_params(client, run.info.run_id, params)
        found = _group_runs(client, experiment_id, group.key)
        if found and found[0].info.run_id != run.info.run_id:  # another stage created it first
            client.delete_run(run.info.run_id)
        elif not found:  # a search index that lags (a remote store): our own run is the parent
            return run.info.run_id
    run_id = found[0].info.run_id
    if found[0].info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    return run_id


def _log_group_params(client, run_id: str, params: dict[str, Any]) -> None:
    """The params file, flat (``float.lr``), with only the selected model preset's architecture."""
    from mlflow.entities import Param

    from maptr.training.tracking import flatten

    values = {k: v for k, v in params.items() if not str(k).startswith("__")}
    model = dict(values.get("model") or {})
    presets = model.pop("presets", None) or {}
    model["architecture"] = presets.get(model.get("preset"), {})
    flat = flatten("", {**values, "model": model})
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(flat.items())])


def end_parent(client, run_id: str | None, status: str) -> None:
    """The parent ends with its latest stage: its duration spans the stages run so far."""
    if run_id is not None:
        client.set_terminated(run_id, status=status)


def stage_run_name(stage: str, group: GroupContext) -> str:
    return f"{stage} · {group.label}"


# --------------------------------------------------------------------------------------------------
# Opening a stage's run when the stage starts
# --------------------------------------------------------------------------------------------------
_STACK: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("maptr_stage_stack", default=None)


def stage_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a stage's ``main``: runs opened with :func:`open_stage_run` end when ``main`` returns
    (FINISHED) or raises (FAILED, KILLED on Ctrl-C)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _STACK.set(stack)
            try:
                return main(*args, **kwargs)
            finally:
                _STACK.reset(token)

    return wrapper


def open_stage_run(stage: str, params: dict[str, Any], params_file: str | Path, **kwargs):
    """Open the stage's MLflow run now (so its duration is the stage's) inside a ``@stage_main`` main;
    returns the :class:`~maptr.training.tracking.StageRun`."""
    from maptr.training.tracking import StageRun

    stack = _STACK.get()
    if stack is None:
        raise RuntimeError(f"open_stage_run({stage!r}) needs @stage_main on the stage's main(); add it")
    return stack.enter_context(StageRun(stage, params, params_file=params_file, **kwargs))


def open_model_stage(stage: str, params_file: str | Path, config_cls: type, **overrides: Any) -> tuple:
    """The start of a stage that reads its own params section and the model preset (calibrate, export,
    validate) inside a ``@stage_main`` main: (params, section config, model config, the stage's run, opened
    with both). ``overrides``: command-line values for keys of the section (None keeps the file's)."""
    from dataclasses import asdict

    from maptr.config import load_model_config, load_params, load_section

    params = load_params(params_file)
    cfg = load_section(params, stage, config_cls)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    model_cfg = load_model_config(params)
    run = open_stage_run(stage, {stage: asdict(cfg), "model": asdict(model_cfg)}, params_file)
    return params, cfg, model_cfg, run
