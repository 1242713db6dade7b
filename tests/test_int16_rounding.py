"""16-bit Q -> DQ pairs removed before ORT's optimizer (maptr/deploy/int16_rounding.py), and what follows
for the weights of the linears behind them (constant folding after ORT)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy.constant_folding import fold_constants
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
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])]
    if q_output_also_read:
        outputs.append(helper.make_tensor_value_info("x_q", TensorProto.INT16, [1, 4, 8]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])], outputs,
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


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
    assert [n.op_type for n in rewritten.graph.node].count("DequantizeLinear") == 1  # only the weight's
    matmul = next(node for node in rewritten.graph.node if node.op_type == "MatMul")
    assert matmul.input[0] == "x"
    x = _x()
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    expected = x @ _weight(model).T + inits["bias"]
    np.testing.assert_allclose(_run(rewritten, x), expected, rtol=0, atol=1e-5)
    # the QAT model's grid: at most half a 16-bit step per input, times the weights' absolute row sums
    bound = _X_SCALE / 2 * np.abs(_weight(model)).sum(axis=1).max()
    difference = np.abs(_run(rewritten, x) - _run(model, x)).max()
    assert 0 < difference <= bound + 1e-5


def test_8_bit_pairs_and_a_16_bit_code_read_elsewhere_stay():
    assert drop_int16_rounding(_int16_linear_model(zero_point_dtype=np.uint8))[1] == 0
    kept, pairs = drop_int16_rounding(_int16_linear_model(q_output_also_read=True))
    assert pairs == 0 and [n.op_type for n in kept.graph.node].count("QuantizeLinear") == 1


def _gemm_model(dequantized_input: bool) -> onnx.ModelProto:
    """ORT's optimized form of a float linear: Gemm(x, DQ(w int8), bias), x read through an int16 DQ or not."""
    rng = np.random.default_rng(2)
    inits = {
        "w_q": rng.integers(-60, 60, size=(16, 8)).astype(np.int8), "w_scale": np.full(16, 0.02, np.float32),
        "w_zp": np.zeros(16, np.int8), "bias": rng.normal(size=16).astype(np.float32),
        "x_scale": np.array(_X_SCALE, np.float32), "x_zp": np.array(0, np.int16),
    }  # fmt: skip
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=0)]
    data = "x"
    if dequantized_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_f"])]  # fmt: skip
        data = "x_f"
    nodes.append(helper.make_node("Gemm", [data, "w_f", "bias"], ["y"], transB=1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_a_float_gemm_weight_dequantize_is_folded_once_its_input_is_not_dequantized():
    """ORT re-quantizes the float weight of a Gemm whose input comes from a DequantizeLinear when it loads
    the file, so that weight's DQ stays; with the 16-bit pair gone the Gemm reads float and it is folded."""
    x = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
    behind_dq, _ = fold_constants(_gemm_model(dequantized_input=True), keep_dequantize=False)
    weight_dq = [n for n in behind_dq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_q"]
    assert len(weight_dq) == 1
    plain = _gemm_model(dequantized_input=False)
    folded, report = fold_constants(plain, keep_dequantize=False)
    assert [node.op_type for node in folded.graph.node] == ["Gemm"] and report.folded_nodes == 1
    as_written = _run(folded, x)
    np.testing.assert_array_equal(as_written, _run(plain, x))
    loaded = _run(folded, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_allclose(loaded, as_written, rtol=0, atol=1e-5)  # no re-quantization at load
