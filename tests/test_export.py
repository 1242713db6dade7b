"""Export stage: Q/DQ graph with int8 / int16 / uint8, ORT equals PyTorch, and an interrupted export leaves nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_micro_params
from torch import Tensor

from maptr.config import ModelConfig
from maptr.deploy.onnx_export import check_onnx_file, example_inputs, export_onnx, qdq_dtype_counts
from maptr.deploy.ort_compile import optimize_and_save
from maptr.deploy.ort_runner import DEPLOYED_LEVEL, create_session, run_frame
from maptr.models.maptr import MapTR, MapTRInference, build_maptr
from maptr.quant.calibration import calibrate
from maptr.quant.quantizer import QuantConfig, quantize_model

REPO = Path(__file__).resolve().parents[1]
INT16_OPS = ("backbone.layer1.0.conv2", "head.cls_branches.1.0")
UINT8_STEP = 1.0 / 255.0  # both outputs live in [0, 1]: one step of an 8-bit grid over that range


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(cfg: ModelConfig) -> tuple[MapTR, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = quantize_model(build_maptr(cfg), QuantConfig(int16_ops=INT16_OPS, observer="minmax"))
    inputs = example_inputs(model, seed=1)
    calibrate(model, [{"img": x, "lidar2img": inputs[1]} for x in (inputs[0], example_inputs(model, seed=2)[0])])
    return model, inputs


@pytest.fixture(scope="module")
def exported(micro_cfg, tmp_path_factory) -> dict:
    """The micro model exported as Q/DQ (calibrated) and as float (path, result, traced inputs), and its config."""
    out = tmp_path_factory.mktemp("export")
    quantized, inputs = _quantized(micro_cfg)
    torch.manual_seed(0)
    float_model = build_maptr(micro_cfg).eval()
    return {
        "qdq": (out / "qdq.onnx", export_onnx(quantized, out / "qdq.onnx", inputs), inputs),
        "float": (out / "float.onnx", export_onnx(float_model, out / "float.onnx", inputs), inputs),
        "config": micro_cfg,
    }


def test_qdq_graph_has_uint8_int8_and_int16_and_passes_the_checker(exported, micro_cfg):
    path, _, _ = exported["qdq"]
    counts = qdq_dtype_counts(onnx.load(str(path)))
    assert set(counts) == {"uint8", "int8", "int16"}
    assert counts["int16"] >= len(INT16_OPS) and counts["int8"] >= 10 and counts["uint8"] >= 10
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 21
    dq_types = {init.data_type for init in proto.graph.initializer}
    assert onnx.TensorProto.INT16 in dq_types
    q, k, p = micro_cfg.num_vec_one2one, micro_cfg.num_classes, micro_cfg.num_pts_per_vec
    assert check_onnx_file(path) == {"scores": [1, q, k], "pts": [1, q, p, 2]}
    assert check_onnx_file(exported["float"][0]) == {"scores": [1, q, k], "pts": [1, q, p, 2]}
    assert qdq_dtype_counts(onnx.load(str(exported["float"][0]))) == {}


def test_float_export_matches_pytorch_within_1e4(exported):
    path, result, (img, lidar2img) = exported["float"]
    scores, pts = run_frame(create_session(path, threads=1), img.numpy(), lidar2img.numpy())
    assert np.abs(scores - result.scores.numpy()).max() < 1e-4
    assert np.abs(pts - result.pts.numpy()).max() < 1e-4


def _rotated_rig(lidar2img: Tensor, yaw: float) -> Tensor:
    """The rig turned by ``yaw`` about the LiDAR z axis: other BEV cells visible, another pair count."""
    turn = torch.eye(4)
    turn[:2, :2] = torch.tensor([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    return lidar2img @ turn


def test_float_export_follows_the_rig_it_is_given(exported):
    """The graph samples only the visible (cell, camera) pairs, a count traced once from the example rig:
    other rigs (fewer, more, or no visible pairs at all) must still give PyTorch's outputs."""
    path, _, (img, lidar2img) = exported["float"]
    session = create_session(path, threads=1)
    torch.manual_seed(0)
    model = build_maptr(exported["config"]).eval()
    blind = lidar2img.clone()
    blind[:, :, 2] *= -1.0  # every point behind every camera: no camera sees any BEV cell
    for rig in (_rotated_rig(lidar2img, 0.4), lidar2img[:, [0, 0, 0, 0, 0, 0]], blind):
        with torch.no_grad():
            expected = MapTRInference(model)(img, rig)
        scores, pts = run_frame(session, img.numpy(), rig.numpy())
        assert np.abs(scores - expected[0].numpy()).max() < 1e-4
        assert np.abs(pts - expected[1].numpy()).max() < 1e-4


@pytest.mark.parametrize("level", ["disabled", "extended"])
def test_qdq_on_ort_matches_the_fake_quant_model_within_one_step(exported, tmp_path, level):
    """ORT as exported (DQ -> float op -> Q) and as deployed (fused integer kernels) vs PyTorch fake-quant."""
    path, result, (img, lidar2img) = exported["qdq"]
    if level == "extended":
        path = optimize_and_save(path, tmp_path / "deploy.onnx", level).path
        level = DEPLOYED_LEVEL  # as every deployed session loads it
    scores, pts = run_frame(create_session(path, threads=1, level=level), img.numpy(), lidar2img.numpy())
    score_err = np.abs(scores - result.scores.numpy())
    pts_err = np.abs(pts - result.pts.numpy())
    assert score_err.max() <= UINT8_STEP and pts_err.max() <= UINT8_STEP, (score_err.max(), pts_err.max())
    assert score_err.mean() < 0.25 * UINT8_STEP and pts_err.mean() < 0.25 * UINT8_STEP  # most far below a step


def test_failed_export_leaves_no_onnx_and_keeps_the_old_file(micro_cfg, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous finished model")

    def save_half_then_fail(self, destination, **kwargs):
        Path(destination).write_bytes(b"\x08\x07partial")  # the start of a protobuf, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save_half_then_fail)
    torch.manual_seed(0)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(build_maptr(micro_cfg), target)
    assert target.read_bytes() == b"previous finished model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


KILLED_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from maptr.config import load_model_config, load_params
    from maptr.deploy.onnx_export import export_onnx
    from maptr.models.maptr import build_maptr

    def save_slowly(self, destination, **kwargs):
        Path(destination).write_bytes(b"\\x08\\x07partial")
        print("writing", flush=True)
        time.sleep(60)  # killed here, mid-write

    torch.onnx.ONNXProgram.save = save_slowly
    torch.set_num_threads(1)
    export_onnx(build_maptr(load_model_config(load_params(sys.argv[1]))).eval(), sys.argv[2])
    """
)


def test_sigkill_mid_export_leaves_no_finished_looking_onnx_and_a_rerun_cleans_up(micro_cfg, tmp_path):
    params = write_micro_params(tmp_path)
    target = tmp_path / "models" / "maptr_float.onnx"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(params), str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not target.exists() and not list(target.parent.glob("*.onnx"))
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name  # a temporary, never named *.onnx
    torch.manual_seed(0)
    export_onnx(build_maptr(micro_cfg), target)  # a rerun completes and removes the stale temporary
    assert [p.name for p in target.parent.iterdir()] == ["maptr_float.onnx"]
    check_onnx_file(target)
