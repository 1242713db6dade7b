"""MLflow groups: one parent run per chain run (found by a stable key from separate stage processes), the
stages nested in it; a real `dvc repro` and `dvc exp run`; the ladder across groups; failed stages."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import mlflow
import onnx
import pytest
import yaml
from conftest import write_micro_params
from onnx import TensorProto, helper

from maptr import cli
from maptr.deploy.registry import DEPLOYED, FLOAT, log_onnx, publish_ladder, registered_name
from maptr.training import run_group
from maptr.training.lineage import dvc_dir_md5, log_val_metrics
from maptr.training.tracking import StageRun

REPO = Path(__file__).resolve().parents[1]
TINY_SYNTH = {"train_scenes": 2, "val_scenes": 1, "samples_per_scene": 4}


@pytest.fixture
def store(mlflow_store, monkeypatch):
    """A client of the test's private store (experiment "test"); no group variables from the caller."""
    for name in ("MAPTR_RUN_GROUP", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(mlflow_store)
    return mlflow.MlflowClient(mlflow_store)


def _runs(client, role_group: bool | None = None) -> list:
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    if role_group is None:
        return runs
    return [r for r in runs if (r.data.tags.get(run_group.ROLE_TAG) == "group") == role_group]


def test_stages_of_one_invocation_share_a_key_and_invocations_differ(tmp_path, monkeypatch):
    """Two stage processes spawned by one launcher (as DVC spawns them, through a shell that stays a
    separate process) compute the same group key; a second launcher gets another; no DVC, no group."""
    for name in ("MAPTR_RUN_GROUP", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    probe = tmp_path / "probe.py"
    probe.write_text("from maptr.training.run_group import group_context\n"
                     "print(group_context({'model': {'preset': 'micro'}}).key)\n")  # fmt: skip
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import os, subprocess, sys\n"
        "for stage in ('synth', 'pack'):\n"
        "    env = {**os.environ, 'DVC_STAGE': stage}\n"
        f"    subprocess.run(['bash', '-c', sys.executable + ' {probe}; true'], env=env, check=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def launch() -> list[str]:
        out = subprocess.run([sys.executable, str(launcher)], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()

    first, second = launch(), launch()
    assert len(first) == 2 and first[0] == first[1] and len(first[0]) == 16
    assert second[0] == second[1] and second[0] != first[0]
    alone = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "None"
    named = {**env, "MAPTR_RUN_GROUP": "sweep-1"}
    keys = {subprocess.run([sys.executable, str(probe)], env=named, capture_output=True, text=True).stdout
            for _ in range(2)}  # fmt: skip
    assert len(keys) == 1 and keys != {"None\n"}


def test_parent_created_twice_in_a_race_keeps_the_earliest(store, tmp_path, monkeypatch):
    """A stage that searched before another created the parent creates its own, finds both, keeps the
    earliest and deletes its own: every stage of the group ends up under one parent."""
    experiment_id = run_group.ensure_experiment(store, "test", None)
    group = run_group.GroupContext("k" * 16, "race", "rev", "hash", "micro", invocation="x")
    first = run_group.parent_run(store, experiment_id, group, {"float": {"lr": 1e-3}})
    real_search = run_group._group_runs
    calls = []

    def late_search(*args):
        calls.append(1)
        return [] if len(calls) == 1 else real_search(*args)

    monkeypatch.setattr(run_group, "_group_runs", late_search)
    assert run_group.parent_run(store, experiment_id, group, {}) == first
    parents = _runs(store, role_group=True)
    assert [r.info.run_id for r in parents] == [first]  # the second one was deleted
    assert store.get_run(first).data.params["float.lr"] == "0.001"


def test_existing_experiment_gets_the_training_kind(store):
    experiment_id = store.create_experiment("test")  # as made by an older version: no kind tag
    run_group.ensure_experiment(store, "test", None)
    assert store.get_experiment(experiment_id).tags[run_group.KIND_TAG] == "custom_model_development"


def test_failed_stage_run_opens_at_start_and_fails_its_group(store, tmp_path, monkeypatch):
    """calibrate opens its run before any work: a missing input leaves a FAILED run (and group)."""
    params = write_micro_params(tmp_path)
    monkeypatch.setenv("MAPTR_RUN_GROUP", "broken")
    monkeypatch.setattr(sys, "argv", ["calibrate.py", "--params", str(params), "--sensitivity",
                                      str(tmp_path / "missing.json"), "--packed", str(tmp_path / "none")])  # fmt: skip
    main = runpy.run_path(str(REPO / "pipeline" / "calibrate.py"), run_name="stage")["main"]
    with pytest.raises(cli.UserError, match="sensitivity report not found"):
        main()
    parent, child = _runs(store, role_group=True), _runs(store, role_group=False)
    assert [r.info.status for r in parent] == ["FAILED"] and [r.info.status for r in child] == ["FAILED"]
    assert child[0].info.run_name == "calibrate · broken" and parent[0].info.run_name == "broken (micro)"
    assert child[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert child[0].data.params["calibrate.observer"] == "mse"


def _tiny_onnx(path: Path, scale: float) -> Path:
    """Two inputs and two outputs named as the exported MapTR's, so the signature can be checked."""
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 6, 3, 8, 8])
    l2i = helper.make_tensor_value_info("lidar2img", TensorProto.FLOAT, [1, 6, 4, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 6, 3, 8, 8])
    pts = helper.make_tensor_value_info("pts", TensorProto.FLOAT, [1, 6, 4, 4])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["img", "k"], ["scores"]),
                               helper.make_node("Identity", ["lidar2img"], ["pts"])],
                              "tiny", [img, l2i], [scores, pts], [k])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_ladder_reaches_runs_of_cached_stages_and_tags_registered_versions(store, tmp_path, monkeypatch):
    """Group A ran float-train and calibrate; group B (DVC restored those two from its cache) ran qat to
    validate. validate's ladder follows the file digests back into group A, goes to B's parent run, and
    tags the registered deployed and float versions; both carry a signature."""
    params = write_micro_params(tmp_path)
    files = {name: tmp_path / f"{name}.pt" for name in ("float", "calibration", "qat")}
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * 64)
    deployed, float_onnx = _tiny_onnx(tmp_path / "deploy.onnx", 0.5), _tiny_onnx(tmp_path / "float.onnx", 1.0)
    mAPs = {"float": 0.31, "calibration": 0.30, "qat": 0.305, "deployed": 0.302}

    def stage(name, mAP=None, model=None, source=None, then=lambda run: None):
        with StageRun(name, {}, params_file=params) as run:
            if mAP is not None:
                metrics = {"mAP": mAP, "AP_divider": mAP, "AP_divider_0.5": 0.1}
                log_val_metrics(run, metrics, model=model, source=source)
            return run, then(run)

    monkeypatch.setenv("MAPTR_RUN_GROUP", "A")
    stage("float-train", mAPs["float"], files["float"])
    stage("calibrate", mAPs["calibration"], files["calibration"], files["float"])
    monkeypatch.setenv("MAPTR_RUN_GROUP", "B")
    stage("qat", mAPs["qat"], files["qat"], files["calibration"])
    stage("export", then=lambda _: log_onnx(float_onnx, "maptr_float", registered_name("micro", FLOAT), files["float"]))
    stage("compile", then=lambda _: log_onnx(deployed, "maptr_deploy", registered_name("micro", DEPLOYED)))
    run, _ = stage("validate", mAPs["deployed"], deployed, files["qat"], then=publish_ladder)

    parent_b = store.get_run(run.parent_id)
    assert parent_b.info.run_name == "B (micro)"
    assert {row: parent_b.data.metrics[f"ladder/{row}/mAP"] for row in mAPs} == mAPs
    assert parent_b.data.metrics["ladder/deployed/AP_divider_0.5"] == 0.1
    for name in (registered_name("micro", DEPLOYED), registered_name("micro", FLOAT)):
        version = store.get_model_version(name, "1")
        assert version.tags["ladder.qat.mAP"] == "0.3050" and version.tags["ladder.deployed.mAP"] == "0.3020"
        assert "ladder.float.AP_divider_0.5" not in version.tags  # per-threshold APs stay on the runs
        signature = mlflow.models.get_model_info(f"models:/{name}/1").signature
        assert signature.inputs.input_names() == ["img", "lidar2img"]
        assert signature.outputs.input_names() == ["scores", "pts"]


def test_dvc_repro_and_exp_run_are_one_group_each(tmp_path, store):
    """A real DVC project (synth -> pack of a tiny world): `dvc repro` is one group with both stages
    nested, `dvc exp run` another, named and tagged after its experiment; pack's dataset digest is the
    hash DVC wrote to dvc.lock."""
    repo = tmp_path / "project"
    repo.mkdir()
    write_micro_params(repo, synth=TINY_SYNTH)
    python, scripts = sys.executable, REPO / "pipeline"
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "synth": {"cmd": f"{python} {scripts}/synth.py --params params.yaml --out data/nuscenes "
                         "--stats stats.json --workers 1 --no-progress",
                  "params": ["synth"], "outs": ["data/nuscenes", "stats.json"]},
        "pack": {"cmd": f"{python} {scripts}/pack.py --params params.yaml --dataroot data/nuscenes --out data/packed",
                 "deps": ["data/nuscenes"], "params": ["pack"], "outs": ["data/packed"]},
    }}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}

    def sh(*cmd: str) -> str:
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-3000:]}"
        return res.stdout

    dvc = str(Path(sys.executable).parent / "dvc")
    sh("git", "init", "-q")
    sh("git", "config", "user.email", "test@example.com")
    sh("git", "config", "user.name", "test")
    sh(dvc, "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "tiny project")
    rev = sh("git", "rev-parse", "HEAD").strip()

    def pack_hash() -> str:
        outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pack"]["outs"]
        return next(o["md5"] for o in outs if o["path"] == "data/packed")

    sh(dvc, "repro")
    repro_hash = pack_hash()
    assert dvc_dir_md5(repo / "data" / "packed") == repro_hash
    sh(dvc, "exp", "run", "-S", "pack.version=v1.0-trainval", "-n", "named-version")

    parents, children = _runs(store, role_group=True), _runs(store, role_group=False)
    assert len(parents) == 2
    repro, exp = parents
    assert repro.info.run_name.startswith(f"repro {rev[:7]} ") and repro.data.tags["git_revision"] == rev
    assert exp.info.run_name == "named-version (micro)" and exp.data.tags["dvc_experiment"] == "named-version"
    assert exp.data.params["pack.version"] == "v1.0-trainval" and repro.data.params["pack.version"] == "auto"
    stages_of = {p.info.run_id: [] for p in parents}
    for child in children:
        stages_of[child.data.tags["mlflow.parentRunId"]].append(child.data.tags["stage"])
    by_parent = {run_id: sorted(stages) for run_id, stages in stages_of.items()}
    assert by_parent == {repro.info.run_id: ["pack", "synth"], exp.info.run_id: ["pack"]}  # synth: unchanged
    assert len({r.info.run_name for r in parents + children}) == 5  # unique names
    assert all(r.info.status == "FINISHED" for r in parents + children)
    for child, digest in ((children[1], repro_hash), (children[2], pack_hash())):
        (dataset,) = [d.dataset for d in child.inputs.dataset_inputs]
        assert dataset.digest == digest and dataset.name == "nuscenes/v1.0-trainval"
        assert '"train_samples": 8' in dataset.profile and '"val_samples": 4' in dataset.profile
    assert children[1].data.tags["params_hash"] == repro.data.tags["params_hash"] != exp.data.tags["params_hash"]
