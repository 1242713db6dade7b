"""Pass 7, ``fold_leftover_dequantize`` (maptr/deploy/leftover_dequantize.py): after ORT's optimizer, the
constant DQs that feed float kernels are folded, except the weights ORT would re-quantize when loading the
file (those of a float Gemm whose input is dequantized)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from ort_graphs import linear_feeds, make_model, op_types, optimized, qdq_linear_model, run, value

from maptr.deploy import constant_folding
from maptr.deploy.constant_folding import fold_constants
from maptr.deploy.leftover_dequantize import fold_leftover_dequantize

_X_SCALE = 0.01


def test_after_ort_a_constant_dequantize_read_by_a_float_kernel_is_folded(tmp_path):
    # A constant uint8 tensor (a learned query, folded) dequantized into a float Mul: per frame for nothing.
    init = {"c_q": np.arange(6, dtype=np.uint8), "c_scale": np.array(0.5, np.float32), "c_zp": np.array(2, np.uint8)}
    model = make_model(
        [helper.make_node("DequantizeLinear", ["c_q", "c_scale", "c_zp"], ["c"]),
         helper.make_node("Mul", ["x", "c"], ["y"])],
        [value("x", [6])],
        [value("y", [6])],
        init,
    )  # fmt: skip
    ort_graph = optimized(model, tmp_path)
    assert "DequantizeLinear" in op_types(ort_graph)
    assert len(fold_constants(ort_graph)[0].graph.node) == 2  # before ORT's optimizer the DQ must stay ...
    folded, count = fold_leftover_dequantize(ort_graph)  # ... after it, nothing fuses it any more
    assert op_types(folded) == ["Mul"] and count == 1
    feeds = {"x": np.arange(6, dtype=np.float32)}
    np.testing.assert_array_equal(run(folded, feeds)[0], run(ort_graph, feeds)[0])


def test_after_ort_a_float_gemm_keeps_its_weight_dequantize_so_that_loading_does_not_requantize_it(
    tmp_path, monkeypatch
):
    """An int16-input linear stays a float Gemm. Loaded at ORT's default level, ORT's WeightBiasQuantization
    re-quantizes a float weight of such a Gemm per tensor: a folded per-channel weight would change value."""
    model = qdq_linear_model(relu=False)
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int16), "x_zp16"))
    for node in model.graph.node:
        if node.input[1:2] == ["x_scale"]:
            node.input[2] = "x_zp16"
    ort_graph = optimized(model, tmp_path)
    assert "Gemm" in op_types(ort_graph)
    folded, _ = fold_leftover_dequantize(ort_graph)
    int8_initializers = {init.name for init in folded.graph.initializer if init.data_type == TensorProto.INT8}
    weight_dq = [node for node in folded.graph.node
                 if node.op_type == "DequantizeLinear" and node.input[0] in int8_initializers]  # fmt: skip
    assert len(weight_dq) == 1  # the int8 per-channel weight is still read through its DQ
    feeds = linear_feeds()
    np.testing.assert_array_equal(run(folded, feeds, level="all")[0], run(ort_graph, feeds, level="all")[0])
    # The hazard the rule avoids: with the weight and bias DQs folded too (the rule switched off), the file
    # computes the same as written, but loaded at `all` ORT re-quantizes the float weight per tensor.
    monkeypatch.setattr(constant_folding, "_WEIGHT_REQUANTIZED_AT_LOAD", set())
    naive, _ = fold_leftover_dequantize(ort_graph)
    assert not [
        node for node in naive.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in int8_initializers
    ]
    np.testing.assert_allclose(run(naive, feeds)[0], run(ort_graph, feeds)[0], atol=1e-6)
    assert np.abs(run(naive, feeds, level="all")[0] - run(ort_graph, feeds, level="all")[0]).max() > 0


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
    return make_model(nodes, [value("x", [4, 8])], [value("y", [4, 16])], inits)


def test_a_float_gemm_weight_dequantize_is_folded_once_its_input_is_not_dequantized():
    """ORT re-quantizes the float weight of a Gemm whose input comes from a DequantizeLinear when it loads
    the file, so that weight's DQ stays; with the 16-bit pair gone (pass 5) the Gemm reads float and it is
    folded."""
    x = {"x": np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)}
    behind_dq, _ = fold_leftover_dequantize(_gemm_model(dequantized_input=True))
    weight_dq = [n for n in behind_dq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_q"]
    assert len(weight_dq) == 1
    plain = _gemm_model(dequantized_input=False)
    folded, count = fold_leftover_dequantize(plain)
    assert op_types(folded) == ["Gemm"] and count == 1
    as_written = run(folded, x)[0]
    np.testing.assert_array_equal(as_written, run(plain, x)[0])
    loaded = run(folded, x, level="all")[0]
    np.testing.assert_allclose(loaded, as_written, rtol=0, atol=1e-5)  # no re-quantization at load
