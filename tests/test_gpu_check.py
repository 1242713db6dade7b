"""The GPU check: its CPU smoke run end to end (as the GPU machines would import it), its data, its
errors, and the device handling it relies on (bf16 autocast steps, step phases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PC_RANGE, train_config, write_micro_params

from maptr.config import SynthConfig, load_model_config, load_params, load_section
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate, decode_jpeg, decode_views
from maptr.data.packing import pack_nuscenes
from maptr.data.portable import PortableMapDataset, write_portable
from maptr.data.records import CorruptRecordError
from maptr.data.synthetic import generate_world
from maptr.data.transforms import fit_to_size
from maptr.distributed import DistContext
from maptr.gpucheck.common import RepeatedDataset, preset_config
from maptr.gpucheck.data import CheckDataError, check_data, make_check_data, write_manifest
from maptr.gpucheck.report import not_on_gpu_machine
from maptr.models.maptr import build_maptr
from maptr.training.criterion import build_criterion
from maptr.training.device import PHASES, StepPhases, autocast_dtype, float_outputs
from maptr.training.tracking import StageRun
from maptr.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# What the GPU machines lack (the device image): the check's import path must not need any of them.
ABSENT_ON_GPU_MACHINE = ("lmdb", "shapely", "nuscenes", "mlflow", "dvc", "pyquaternion")


@pytest.fixture(scope="module")
def check_data_dir(packed_world, tmp_path_factory) -> Path:
    """A GPU-check data folder from the tiny world's train split (480x270: the smoke run's sizes)."""
    folder = tmp_path_factory.mktemp("gpu_check_data")
    train = PackedMapDataset(packed_world, "train", DatasetOptions())
    write_portable(train, list(range(len(train))), folder / "r50.npz")
    write_portable(train, list(range(len(train))), folder / "learn.npz")
    write_manifest(folder, {"pc_range": PC_RANGE, "made_by": "tests"})
    return folder


@pytest.fixture(scope="module")
def blocked_imports(tmp_path_factory) -> Path:
    """A folder that, first on PYTHONPATH, makes each package the GPU machines lack fail to import."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in ABSENT_ON_GPU_MACHINE:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    return folder


def run_check(*args: str, env_extra: dict[str, str] | None = None, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, str(REPO)])), **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cpu_smoke_runs_every_phase_with_what_the_gpu_machine_has(check_data_dir, blocked_imports, tmp_path):
    """--cpu-smoke: the torchrun train phase (fp32 and bf16), inference (float and fake-quant, fp32 and bf16)
    and the learning run, with lmdb / shapely / nuscenes / mlflow / dvc unimportable; report and table."""
    out = tmp_path / "report.json"
    proc = run_check("--cpu-smoke", "--data", str(check_data_dir), "--out", str(out), pythonpath=str(blocked_imports))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu_smoke"] and report["verdict"] == {"ok": True, "problems": []}
    train = report["phases"]["train"]["result"]
    assert train["world_size"] == 1 and train["preset"] == "nano" and train["image_size"] == [192, 64]
    for name, autocast in (("fp32", "none"), ("bf16", "bfloat16")):
        p = train["precisions"][name]
        assert p["autocast"] == autocast and 1 <= p["timed_steps"] <= 2 and p["samples_per_s"] > 0
        assert np.isfinite([p["loss_first"], p["loss_last"]]).all()
        split = p["split"]
        parts = sum(split[k]["mean_ms"] for k in PHASES)
        assert parts == pytest.approx(split["total"]["mean_ms"], rel=1e-6)
        assert split["forward"]["median_ms"] > 0 and split["backward"]["median_ms"] > 0
    infer = report["phases"]["infer"]["result"]
    assert infer["frame"]["img"] == [1, 6, 3, 64, 192] and infer["fake_quant"]["activation_quants"] > 50
    for model in ("float", "fake-quant QAT"):
        for precision in ("fp32", "bf16"):
            assert infer["models"][model][precision]["fps"] > 0
    learn = report["phases"]["learn"]["result"]
    assert learn["steps"] == 2 and len(learn["curve"]) == 1 and 0.0 <= learn["curve"][0]["mAP"] <= 1.0
    assert report["multi_gpu_sync"].startswith("not exercised: world size 1")
    assert report["modules_not_on_gpu_machine"] == [] and not set(ABSENT_ON_GPU_MACHINE) & set(report["modules"])
    table = out.with_suffix(".md").read_text()
    assert "Multi-GPU synchronisation: not exercised" in table and "fake-quant QAT" in table
    assert "14.1 FPS on NVIDIA RTX 3090" in table and "26.68 FPS on Horizon J6E" in table


def test_without_cuda_it_stops_with_one_line_and_exit_2(check_data_dir):
    proc = run_check("--data", str(check_data_dir), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no CUDA device")
    assert "--cpu-smoke" in proc.stderr


def test_missing_data_and_bad_sizes_are_one_line_errors(tmp_path, check_data_dir):
    proc = run_check("--cpu-smoke", "--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "nowhere/manifest.json: GPU-check data not found" in proc.stderr and "make gpu-check-data" in proc.stderr
    proc = run_check("--cpu-smoke", "--data", str(check_data_dir), "--set", "learn_max_steps=many")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --set learn_max_steps=many: expected KEY=INT")


def test_check_data_detects_changed_files_and_small_images(check_data_dir, tmp_path):
    with pytest.raises(CheckDataError, match=r"r50.npz: images are 480x270, the r50 figures need nuScenes' 1600x900"):
        check_data(check_data_dir)
    manifest = check_data(check_data_dir, require_nuscenes_size=False)
    assert manifest["files"]["learn.npz"]["samples"] == 8
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("r50.npz", "learn.npz", "manifest.json"):
        (copy / name).write_bytes((check_data_dir / name).read_bytes())
    data = bytearray((copy / "learn.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "learn.npz").write_bytes(bytes(data))
    with pytest.raises(CheckDataError, match=r"learn.npz: differs from .*manifest.json .*make gpu-check-data"):
        check_data(copy, require_nuscenes_size=False)


def test_portable_set_gives_the_lmdb_items(packed_world, check_data_dir, tmp_path):
    """Same records, same code: every tensor of every item and the metric's ground truth are equal."""
    opts = DatasetOptions(image_size=(192, 64), num_pts=10, augment=True, seed=3)
    lmdb_set = PackedMapDataset(packed_world, "train", opts)
    portable = PortableMapDataset(check_data_dir / "r50.npz", opts)
    assert len(portable) == len(lmdb_set) == 8 and portable.image_size == (480, 270)
    for index in (0, 5):
        a, b = lmdb_set[index], portable[index]
        assert a["meta"]["token"] == b["meta"]["token"]
        for key in a.keys() - {"meta"}:
            assert torch.equal(a[key], b[key]), key
        ga, gb = lmdb_set.ground_truth(index), portable.ground_truth(index)
        assert np.array_equal(ga["labels"], gb["labels"])
        assert all(np.array_equal(x, y) for x, y in zip(ga["vectors"], gb["vectors"], strict=True))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CorruptRecordError, match=r"bad.npz: not a readable .npz .*make gpu-check-data"):
        PortableMapDataset(bad, opts)
    with pytest.raises(FileNotFoundError, match=r"missing.npz: portable packed set not found"):
        PortableMapDataset(tmp_path / "missing.npz", opts)


def test_nuscenes_size_world_packs_and_loads_in_the_r50_preset_at_half_scale(tmp_path):
    """synth at 1600x900 (nuScenes' size through the synth.image_width / image_height params; intrinsics
    scaled from n015 exactly), packed to LMDB, loads in the r50 preset (800x480 input, 200x100 BEV, 20
    points): the JPEGs decode at 1/2 scale (800x450, padded to 480 rows) with the projections of a
    full-size decode and resize; the portable copy of the GPU check gives the same items."""
    params = load_params(REPO / "params.yaml")
    synth = load_section(params, "synth", SynthConfig)
    world = tmp_path / "nuscenes"
    generate_world(
        world, seed=synth.seed, version=synth.version, train_scenes=1, val_scenes=1, samples_per_scene=2,
        image_width=1600, image_height=900, jpeg_quality=synth.jpeg_quality, workers=1, check_variety=False,
        progress=False,
    )  # fmt: skip
    pack_nuscenes(dataroot=str(world), version=synth.version, out=str(tmp_path / "packed"), pc_range=PC_RANGE)
    r50 = preset_config(params, "r50")
    assert (r50.image_size, r50.bev_h, r50.bev_w, r50.num_vec_one2many) == ([800, 480], 200, 100, 300)
    dataset = PackedMapDataset(tmp_path / "packed", "train", DatasetOptions.from_model(r50))
    rec = dataset.read_record(0)
    assert [tuple(size) for size in rec.image_sizes] == [(1600, 900)] * 6
    assert rec.intrinsics[0][0, 0] == pytest.approx(1266.4, abs=1.0)  # CAM_FRONT of n015 at 1600 px
    views, mats = decode_views(rec.jpegs, rec.image_sizes, rec.lidar2img, 800, "rec")
    assert [v.shape for v in views] == [(450, 800, 3)] * 6  # libjpeg's 1/2-scale decode
    small, small_mats = fit_to_size(views, mats, 800, 480)
    full, full_mats = fit_to_size([decode_jpeg(j, "rec") for j in rec.jpegs], rec.lidar2img, 800, 480)
    np.testing.assert_allclose(small_mats, full_mats, rtol=1e-6, atol=1e-3)
    assert np.abs(np.stack(small).astype(int) - np.stack(full).astype(int)).mean() < 3
    assert not np.stack(small)[:, 450:].any()  # 450 rows of picture, 30 rows of padding
    batch = collate([dataset[0], dataset[1]])
    assert batch["img"].shape == (2, 6, 3, 480, 800) and batch["bev_seg"].shape == (2, 1, 200, 100)
    assert batch["pv_seg"].shape == (2, 6, 1, 60, 100) and batch["pv_seg"].sum() > 0
    assert all(p.shape[1:] == (20, 2) for p in batch["gt_pts"]) and sum(len(p) for p in batch["gt_pts"]) > 0
    assert all(o.shape[1:] == (38, 20, 2) for o in batch["gt_orders"])
    write_portable(dataset, [1], tmp_path / "r50.npz")
    portable = PortableMapDataset(tmp_path / "r50.npz", DatasetOptions.from_model(r50))
    assert all(torch.equal(portable[0][k], dataset[1][k]) for k in ("img", "lidar2img", "gt_pts", "pv_seg"))


def test_make_check_data_writes_both_sets_and_a_manifest_the_gpu_run_accepts(tmp_path):
    manifest = make_check_data(tmp_path, load_params(REPO / "params.yaml"), r50_samples=1, learn_scenes=1,
                               learn_samples_per_scene=2)  # fmt: skip
    r50, learn = manifest["files"]["r50.npz"], manifest["files"]["learn.npz"]
    assert (r50["image_size"], r50["samples"], learn["image_size"], learn["samples"]) == ([1600, 900], 1, [480, 270], 2)
    assert r50["bytes"] < 1.5e6 and learn["bytes"] < 0.5e6
    assert check_data(tmp_path) == manifest  # what benchmarks/gpu_check.py checks before it starts


def test_repeated_dataset_cycles_and_forwards_the_epoch(check_data_dir):
    base = PortableMapDataset(check_data_dir / "learn.npz", DatasetOptions(image_size=(96, 32), augment=True))
    repeated = RepeatedDataset(base, 20)
    assert len(repeated) == 20 and repeated[9]["meta"]["index"] == 1
    repeated.set_epoch(3)
    assert base.epoch == 3
    with pytest.raises(IndexError):
        repeated[20]


def test_autocast_rule_and_float_outputs(monkeypatch):
    """float.bf16: true autocasts on any device, false never, auto where bf16 is native (the CPU's flags)."""
    from maptr.training import device as device_mod

    for dev in ("cpu", "cuda"):
        assert autocast_dtype(torch.device(dev), True) is torch.bfloat16
        assert autocast_dtype(torch.device(dev), False) is None
    from_cpuinfo = device_mod.cpu_has_native_bf16
    for native in (True, False):
        monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda native=native: native)
        assert autocast_dtype(torch.device("cpu"), "auto") is (torch.bfloat16 if native else None)
    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 vaes\n"
    sapphire_rapids = "flags\t\t: avx512f amx_tile amx_int8 amx_bf16\n"
    zen2 = "flags\t\t: fpu sse avx2 fma\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n"
    assert from_cpuinfo(zen4) and from_cpuinfo(sapphire_rapids) and not from_cpuinfo(zen2)
    f32, idx = torch.ones(2), torch.arange(3)
    out = float_outputs({"a": torch.ones(2, dtype=torch.bfloat16), "b": [f32, (idx,)], "c": "x"})
    assert out["a"].dtype == torch.float32 and out["b"][0] is f32 and out["b"][1][0] is idx and out["c"] == "x"


def test_bf16_autocast_step_through_the_trainer_and_its_phases(packed_world, tmp_path, one_thread):
    """The trainer's step with bf16 autocast (forced on the CPU): finite losses computed in float32 and
    parameters that move; StepPhases splits the step into parts that add up to it."""
    params = load_params(write_micro_params(tmp_path))
    model_cfg = load_model_config(params)
    cfg = train_config(epochs=1, batch_size=2, lr=1e-3, warmup_steps=0, num_workers=0, ckpt_every_steps=0, bf16=False)
    train = PackedMapDataset(packed_world, "train", DatasetOptions.from_model(model_cfg))
    torch.manual_seed(0)
    trainer = Trainer(
        model=build_maptr(model_cfg), criterion=build_criterion(model_cfg), train_set=train,
        validate=lambda m: {"mAP": 0.0}, cfg=cfg, ctx=DistContext(), tracker=StageRun("t", {}, enabled=False),
        stage="float", preset="micro", best_path=tmp_path / "b.pt", last_path=tmp_path / "l.pt",
    )  # fmt: skip
    assert trainer.autocast_dtype is None  # float.bf16: false
    trainer.autocast_dtype = torch.bfloat16
    seen: list[torch.dtype] = []
    trainer.criterion.register_forward_pre_hook(lambda _, args: seen.append(args[0]["pred_logits"].dtype))
    phases = StepPhases(trainer.model, trainer.criterion, trainer.optimizer, torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batch = collate([train[0], train[1]])
    for _ in range(2):
        phases.begin()
        logs = trainer._step(batch)
        split = phases.end()
        assert np.isfinite(logs["loss"]) and sum(split[k] for k in PHASES) == pytest.approx(split["total"])
    assert seen == [torch.float32, torch.float32]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    phases.remove()
    phases.begin()
    with pytest.raises(RuntimeError, match=r"did not pass \['forward_end', 'forward_start', 'loss_end'"):
        phases.end()


def test_modules_list_flags_what_the_gpu_machine_lacks():
    assert not_on_gpu_machine(["torch", "numpy", "cv2", "pydot", "yaml"]) == []
    assert not_on_gpu_machine(["torch", "lmdb", "shapely"]) == ["lmdb", "shapely"]


def test_out_of_memory_on_one_device_halves_the_batch(check_data_dir, monkeypatch):
    """train_bench retries a precision at half the batch after an out-of-memory error (one rank only) and
    says so; a batch of 1 that does not fit is an error."""
    import maptr.gpucheck.train_bench as tb

    tried: list[tuple[str, int]] = []

    def fake_run(params, samples, ctx, *, precision, batch_size, **kwargs):
        tried.append((precision, batch_size))
        if batch_size > (1 if precision == "bf16" else 2):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        split = {"total": {"n": 1, "median_ms": 10.0}}
        return {"samples_per_s_rank": 1.0, "peak_memory_mib": None, "split": split, "timed_steps": 1}

    monkeypatch.setattr(tb, "_run_precision", fake_run)
    params = load_params(REPO / "params.yaml")
    out = tb.train_bench(params, check_data_dir / "r50.npz", DistContext(), preset="nano", batch_size=4, warmup=1,
                         steps=1, num_workers=0, time_budget_s=10)  # fmt: skip
    assert tried == [("fp32", 4), ("fp32", 2), ("bf16", 4), ("bf16", 2), ("bf16", 1)]
    fp32, bf16 = out["precisions"]["fp32"], out["precisions"]["bf16"]
    assert fp32["batch_size"] == 2 and fp32["out_of_memory_at_batch"] == [4]
    assert bf16["batch_size"] == 1 and bf16["out_of_memory_at_batch"] == [4, 2]
    monkeypatch.setattr(tb, "_run_precision", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        tb.train_bench(params, check_data_dir / "r50.npz", DistContext(), preset="nano", batch_size=1, warmup=1,
                       steps=1, num_workers=0, time_budget_s=10)  # fmt: skip


def test_brought_wheels_serve_only_modules_the_machine_lacks(tmp_path, monkeypatch):
    """data/gpu_check/site (make gpu-check-data: shapely for the GPU machine's Python) is put on the path
    only for a package that does not import here, and after the machine's own paths."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", REPO / "benchmarks" / "gpu_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    site = tmp_path / "site"
    for name in ("lacking_pkg_for_test", "numpy"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("BROUGHT = True\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert script.bring_site_packages(tmp_path) == ["lacking_pkg_for_test"]  # numpy imports here: not brought
    assert sys.path[-1] == str(site)
    assert importlib.import_module("lacking_pkg_for_test").BROUGHT and not hasattr(np, "BROUGHT")
    sys.modules.pop("lacking_pkg_for_test")
    assert script.bring_site_packages(tmp_path / "nothing") == []
