"""Pass 6, ``move_qgemm_to_faster_kernels`` (maptr/deploy/qgemm_kernels.py): ORT's QGemm nodes moved to
faster kernels; uint8 outputs stay bit-identical, float outputs within float rounding, ineligible nodes
untouched."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from ort_graphs import WITH_CONTRIB, make_model, run, value

from maptr.deploy.qgemm_kernels import move_qgemm_to_faster_kernels

M, K, N = 37, 24, 12  # odd row count: the channels-last reshape must not assume a multiple of anything


def _qgemm_model(alpha: float = 1.0, equal_weight_zero_points: bool = True, bias_size: int = N) -> onnx.ModelProto:
    """x (M, K) uint8 -> four QGemm: uint8 out + bias, uint8 out without bias, float out + bias with a
    transposed (N, K) weight, float out without bias; per-channel int8 weights, as ORT's fusion writes them."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    zero = np.zeros(N, np.int8) if equal_weight_zero_points else np.arange(N, dtype=np.int8)
    init = {
        "x_scale": np.array(0.03, np.float32), "x_zero": np.array(121, np.uint8),
        "w": weight, "w_t": np.ascontiguousarray(weight.T), "w_scale": rng.uniform(0.005, 0.02, N).astype(np.float32),
        "w_zero": zero, "bias": rng.integers(-5000, 5000, bias_size).astype(np.int32),
        "y_scale": np.array(0.4, np.float32), "y_zero": np.array(128, np.uint8),
    }  # fmt: skip
    common = ["x", "x_scale", "x_zero"]
    nodes = [
        helper.make_node("QGemm", [*common, "w", "w_scale", "w_zero", "bias", "y_scale", "y_zero"], ["u8_bias"],
                         domain="com.microsoft", alpha=alpha),
        helper.make_node("QGemm", [*common, "w", "w_scale", "w_zero", "", "y_scale", "y_zero"], ["u8"],
                         domain="com.microsoft", alpha=alpha),
        helper.make_node("QGemm", [*common, "w_t", "w_scale", "w_zero", "bias"], ["f_bias"], domain="com.microsoft",
                         transB=1, alpha=alpha),
        helper.make_node("QGemm", [*common, "w", "w_scale", "w_zero"], ["f"], domain="com.microsoft", alpha=alpha),
    ]  # fmt: skip
    outputs = [value(name, [M, N], TensorProto.UINT8) for name in ("u8_bias", "u8")]
    outputs += [value(name, [M, N]) for name in ("f_bias", "f")]
    return make_model(nodes, [value("x", [M, K], TensorProto.UINT8)], outputs, init, WITH_CONTRIB)


def _kernels(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(node.op_type, node.domain) for node in model.graph.node]


def test_qgemm_moves_to_channels_last_conv_and_matmul_integer_to_float():
    model = _qgemm_model()
    rewritten, count = move_qgemm_to_faster_kernels(model)
    onnx.checker.check_model(rewritten)
    assert count == 4
    ops = _kernels(rewritten)
    assert ("QGemm", "com.microsoft") not in ops
    assert ops.count(("QLinearConv", "com.microsoft")) == 2  # the uint8 outputs
    assert ops.count(("MatMulIntegerToFloat", "com.microsoft")) == 2  # the float outputs
    conv = next(node for node in rewritten.graph.node if node.op_type == "QLinearConv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "channels_last")) == 1
    assert not {"w", "w_t"} & {init.name for init in rewritten.graph.initializer}  # QGemm's weights dropped
    x = {"x": np.random.default_rng(1).integers(0, 256, size=(M, K)).astype(np.uint8)}
    for level in ("disabled", "all"):
        before, after = run(model, x, level), run(rewritten, x, level)
        for name, ref, got in zip(("u8_bias", "u8", "f_bias", "f"), before, after, strict=True):
            assert got.dtype == ref.dtype and got.shape == ref.shape == (M, N), name
        np.testing.assert_array_equal(after[0], before[0])  # requantized the same way: bit-identical
        np.testing.assert_array_equal(after[1], before[1])
        assert len(np.unique(before[0])) > 20  # a real spread of output codes, not a saturated constant
        # the bias is added after the scale instead of before it: float rounding only
        np.testing.assert_allclose(after[2], before[2], rtol=1e-5, atol=1e-5 * np.abs(before[2]).max())
        np.testing.assert_allclose(after[3], before[3], rtol=1e-6, atol=1e-6 * np.abs(before[3]).max())
    # and the float outputs are the exact integer product: (x - z_x) . W * s_x * s_w + b * s_x * s_w
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    acc = (x["x"].astype(np.int64) - 121) @ init["w"].astype(np.int64) + init["bias"]
    np.testing.assert_allclose(after[2], acc * 0.03 * init["w_scale"], rtol=1e-5, atol=1e-4)


def test_ineligible_qgemm_nodes_stay():
    for model in (_qgemm_model(alpha=0.5), _qgemm_model(equal_weight_zero_points=False)):
        rewritten, count = move_qgemm_to_faster_kernels(model)
        assert count == 0
        assert [node.op_type for node in rewritten.graph.node] == ["QGemm"] * 4
    # a bias broadcast from one value: QLinearConv takes one per output channel, so the biased nodes stay
    rewritten, count = move_qgemm_to_faster_kernels(_qgemm_model(bias_size=1))
    ops = _kernels(rewritten)
    assert count == 2  # the two without bias, one to each kernel
    assert ops.count(("QLinearConv", "com.microsoft")) == 1
    assert ops.count(("MatMulIntegerToFloat", "com.microsoft")) == 1
    assert [node.op_type for node in rewritten.graph.node].count("QGemm") == 2
