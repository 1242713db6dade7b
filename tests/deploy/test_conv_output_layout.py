"""Pass 8, ``flatten_conv_outputs_channels_last`` (maptr/deploy/conv_output_layout.py): a convolution's output
flattened to tokens channels-last, the same bytes, and ORT drops both transposes at load."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from ort_graphs import make_model, op_types, session, value

from maptr.deploy.conv_output_layout import flatten_conv_outputs_channels_last


def _conv_tokens_model(target: list[int], second_reader: str = "") -> onnx.ModelProto:
    """uint8 (2, 4, 3, 5) -> QLinearConv 3x3 to 6 channels -> Reshape(target) -> Transpose(0, 2, 1)."""
    rng = np.random.default_rng(0)
    inits = {
        "x_scale": np.float32(0.05), "x_zero": np.uint8(100),
        "w": rng.integers(-60, 60, (6, 4, 3, 3)).astype(np.int8),
        "w_scale": rng.uniform(0.01, 0.02, 6).astype(np.float32),
        "w_zero": np.zeros(6, np.int8), "y_scale": np.float32(0.1), "y_zero": np.uint8(90),
        "tokens": np.array(target, np.int64),
    }  # fmt: skip
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
    outputs = [value("y", [2, 15, 6], TensorProto.UINT8)]
    if second_reader == "identity":
        nodes.append(helper.make_node("Identity", ["flat"], ["flat_copy"]))
        outputs.append(value("flat_copy", [2, 6, 15], TensorProto.UINT8))
    elif second_reader == "graph output":
        outputs.append(value("flat", [2, 6, 15], TensorProto.UINT8))
    return make_model(nodes, [value("x", [2, 4, 3, 5], TensorProto.UINT8)], outputs, inits)


def _run_all(model: onnx.ModelProto, x: np.ndarray, tmp_path, name: str) -> tuple[list[np.ndarray], list[str]]:
    """Outputs and node types of ``model`` as ORT runs it at level ``all`` (channels-last convolutions)."""
    path = tmp_path / f"{name}.onnx"
    outputs = session(model, "all", saved=path).run(None, {"x": x})
    return outputs, op_types(onnx.load(str(path)))


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
    assert op_types(rewritten) == op_types(model)
