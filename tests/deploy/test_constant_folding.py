"""Pass 1, ``fold_constants`` (maptr/deploy/constant_folding.py): the input-independent nodes of a Q/DQ
graph computed once, every output value kept, and the weight's DQ chain left for ORT's integer kernel."""

from __future__ import annotations

import numpy as np
from onnx import helper
from ort_graphs import linear_feeds, make_model, op_types, optimized, qdq_linear_model, run, value

from maptr.deploy.constant_folding import constant_nodes, fold_constants


def test_constant_nodes_are_those_that_read_no_graph_input():
    model = qdq_linear_model(relu=False)
    flags = dict(zip((node.output[0] for node in model.graph.node), constant_nodes(model.graph), strict=True))
    assert flags == {"query2": True, "xq": False, "x_u8": False, "x_f": False, "w_f": True, "w_t": True,
                     "mm": False, "lin": False, "y_u8": False, "y": False}  # fmt: skip


def test_folding_keeps_the_values_and_the_weight_chain_for_the_integer_kernel(tmp_path):
    model = qdq_linear_model(relu=False)
    folded, count = fold_constants(model)
    ops = op_types(folded)
    assert "Mul" not in ops  # the constant query branch was computed once ...
    assert ops.count("DequantizeLinear") == 3 and "Transpose" in ops  # ... the weight's DQ -> Transpose was not
    assert count == 1 and len(ops) == len(model.graph.node) - count
    constants = {init.name for init in folded.graph.initializer}
    kept_constant_dq = [n for n in folded.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert len(kept_constant_dq) == 1
    assert {"w_q", "w_scale"} <= {name for node in folded.graph.node for name in node.input}  # learned int8 grid
    np.testing.assert_array_equal(run(folded, linear_feeds())[0], run(model, linear_feeds())[0])
    # Folded into a float initializer, the weight would be requantized by ORT on its own per-tensor grid.
    assert "QGemm" in op_types(optimized(folded, tmp_path))


def test_folding_a_graph_output_that_is_constant():
    init = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["a"], ["c"])],
        [value("x", [2])],
        [value("y", [2]), value("c", [2, 3])],
        init,
    )
    folded, count = fold_constants(model)
    assert op_types(folded) == ["Relu"] and count == 1
    assert {i.name for i in folded.graph.initializer} == {"c"}  # the one new tensor; "a" is read no more
    y, c = run(folded, {"x": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(c, -init["a"])
    np.testing.assert_array_equal(y, [0.0, 2.0])
