"""Pass 2, ``drop_relus_before_quantize`` (maptr/deploy/redundant_relu.py): a ReLU that the uint8
quantization after it already performs is removed, every output value kept, and the linear before it
becomes an integer kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from ort_graphs import linear_feeds, make_model, op_types, optimized, qdq_linear_model, run, value

from maptr.deploy.ort_compile import prepare_for_ort
from maptr.deploy.redundant_relu import drop_relus_before_quantize


def test_relu_before_a_zero_point_0_uint8_quantize_is_dropped_and_the_linear_becomes_integer(tmp_path):
    model = qdq_linear_model(relu=True)
    dropped, count = drop_relus_before_quantize(model)
    assert count == 1 and "Relu" not in op_types(dropped)
    onnx.checker.check_model(dropped)
    feeds = linear_feeds()
    reference = run(model, feeds)[0]
    assert (reference == 0).any() and (reference > 0).any()  # the ReLU did clip something
    np.testing.assert_array_equal(run(dropped, feeds)[0], reference)
    prepared, counts = prepare_for_ort(model)
    assert counts["drop_relus_before_quantize"] == 1 and "QGemm" in op_types(optimized(prepared, tmp_path))


@pytest.mark.parametrize("zero_point, second_reader", [(np.uint8(3), False), (np.uint8(0), True)])
def test_relu_that_changes_values_is_kept(zero_point, second_reader):
    """A zero point above the bottom of the range keeps negative values apart from 0; a second reader of
    the ReLU output needs the ReLU itself."""
    init = {"s": np.array(0.1, np.float32), "z": np.array(zero_point)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    outputs = [value("y", [3])]
    if second_reader:
        nodes.append(helper.make_node("Neg", ["r"], ["n"]))
        outputs.append(value("n", [3]))
    model = make_model(nodes, [value("x", [3])], outputs, init)
    kept, count = drop_relus_before_quantize(model)
    assert count == 0 and op_types(kept) == op_types(model)
