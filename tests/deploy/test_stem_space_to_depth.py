"""Pass 4, ``space_to_depth_stem`` (maptr/deploy/stem_space_to_depth.py): the stride-2 stem convolution over
2x2 blocks, with bit-identical integer outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from ort_graphs import make_model, op_types, optimized, run, value

from maptr.deploy.stem_space_to_depth import space_to_depth_stem, space_to_depth_weight


def _qdq_stem_model(height: int, width: int, kernel: int = 7) -> onnx.ModelProto:
    """x (2, 3, H, W) -> uint8 Q/DQ (zero point 128) -> Conv kernel x kernel / 2 with a per-channel int8
    weight and a bias -> uint8 Q/DQ -> y: ResNet's stem as the exporter writes it."""
    rng = np.random.default_rng(0)
    init = {
        "w_q": rng.integers(-60, 60, size=(8, 3, kernel, kernel)).astype(np.int8),
        "w_scale": rng.uniform(0.01, 0.03, 8).astype(np.float32), "w_zp": np.zeros(8, np.int8),
        "bias": rng.normal(size=8).astype(np.float32),
        "x_scale": np.array(1 / 128, np.float32), "x_zp": np.array(128, np.uint8),
        "y_scale": np.array(0.05, np.float32), "y_zp": np.array(128, np.uint8),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_u8"]),
        helper.make_node("DequantizeLinear", ["x_u8", "x_scale", "x_zp"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=0),
        helper.make_node(
            "Conv",
            ["x_f", "w_f", "bias"],
            ["conv"],
            kernel_shape=[kernel, kernel],
            strides=[2, 2],
            pads=[kernel // 2] * 4,
        ),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zp"], ["y_u8"]),
        helper.make_node("DequantizeLinear", ["y_u8", "y_scale", "y_zp"], ["y"]),
    ]
    return make_model(
        nodes, [value("x", [2, 3, height, width])], [value("y", [2, 8, (height + 1) // 2, (width + 1) // 2])], init
    )


@pytest.mark.parametrize("height, width", [(16, 24), (15, 21)])  # even and odd padded sizes
def test_stem_convolution_over_2x2_blocks_gives_identical_integer_outputs(height, width, tmp_path):
    model = _qdq_stem_model(height, width)
    rewritten, count = space_to_depth_stem(model)
    assert count == 1
    onnx.checker.check_model(rewritten)
    conv = next(node for node in rewritten.graph.node if node.op_type == "Conv")
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[4, 4]]
    ops = set(op_types(rewritten))
    # the 7x7 stem's pad of 3 is the block convolution's own padding (2 blocks before, 1 after); only an odd
    # input size needs an explicit zero-point row / column
    assert "SpaceToDepth" in ops and ("Pad" in ops) == (height % 2 == 1 or width % 2 == 1)
    assert [a.ints for a in conv.attribute if a.name == "pads"] == [[2, 2, 1, 1]]
    assert "w_q" not in {init.name for init in rewritten.graph.initializer}  # the 7x7 weight is gone
    assert "QLinearConv" in op_types(optimized(rewritten, tmp_path))
    feeds = {"x": np.random.default_rng(2).uniform(-1, 1, (2, 3, height, width)).astype(np.float32)}
    reference = run(model, feeds, level="extended")[0]
    assert reference.shape == (2, 8, (height + 1) // 2, (width + 1) // 2)
    np.testing.assert_array_equal(run(rewritten, feeds, level="extended")[0], reference)  # same int32 sums
    # as written (float convolutions), only the order of the float sums differs
    np.testing.assert_allclose(run(rewritten, feeds)[0], run(model, feeds)[0], atol=0.05 + 1e-6)


def test_space_to_depth_weight_matches_the_strided_convolution():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(2, 3, 7, 7)).astype(np.float32)
    x = rng.normal(size=(1, 3, 10, 12)).astype(np.float32)
    direct = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=2, padding=3)
    padded = torch.nn.functional.pad(torch.from_numpy(x), (3, 3, 3, 3))  # (1, 3, 16, 18)
    blocks = padded.reshape(1, 3, 8, 2, 9, 2).permute(0, 3, 5, 1, 2, 4).reshape(1, 12, 8, 9)  # DCR order
    rewritten = torch.nn.functional.conv2d(blocks, torch.from_numpy(space_to_depth_weight(weight)))
    torch.testing.assert_close(rewritten, direct, rtol=1e-5, atol=1e-5)


def test_stride_1_convolutions_are_not_rewritten():
    model = _qdq_stem_model(16, 24, kernel=3)
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    for attr in conv.attribute:
        if attr.name == "strides":
            attr.ints[:] = [1, 1]
    unchanged, count = space_to_depth_stem(model)
    assert count == 0 and unchanged.SerializeToString() == model.SerializeToString()
