"""Bad input as a user meets it: one line `error: ...` naming the file or param and the fix, exit code 2,
found before the work where it can be, nothing good overwritten (issue 27)."""

from __future__ import annotations

import datetime
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_entrypoint_here, write_micro_params

from maptr.atomic import write_text_atomic
from maptr.config import load_model_config, load_params
from maptr.models.maptr import build_maptr
from maptr.training.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_mlflow(tmp_path, monkeypatch):
    """Stages run in this process log to a store of their own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test")


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    """A micro float checkpoint (untrained)."""
    out = tmp_path_factory.mktemp("float")
    torch.manual_seed(0)
    model = build_maptr(load_model_config(load_params(write_micro_params(out))))
    save_checkpoint(out / "float.pt", {"model": model.state_dict(), "stage": "float", "preset": "micro"})
    return out / "float.pt"


def _float_train(tmp_path: Path, packed: Path, **float_params) -> int:
    params = write_micro_params(tmp_path, float={"epochs": 1, "num_workers": 0, **float_params})
    return run_entrypoint_here("float_train.py", "--params", str(params), "--packed", str(packed), "--best",
                               str(tmp_path / "best.pt"), "--last", str(tmp_path / "last.pt"), "--metrics",
                               str(tmp_path / "float.json"), "--curve", str(tmp_path / "curve.json"), "--reports",
                               str(tmp_path / "reports"))  # fmt: skip


# ---- 3. empty val split ---------------------------------------------------------------------------
@pytest.mark.parametrize(("synth", "message"), [
    ({"val_scenes": 0}, "synth.val_scenes: must be >= 1, got 0"),
    ({"seed": "zero"}, "synth.seed: expected an integer, got 'zero'"),
])  # fmt: skip
def test_synth_refuses_a_bad_param_in_one_line_before_generating(tmp_path, capsys, synth, message):
    small = {"train_scenes": 1, "samples_per_scene": 1, "image_width": 64, "image_height": 36}
    params = write_micro_params(tmp_path, synth={**small, **synth})
    code = run_entrypoint_here("synth.py", "--params", str(params), "--out", str(tmp_path / "world"), "--stats",
                               str(tmp_path / "stats.json"), "--workers", "1", "--no-progress")  # fmt: skip
    assert code == 2 and f"error: {params}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "world").exists() and not (tmp_path / "stats.json").exists()


def test_pack_refuses_a_root_whose_val_split_is_empty(tiny_world, tmp_path, capsys):
    from nuscenes.utils import splits

    root = tmp_path / "nuscenes"
    shutil.copytree(tiny_world, root)
    table = root / "v1.0-trainval" / "scene.json"
    scenes = json.loads(table.read_text())
    for scene in scenes:
        if scene["name"] in splits.val:
            scene["name"] = "not-an-official-scene"
    table.write_text(json.dumps(scenes))
    code = run_entrypoint_here("pack.py", "--dataroot", str(root), "--out", str(tmp_path / "packed"))
    err = capsys.readouterr().err
    assert code == 2 and "the val split is empty (no scene of nuscenes.utils.splits.val)" in err
    assert "synth.val_scenes >= 1" in err and not (tmp_path / "packed").exists()


def test_training_refuses_a_packed_dataset_with_an_empty_val_split(packed_world, tmp_path, capsys):
    packed = tmp_path / "packed"
    shutil.copytree(packed_world, packed)
    metas = packed / "metas" / "val.json"
    metas.write_text(json.dumps({**json.loads(metas.read_text()), "samples": []}))  # an older pack wrote this
    code = _float_train(tmp_path, packed)
    err = capsys.readouterr().err
    assert code == 2 and f"error: {metas}: the val split is empty (0 samples)" in err and "synth.val_scenes" in err
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "float.json").exists()


# ---- 4. truncated LMDB ----------------------------------------------------------------------------
def test_truncated_lmdb_is_refused_at_open_not_killed_by_sigbus(packed_world, tmp_path):
    packed = tmp_path / "packed"
    shutil.copytree(packed_world, packed)
    data = packed / "val_lmdb" / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    params = write_micro_params(tmp_path, float={"epochs": 1, "num_workers": 0})
    res = subprocess.run(  # its own process: before the fix, SIGBUS killed it
        [sys.executable, str(REPO / "pipeline" / "float_train.py"), "--params", str(params), "--packed", str(packed),
         "--best", str(tmp_path / "best.pt"), "--last", str(tmp_path / "last.pt"), "--metrics",
         str(tmp_path / "float.json"), "--curve", str(tmp_path / "curve.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"error: {data}: " in res.stderr and "(truncated); re-run pack" in res.stderr
    assert not (tmp_path / "last.pt").exists()  # refused before training


# ---- 5. corrupt JPEGs -----------------------------------------------------------------------------
@pytest.mark.parametrize(("damage", "problem"), [
    (lambda b: b[: len(b) // 2], "no JPEG end marker: the file is truncated"),
    (lambda b: np.random.default_rng(0).integers(0, 256, len(b), dtype=np.uint8).tobytes(), "no JPEG start marker"),
    (lambda b: b[: len(b) // 2] + b"\xff\xd9", "libjpeg: Corrupt JPEG data"),  # cut, end marker put back
])  # fmt: skip
def test_pack_names_a_corrupt_camera_image(tiny_world, tmp_path, capsys, damage, problem):
    root = tmp_path / "nuscenes"
    shutil.copytree(tiny_world, root)
    image = sorted((root / "samples" / "CAM_BACK").glob("*.jpg"))[-1]
    image.write_bytes(damage(image.read_bytes()))
    code = run_entrypoint_here("pack.py", "--dataroot", str(root), "--out", str(tmp_path / "packed"))
    err = capsys.readouterr().err
    assert code == 2 and f"error: {image}: corrupt camera image ({problem}" in err and "re-run pack" in err
    assert not (tmp_path / "packed").exists()


# ---- 8. traceback walls ---------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", -1, "float.epochs: must be >= 1, got -1"),
    ("batch_size", 0, "float.batch_size: must be >= 1, got 0"),
])  # fmt: skip
def test_out_of_range_training_param_is_one_line_before_work(packed_world, tmp_path, capsys, key, value, message):
    code = _float_train(tmp_path, packed_world, **{key: value})
    err = capsys.readouterr().err
    assert code == 2 and f"error: {tmp_path / 'params.yaml'}: {message}" in err
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


def test_pickle_file_as_model_pretrained_is_one_line_error(float_checkpoint, packed_world, tmp_path, capsys):
    weights = tmp_path / "resnet.pth"
    weights.write_bytes(pickle.dumps({"conv1.weight": datetime.date(2026, 1, 1)}))  # not tensors: refused
    params = write_micro_params(tmp_path, model={"pretrained": str(weights)})
    code = run_entrypoint_here("predict.py", "--params", str(params), "--packed", str(packed_world), "--checkpoint",
                               str(float_checkpoint))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"error: {weights}: model.pretrained is not a weights file that loads with weights_only" in err


def test_output_folder_that_cannot_be_written_is_one_line_error(tiny_world, tmp_path, capsys):
    (tmp_path / "data").write_text("a file standing where the output folder should be")
    code = run_entrypoint_here("pack.py", "--dataroot", str(tiny_world), "--out", str(tmp_path / "data" / "packed"))
    err = capsys.readouterr().err
    assert code == 2 and f"error: {tmp_path / 'data' / 'packed'}: cannot write (" in err
    assert (tmp_path / "data").read_text().startswith("a file")


def test_failed_write_names_the_output_and_keeps_the_old_file(tmp_path, monkeypatch):
    from maptr.atomic import OutputError

    out = tmp_path / "metrics.json"
    out.write_text("good")

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refused)
    with pytest.raises(OutputError, match=r"metrics.json: cannot write \(Permission denied\); make the folder"):
        write_text_atomic(out, "new")
    monkeypatch.undo()
    assert out.read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_checkpoint_on_a_full_disk_names_the_path(tmp_path, monkeypatch):
    import builtins

    import maptr.training.checkpoint as checkpoint
    from maptr.atomic import OutputError

    target = tmp_path / "cal.pt"
    target.write_bytes(b"the previous checkpoint")
    # the temporary file is /dev/full: every write fails with the kernel's ENOSPC
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(OutputError, match=r"cal.pt: cannot write \(No space left on device\); free disk space"):
        save_checkpoint(target, {"model": {"w": torch.ones(100_000)}})
    assert target.read_bytes() == b"the previous checkpoint"


def _calibrate(tmp_path: Path, float_checkpoint: Path, packed: Path, report: str) -> int:
    (tmp_path / "sensitivity.json").write_text(report)
    params = write_micro_params(tmp_path, calibrate={"steps": 1, "batch_size": 1, "observer": "minmax"})
    return run_entrypoint_here("calibrate.py", "--params", str(params), "--packed", str(packed), "--float-checkpoint",
                               str(float_checkpoint), "--sensitivity", str(tmp_path / "sensitivity.json"), "--out",
                               str(tmp_path / "cal.pt"), "--metrics", str(tmp_path / "cal.json"))  # fmt: skip


def test_disk_full_during_calibrate_is_one_line_and_keeps_the_old_checkpoint(
    float_checkpoint, packed_world, tmp_path, monkeypatch, capsys
):
    (tmp_path / "cal.pt").write_bytes(b"the previous checkpoint")

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    report = json.dumps({"preset": "micro", "num_operators": 0, "operators": []})
    code = _calibrate(tmp_path, float_checkpoint, packed_world, report)
    err = capsys.readouterr().err
    assert code == 2 and f"error: {tmp_path / 'cal.pt'}: cannot write (No space left on device)" in err
    assert (tmp_path / "cal.pt").read_bytes() == b"the previous checkpoint" and not list(tmp_path.glob("*.tmp-*"))


def test_truncated_sensitivity_report_is_one_line_error(float_checkpoint, packed_world, tmp_path, capsys):
    report = json.dumps({"preset": "micro", "num_operators": 0, "operators": []})
    code = _calibrate(tmp_path, float_checkpoint, packed_world, report[: len(report) // 2])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {tmp_path / 'sensitivity.json'}: not valid JSON (truncated or corrupt" in err
    assert "re-run the sensitivity stage" in err and not (tmp_path / "cal.pt").exists()
