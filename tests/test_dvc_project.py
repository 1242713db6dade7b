"""DVC as a user drives it, on a throwaway project with this repository's real `pack` and `float-train` stages
(their dvc.yaml definitions, the micro preset, the tiny world): a rerun gives the same bytes, so DVC skips
or restores what follows, and the cache goes through a local remote to a fresh clone.

Each DVC command costs a few seconds; the module runs the pipeline three times in all (~1-2 min).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_micro_params

from maptr.yaml12 import parse_yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECKPOINT = "models/float-checkpoint-best.pt"
# Downstream of float-train: cheap, and it records every time it really runs (outside its outputs).
DIGEST = {
    "cmd": f"python -c \"import hashlib, pathlib; d = hashlib.md5(pathlib.Path('{CHECKPOINT}').read_bytes())"
    ".hexdigest(); pathlib.Path('digest.txt').write_text(d); open('digest-runs.log', 'a').write(d + '\\n')\"",
    "deps": [CHECKPOINT],
    "outs": ["digest.txt"],
}


def run(args: list[str], cwd: Path) -> str:
    """A command in the project (DVC stages find this venv's python first on PATH, and the project's maptr)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd),
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(args)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def dvc(cwd: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], cwd)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tiny_world, tmp_path_factory) -> Path:
    """git + DVC project: the tiny world (dvc add), this repo's code, micro params, pack -> float-train -> digest."""
    root = tmp_path_factory.mktemp("dvcproject") / "project"
    root.mkdir()
    shutil.copytree(REPO / "maptr", root / "maptr", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pipeline").mkdir()
    for script in ("pack.py", "float_train.py"):
        shutil.copy(REPO / "pipeline" / script, root / "pipeline" / script)
    shutil.copytree(tiny_world, root / "data" / "nuscenes")
    write_micro_params(root, float={"epochs": 1, "warmup_steps": 1, "threads": 1, "val_batch_size": 2})
    stages = parse_yaml((REPO / "dvc.yaml").read_text())["stages"]
    dvc_yaml = {"stages": {"pack": stages["pack"], "float-train": stages["float-train"], "digest": DIGEST}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n/models/resume/\ndigest-runs.log\n__pycache__/\n")
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")  # __pycache__ inside the code deps is not code
    dvc(root, "config", "core.autostage", "true")
    dvc(root, "add", "-q", "data/nuscenes")
    dvc(root, "repro")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    return root


def test_forced_rerun_gives_the_same_bytes_and_downstream_is_not_rerun(project):
    first = md5(project / CHECKPOINT)
    curve = (project / "metrics" / "float_curve.json").read_bytes()
    dvc(project, "repro", "--force", "--single-item", "float-train")
    assert md5(project / CHECKPOINT) == first, "same inputs, different checkpoint bytes"
    assert (project / "metrics" / "float_curve.json").read_bytes() == curve
    out = dvc(project, "repro")
    assert "Running stage 'digest'" not in out
    assert (project / "digest-runs.log").read_text().splitlines() == [first]
    assert "up to date" in dvc(project, "status")
    assert run(["git", "status", "--porcelain"], project).strip() == "", "dvc.lock changed on a rerun"


def test_run_cache_restores_float_train_and_downstream(project):
    params = project / "params.yaml"
    original = params.read_text()
    first = md5(project / CHECKPOINT)
    data = parse_yaml(original)
    data["float"]["lr"] = 5e-4
    params.write_text(yaml.safe_dump(data))
    out = dvc(project, "repro")
    assert "Running stage 'float-train'" in out and md5(project / CHECKPOINT) != first
    params.write_text(original)
    out = dvc(project, "repro")
    # back to the committed params: both stages come from DVC's run cache, nothing is recomputed
    assert "Running stage" not in out, out
    assert "Stage 'float-train' is cached" in out and md5(project / CHECKPOINT) == first
    assert "up to date" in dvc(project, "status")
    assert run(["git", "status", "--porcelain"], project).strip() == ""


def test_push_to_a_local_remote_and_pull_into_a_fresh_clone(project, tmp_path):
    """The README's "share the data and models" step: push the cache, clone, pull, `dvc status` is clean."""
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "storage", str(remote))
    run(["git", "commit", "-qam", "remote"], project)
    dvc(project, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / CHECKPOINT).exists()
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status")
    for path in (CHECKPOINT, "digest.txt", "data/packed/train_lmdb/data.mdb", "data/nuscenes/v1.0-trainval/scene.json"):
        assert md5(clone / path) == md5(project / path), path
