"""Pass 5, ``drop_int16_rounding`` (maptr/deploy/int16_rounding.py): the 16-bit Q -> DQ pairs in front of
kernels ORT runs in float are removed; the operator reads the float tensor, within half a 16-bit step."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from ort_graphs import make_model, op_types, run, value

from maptr.deploy.int16_rounding import drop_int16_rounding

_X_SCALE = 0.01  # a coarse 16-bit grid, so that the rounding is visible in float32


def _int16_linear_model(zero_point_dtype=np.int16, q_output_also_read: bool = False) -> onnx.ModelProto:
    """x (1, 4, 8) -> Q/DQ (16-bit unless told) -> linear with an int8 per-channel weight DQ -> y (float)."""
    rng = np.random.default_rng(0)
    inits = {
        "x_scale": np.array(_X_SCALE, np.float32), "x_zp": np.array(0, zero_point_dtype),
        "w_q": rng.integers(-60, 60, size=(16, 8)).astype(np.int8), "w_scale": np.full(16, 0.02, np.float32),
        "w_zp": np.zeros(16, np.int8), "bias": rng.normal(size=16).astype(np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=0),
        helper.make_node("Transpose", ["w_f"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x_f", "w_t"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
    ]
    outputs = [value("y", [1, 4, 16])]
    if q_output_also_read:
        outputs.append(value("x_q", [1, 4, 8], TensorProto.INT16))
    return make_model(nodes, [value("x", [1, 4, 8])], outputs, inits)


def _x() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)


def _weight(model: onnx.ModelProto) -> np.ndarray:
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return inits["w_q"].astype(np.float32) * inits["w_scale"][:, None]  # (16, 8)


def test_the_16_bit_pair_is_removed_and_the_linear_reads_the_float_tensor():
    model = _int16_linear_model()
    rewritten, pairs = drop_int16_rounding(model)
    onnx.checker.check_model(rewritten)
    assert pairs == 1
    assert op_types(rewritten).count("DequantizeLinear") == 1  # only the weight's
    matmul = next(node for node in rewritten.graph.node if node.op_type == "MatMul")
    assert matmul.input[0] == "x"
    x = _x()
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    expected = x @ _weight(model).T + inits["bias"]
    np.testing.assert_allclose(run(rewritten, {"x": x})[0], expected, rtol=0, atol=1e-5)
    # the QAT model's grid: at most half a 16-bit step per input, times the weights' absolute row sums
    bound = _X_SCALE / 2 * np.abs(_weight(model)).sum(axis=1).max()
    difference = np.abs(run(rewritten, {"x": x})[0] - run(model, {"x": x})[0]).max()
    assert 0 < difference <= bound + 1e-5


def test_8_bit_pairs_and_a_16_bit_code_read_elsewhere_stay():
    assert drop_int16_rounding(_int16_linear_model(zero_point_dtype=np.uint8))[1] == 0
    kept, pairs = drop_int16_rounding(_int16_linear_model(q_output_also_read=True))
    assert pairs == 0 and op_types(kept).count("QuantizeLinear") == 1
