"""Pass 3, ``quantize_float_output_biases`` (maptr/deploy/integer_bias.py): a uint8 linear whose output stays
float gets an int32 bias, so that ORT runs it as QGemm; its output moves by at most half a bias step."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from ort_graphs import linear_feeds, op_types, optimized, qdq_linear_model, run

from maptr.deploy.integer_bias import quantize_float_output_biases


def _float_output_linear(activation_zero_point: np.ndarray) -> onnx.ModelProto:
    """The linear of :func:`~ort_graphs.qdq_linear_model` with its output left float (read by a float operator)."""
    model = qdq_linear_model(relu=False)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] == "x_scale":
            node.input[2] = "x_zp16" if activation_zero_point.dtype == np.int16 else "x_zp"
    model.graph.initializer.append(numpy_helper.from_array(activation_zero_point, "x_zp16"))
    model.graph.node.pop()  # the output DQ ...
    model.graph.node.pop()  # ... and Q
    model.graph.output[0].name = "lin"
    onnx.checker.check_model(model)
    return model


def test_a_float_output_linear_gets_an_int32_bias_and_runs_as_qgemm(tmp_path):
    model = _float_output_linear(np.array(128, np.uint8))
    assert "QGemm" not in op_types(optimized(model, tmp_path))  # ORT alone keeps it float
    rewritten, count = quantize_float_output_biases(model)
    assert count == 1
    onnx.checker.check_model(rewritten)
    bias = {init.name: numpy_helper.to_array(init) for init in rewritten.graph.initializer}
    quantized = next(value for name, value in bias.items() if name.endswith("_quantized"))
    scale = next(value for name, value in bias.items() if name.endswith("_int32_bias_scale"))
    np.testing.assert_allclose(scale, 0.05 * 0.02, rtol=1e-6)  # s_x * s_w per output channel
    assert quantized.dtype == np.int32 and quantized.shape == (16,)
    assert "QGemm" in op_types(optimized(rewritten, tmp_path))
    feeds = linear_feeds()
    reference = run(model, feeds)[0]
    exact = run(rewritten, feeds)[0]
    integer = run(rewritten, feeds, level="extended")[0]
    half_step = 0.5 * 0.05 * 0.02
    assert 0 < np.abs(exact - reference).max() <= half_step * (1 + 1e-3)  # only the bias rounding moved
    np.testing.assert_allclose(integer, exact, atol=1e-5)  # the QGemm computes the rewritten graph


def test_int16_linears_and_linears_without_bias_keep_their_float_bias():
    model = _float_output_linear(np.array(0, np.int16))
    assert quantize_float_output_biases(model)[1] == 0  # no integer kernel for int16 in ORT anyway
    no_bias = _float_output_linear(np.array(128, np.uint8))
    add = next(node for node in no_bias.graph.node if node.op_type == "Add" and "bias" in node.input)
    add.op_type, add.input[1] = "Sub", "bias"  # not a bias add: nothing to quantize
    assert quantize_float_output_biases(no_bias)[1] == 0
