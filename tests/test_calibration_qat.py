"""Calibration (deterministic scales) and QAT (gradients flow, activation scales fixed), then the
sensitivity -> calibrate -> qat (torchrun, 2 ranks) -> predict chain end to end on the packed test world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_micro_params

from maptr.config import ModelConfig
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate
from maptr.models.maptr import MapTR, build_maptr
from maptr.quant import FakeQuantMode, QuantWrapper, set_fake_quant_mode
from maptr.quant.calibration import activation_scales, calibrate, calibration_loader
from maptr.quant.qat import EpochSlices, check_fixed_activation_scales
from maptr.quant.quantizer import QuantConfig, quantize_model
from maptr.training.checkpoint import load_checkpoint, save_checkpoint
from maptr.training.criterion import build_criterion

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; a busy second core would only make every op wait
    yield
    torch.set_num_threads(threads)


def _float_model(cfg: ModelConfig) -> MapTR:
    torch.manual_seed(0)
    return build_maptr(cfg).eval()


def _calibrated(cfg: ModelConfig, packed: Path, observer: str = "percentile") -> MapTR:
    model = quantize_model(_float_model(cfg), QuantConfig(observer=observer, int16_ops=("neck.output_conv",)))
    train = PackedMapDataset(packed, "train", DatasetOptions.from_model(cfg))
    calibrate(model, calibration_loader(train, num_batches=2, batch_size=2, seed=0))
    return model


def _train_batch(cfg: ModelConfig, packed: Path) -> dict:
    train = PackedMapDataset(packed, "train", DatasetOptions.from_model(cfg, augment=False))
    return collate([train[0], train[1]])


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_calibration_is_deterministic(micro_cfg, packed_world, observer):
    first = activation_scales(_calibrated(micro_cfg, packed_world, observer))
    second = activation_scales(_calibrated(micro_cfg, packed_world, observer))
    assert len(first) > 50
    assert first == second  # bit-identical scales and zero points
    assert all(scale > 0 for scale, _ in first.values())
    assert first["neck.output_conv.input_quant"][1] == 0  # int16: symmetric, zero point 0


def test_calibration_loader_is_a_seeded_subset(micro_cfg, packed_world):
    train = PackedMapDataset(packed_world, "train", DatasetOptions.from_model(micro_cfg))
    tokens = [[m["index"] for m in batch["meta"]] for batch in calibration_loader(train, 3, 2, seed=5)]
    again = [[m["index"] for m in batch["meta"]] for batch in calibration_loader(train, 3, 2, seed=5)]
    assert tokens == again and len({i for batch in tokens for i in batch}) == 6
    with pytest.raises(ValueError, match="calibration needs 10 samples"):
        calibration_loader(train, 5, 2, seed=0)


def test_gradients_flow_through_qat(micro_cfg, packed_world):
    model = _calibrated(micro_cfg, packed_world)
    model.train()
    batch = _train_batch(micro_cfg, packed_world)
    criterion = build_criterion(micro_cfg)
    loss = criterion.total_loss(criterion(model(batch["img"], batch["lidar2img"]), batch))
    loss.backward()
    # The first conv sits behind every fake-quant of the network: a straight-through gradient reaches it.
    first = model.backbone.conv1.module.weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantWrapper)]
    without = [name for name, m in wrappers if m.module.weight.grad is None or m.module.weight.grad.abs().sum() == 0]
    assert not without, f"quantized layers without gradient: {without}"


def test_activation_scales_do_not_move_during_qat_while_weights_and_their_scales_do(micro_cfg, packed_world):
    model = _calibrated(micro_cfg, packed_world)
    assert check_fixed_activation_scales(model) > 50
    before = activation_scales(model)
    conv = model.backbone.layer1[0].conv1
    weight_before = conv.module.weight.detach().clone()
    weight_scale_before = conv.weight_quant.scale.clone()
    model.train()
    batch = _train_batch(micro_cfg, packed_world)
    criterion = build_criterion(micro_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        criterion.total_loss(criterion(model(batch["img"], batch["lidar2img"]), batch)).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model(batch["img"], batch["lidar2img"])
    assert activation_scales(model) == before
    assert check_fixed_activation_scales(model) == len(before)
    assert not torch.equal(conv.module.weight, weight_before)
    # the weight grid follows the trained weights: scale = max |w_c| / 64 per output channel
    expected = conv.module.weight.detach().abs().amax(dim=(1, 2, 3)) / 64
    torch.testing.assert_close(conv.weight_quant.scale, expected)
    assert not torch.equal(conv.weight_quant.scale, weight_scale_before)


def test_qat_refuses_a_model_that_is_not_calibrated(micro_cfg, packed_world):
    model = quantize_model(_float_model(micro_cfg), QuantConfig())
    with pytest.raises(RuntimeError, match="not calibrated"):
        check_fixed_activation_scales(model)
    model = _calibrated(micro_cfg, packed_world)
    set_fake_quant_mode(model, FakeQuantMode.OBSERVE)
    with pytest.raises(RuntimeError, match="is observe"):
        check_fixed_activation_scales(model)
    with pytest.raises(RuntimeError, match="no activation fake-quant"):
        check_fixed_activation_scales(_float_model(micro_cfg))


def test_epoch_slices_walk_through_a_seeded_permutation():
    data = list(range(10))
    slices = EpochSlices(data, samples_per_epoch=4, seed=1)
    epochs = []
    for epoch in range(3):
        slices.set_epoch(epoch)
        epochs.append([slices[i] for i in range(len(slices))])
    assert len(set(epochs[0] + epochs[1])) == 8  # the first two epochs see 8 different samples
    assert epochs[2][:2] == [s for s in slices.order[8:10]] and epochs[2][2:] == slices.order[:2]  # wraps
    with pytest.raises(ValueError):
        EpochSlices(data, samples_per_epoch=11, seed=0)


def _run(script: str, args: list[str], out: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    env["MLFLOW_EXPERIMENT_NAME"] = "test"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [*(launcher or [sys.executable]), str(REPO / "pipeline" / script), *args]
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)


def test_sensitivity_calibrate_qat_predict_chain(packed_world, tmp_path, micro_cfg):
    params = write_micro_params(
        tmp_path,
        sensitivity={"calibration_batches": 1, "num_batches": 1, "batch_size": 2},
        calibrate={"steps": 2, "batch_size": 2, "val_batch_size": 2, "threads": 1},
        qat={"epochs": 1, "samples_per_epoch": 4, "batch_size": 1, "num_workers": 0, "lr": 1e-4, "threads": 1},
    )
    float_ckpt = tmp_path / "float.pt"
    save_checkpoint(float_ckpt, {"model": _float_model(micro_cfg).state_dict(), "stage": "float", "preset": "micro"})
    common = ["--params", str(params), "--packed", str(packed_world)]

    res = _run("sensitivity.py", [*common, "--float-checkpoint", str(float_ckpt), "--out", "sens.json",
                                  "--plot", "sens.png"], tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "sens.json").read_text())
    k = report["int16_topk"]
    assert report["preset"] == "micro" and k >= 1 and (tmp_path / "sens.png").stat().st_size > 0

    res = _run("calibrate.py", [*common, "--float-checkpoint", str(float_ckpt), "--sensitivity", "sens.json",
                                "--out", "cal.pt", "--metrics", "cal.json"], tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "cal.json").read_text())
    assert {"mAP", "AP_divider", "AP_ped_crossing", "AP_boundary"} <= set(metrics) and 0 <= metrics["mAP"] <= 1
    calibration = load_checkpoint(tmp_path / "cal.pt")
    top = [row["name"] for row in sorted(report["operators"], key=lambda r: r["rank"])[:k]]
    assert calibration["stage"] == "calibration" and calibration["quant"]["int16_ops"] == sorted(top)

    res = _run("qat.py", [*common, "--calibration-checkpoint", "cal.pt", "--best", "qat.pt", "--last", "qat_last.pt",
                          "--metrics", "qat.json", "--curve", "qat_curve.json"], tmp_path, nproc=2)  # fmt: skip
    assert res.returncode == 0, "\n".join(line for line in res.stderr.splitlines() if "rank0" in line)[-4000:]
    qat = load_checkpoint(tmp_path / "qat.pt")
    assert qat["stage"] == "qat" and qat["quant"] == calibration["quant"]
    scales = {k: v for k, v in qat["model"].items() if "input_quant" in k and k.endswith((".scale", ".zero_point"))}
    assert scales and all(torch.equal(v, calibration["model"][k]) for k, v in scales.items())  # fixed in QAT
    assert len(json.loads((tmp_path / "qat_curve.json").read_text())) == 1

    res = _run("predict.py", ["--params", str(params), "--packed", str(packed_world), "--checkpoint", "cal.pt",
                              "--out", "predict.json"], tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "predict.json").read_text())["mAP"] == metrics["mAP"]  # same model, same mAP
