"""Convolution outputs flattened to tokens channels-last (maptr/deploy/conv_output_layout.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy.conv_output_layout import flatten_conv_outputs_channels_last


def _conv_tokens_model(target: list[int], second_reader: str = "") -> onnx.ModelProto:
    """uint8 (2, 4, 3, 5) -> QLinearConv 3x3 to 6 channels -> Reshape(target) -> Transpose(0, 2, 1)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.uint8(100), "x_zero"),
        numpy_helper.from_array(rng.integers(-60, 60, (6, 4, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(rng.uniform(0.01, 0.02, 6).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(6, np.int8), "w_zero"),
        numpy_helper.from_array(np.float32(0.1), "y_scale"),
        numpy_helper.from_array(np.uint8(90), "y_zero"),
        numpy_helper.from_array(np.array(target, np.int64), "tokens"),
    ]
    nodes = [
        helper.make_node(
            "QLinearConv",
            ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"],
            ["map"],
            name="conv",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Reshape", ["map", "tokens"], ["flat"], name="flatten"),
        helper.make_node("Transpose", ["flat"], ["y"], name="to_tokens", perm=[0, 2, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 15, 6])]
    if second_reader == "identity":
        nodes.append(helper.make_node("Identity", ["flat"], ["flat_copy"]))
        outputs.append(helper.make_tensor_value_info("flat_copy", TensorProto.UINT8, [2, 6, 15]))
    elif second_reader == "graph output":
        outputs.append(helper.make_tensor_value_info("flat", TensorProto.UINT8, [2, 6, 15]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4, 3, 5])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run_all(model: onnx.ModelProto, x: np.ndarray, tmp_path, name: str) -> tuple[list[np.ndarray], list[str]]:
    """Outputs and node types of ``model`` as ORT runs it at level ``all`` (channels-last convolutions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": x})
    return outputs, [node.op_type for node in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node]


@pytest.mark.parametrize("target", [[2, 6, 15], [-1, 6, 15], [2, 6, -1]])
def test_tokens_are_the_same_bytes_and_ort_drops_both_transposes(target, tmp_path):
    model = _conv_tokens_model(target)
    rewritten, count = flatten_conv_outputs_channels_last(model)
    assert count == 1
    onnx.checker.check_model(rewritten)
    x = np.random.default_rng(1).integers(0, 256, (2, 4, 3, 5)).astype(np.uint8)
    (before,), before_ops = _run_all(model, x, tmp_path, "before")
    (after,), after_ops = _run_all(rewritten, x, tmp_path, "after")
    assert before.shape == (2, 15, 6)
    np.testing.assert_array_equal(after, before)  # data movement only: bit-identical
    # ORT runs the convolution channels-last (one transpose of the NCHW input in both): before, the map
    # then goes NHWC -> NCHW -> tokens; after, ORT's NHWC -> NCHW transpose and the rewritten one cancel.
    assert before_ops.count("Transpose") == 3 and after_ops.count("Transpose") == 1
    assert "QLinearConv" in after_ops


@pytest.mark.parametrize(
    "target, second_reader",
    # C not the conv's; a "copy" dim; the flattened map read by another node / outside the graph
    [([2, 3, 30], ""), ([2, 0, 15], ""), ([2, 6, 15], "identity"), ([2, 6, 15], "graph output")],
)
def test_other_reshapes_are_left_alone(target, second_reader):
    model = _conv_tokens_model(target, second_reader)
    rewritten, count = flatten_conv_outputs_channels_last(model)
    assert count == 0
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in model.graph.node]
