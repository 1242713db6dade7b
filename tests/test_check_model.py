"""ONNX export of the fake-quant model and the model checker: ORT's kernels per operator, clear export errors."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import Tensor, nn

from maptr.config import ModelConfig
from maptr.deploy.checker import check_model, format_report
from maptr.deploy.onnx_export import UnexportableOperatorError, example_inputs, export_onnx
from maptr.deploy.ort_compile import optimize_and_save
from maptr.deploy.ort_runner import DEPLOYED_LEVEL
from maptr.models.maptr import MapTR, build_maptr
from maptr.quant import FakeQuantMode, set_fake_quant_mode
from maptr.quant.calibration import calibrate
from maptr.quant.quantizer import QuantConfig, quantize_model, quantized_operators

INT16_OP = "backbone.layer1.0.conv2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; a busy second core would only make every op wait
    yield
    torch.set_num_threads(threads)


@torch.library.custom_op("maptr_test::opaque_identity", mutates_args=())
def opaque_identity(x: Tensor) -> Tensor:
    """An operator with no ONNX translation (stands for any op the exporter does not know)."""
    return x.clone()


@opaque_identity.register_fake
def _opaque_identity_meta(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class OpaqueIdentity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return opaque_identity(x)


def _calibrated(cfg: ModelConfig) -> tuple[MapTR, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = quantize_model(build_maptr(cfg), QuantConfig(int16_ops=(INT16_OP,)))
    inputs = example_inputs(model)
    calibrate(model, [{"img": inputs[0], "lidar2img": inputs[1]}])
    return model, inputs


@pytest.fixture(scope="module")
def checked(micro_cfg, tmp_path_factory):
    model, inputs = _calibrated(micro_cfg)
    path = tmp_path_factory.mktemp("onnx") / "micro_qdq.onnx"
    exported = export_onnx(model, path, inputs)
    report = check_model(path, quantized_operators(model), inputs, (exported.scores, exported.pts))
    return model, path, exported, report


def test_export_writes_qdq_graph_with_named_inputs_and_outputs(checked):
    _, path, exported, _ = checked
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["img", "lidar2img"]
    assert [o.name for o in proto.graph.output] == ["scores", "pts"]
    op_types = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "GridSample", "Conv", "MatMul"} <= op_types
    zero_point_types = {init.data_type for init in proto.graph.initializer if "zero_point" in init.name}
    assert {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT16} <= zero_point_types
    assert exported.num_nodes == len(proto.graph.node)
    assert not list(path.parent.glob("*.tmp-*"))  # the atomic write left no temporary behind


def test_checker_lists_every_operator_with_its_dtype_and_ort_kernel(checked):
    model, _, _, report = checked
    operators = quantized_operators(model)
    assert [row.name for row in report.operators] == [op.name for op in operators]
    rows = {row.name: row for row in report.operators}
    # uint8 activations + int8 weights around a conv: ORT fuses them into an integer kernel
    stem = rows["backbone.conv1"]
    assert stem.activation_dtype == "uint8" and stem.weight_dtype == "int8"
    assert stem.ort_kernels == ["QLinearConv"] and stem.integer
    # int16 inputs: ORT keeps the conv in float between DQ and Q
    sensitive = rows[INT16_OP]
    assert sensitive.activation_dtype == "int16" and sensitive.ort_kernels == ["Conv"] and not sensitive.integer
    assert report.summary()["int16_operators"] == 1
    assert 0 < report.summary()["integer_kernels"] < len(operators)
    # float operators by design: grid sampling and layer norms
    float_kinds = {row.kind for row in report.float_operators}
    assert "GridSample" in float_kinds and not any(
        row.integer for row in report.float_operators if row.kind == "GridSample"
    )
    # auxiliary-layer class branches are not part of the inference graph
    assert rows["head.cls_branches.0.0"].ort_kernels == ["(not in the inference graph)"]
    assert report.max_abs_diff["scores"] < 0.05 and report.max_abs_diff["pts"] < 0.05
    text = format_report(report)
    assert "backbone.conv1" in text and "QLinearConv" in text and "GridSample" in text


def test_checker_on_the_compiled_file_finds_the_kernels_the_deployed_model_runs(checked, tmp_path):
    model, path, exported, raw = checked
    deployed = optimize_and_save(path, tmp_path / "micro_deploy.onnx", "extended").path
    inputs = example_inputs(model)
    report = check_model(
        path, quantized_operators(model), inputs, (exported.scores, exported.pts), DEPLOYED_LEVEL, 1, deployed
    )
    rows = {row.name: row for row in report.operators}
    # renamed by the compile stage (space-to-depth stem, QGemm rewrites) and by ORT's layouts at load
    # ("_token_N"), the kernels are still found
    assert rows["backbone.conv1"].ort_kernels == ["QLinearConv"] and rows["backbone.conv1"].integer
    assert report.summary()["integer_kernels"] > raw.summary()["integer_kernels"]  # integer biases etc.
    constant = [row.name for row in report.operators if row.ort_kernels == ["(constant: computed at compile time)"]]
    assert constant and all(".self_attn." in name or "pos_add" in name or "_attn." in name for name in constant)
    assert not [row.name for row in report.operators if row.ort_kernels == ["(no kernel matched)"]]
    # the int16 conv reads float once its 16-bit pair is gone: a float Conv (channels-blocked at `all`)
    assert rows[INT16_OP].ort_kernels == ["Conv"] and not rows[INT16_OP].integer
    assert "compiled file" in report.optimization_level
    assert report.max_abs_diff["scores"] < 0.05 and report.max_abs_diff["pts"] < 0.05


def test_unexportable_operator_fails_naming_its_module(micro_cfg, tmp_path):
    model, inputs = _calibrated(micro_cfg)
    model.head.cls_branches[1][2] = OpaqueIdentity()  # the ReLU of the last class branch
    path = tmp_path / "broken.onnx"
    with pytest.raises(UnexportableOperatorError) as error:
        export_onnx(model, path, inputs)
    message = str(error.value)
    assert "head.cls_branches.1.2 (OpaqueIdentity)" in message
    assert "maptr_test.opaque_identity" in message and "No ONNX function" in message
    assert not path.exists()


def test_export_refuses_a_model_still_observing(micro_cfg, tmp_path):
    model, inputs = _calibrated(micro_cfg)
    set_fake_quant_mode(model, FakeQuantMode.OBSERVE)
    with pytest.raises(ValueError, match="OBSERVE mode"):
        export_onnx(model, tmp_path / "observing.onnx", inputs)
