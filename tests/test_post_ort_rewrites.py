"""Rewrites of ORT's optimized graph: skip layer norms split (maptr/deploy/skip_layer_norm.py), reshape
chains collapsed (maptr/deploy/reshape_chains.py), short-run broadcasts expanded (maptr/deploy/small_broadcasts.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy.reshape_chains import collapse_reshape_chains
from maptr.deploy.skip_layer_norm import split_skip_layer_norms
from maptr.deploy.small_broadcasts import expand_short_run_broadcasts

_SHAPE = [1, 7, 8]


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, saved: str = "") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if saved:
        options.optimized_model_filepath = saved
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _residual_norm_model() -> onnx.ModelProto:
    """x (1, 7, 8) -> MatMul -> Add(x) -> LayerNormalization: the post-norm residual ORT fuses."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["x", "h"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, _SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, _SHAPE)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_skip_layer_norm_is_split_and_not_fused_again_at_load(tmp_path):
    x = np.random.default_rng(1).normal(size=_SHAPE).astype(np.float32)
    _session(_residual_norm_model(), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, str(tmp_path / "ext.onnx"))
    fused = onnx.load(str(tmp_path / "ext.onnx"))
    assert "SkipLayerNormalization" in [node.op_type for node in fused.graph.node]
    split, count = split_skip_layer_norms(fused)
    assert count == 1
    op_types = [node.op_type for node in split.graph.node]
    assert "SkipLayerNormalization" not in op_types and {"Sum", "LayerNormalization"} <= set(op_types)
    onnx.checker.check_model(split)
    # Loaded at ORT's `all` level (as every deployed session is), the split stays split ...
    loaded = _session(split, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, str(tmp_path / "all.onnx"))
    assert "SkipLayerNormalization" not in [node.op_type for node in onnx.load(str(tmp_path / "all.onnx")).graph.node]
    # ... and computes what the fused node did, up to float rounding.
    expected = _session(fused, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    np.testing.assert_allclose(loaded.run(None, {"x": x})[0], expected, rtol=0, atol=1e-5)


def _skip_norm_node_model(outputs: list[str], with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {
        "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "beta": rng.normal(size=8).astype(np.float32),
        "bias": rng.normal(size=8).astype(np.float32),
    }
    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    node = helper.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft", epsilon=1e-5)
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs if name]
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, _SHAPE) for name in ("x", "skip")],
        graph_outputs, [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_split_keeps_the_bias_and_the_sum_output_and_matches_the_formula():
    rng = np.random.default_rng(3)
    feeds = {name: rng.normal(size=_SHAPE).astype(np.float32) for name in ("x", "skip")}
    model = _skip_norm_node_model(["y", "", "", "total"], with_bias=True)
    split, count = split_skip_layer_norms(model)
    assert count == 1
    assert [(n.op_type, len(n.input)) for n in split.graph.node] == [("Sum", 3), ("LayerNormalization", 3)]
    y, total = _session(split, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["y", "total"], feeds)
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    expected_total = feeds["x"] + feeds["skip"] + inits["bias"]
    mean = expected_total.mean(-1, keepdims=True)
    std = np.sqrt(expected_total.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(total, expected_total, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, (expected_total - mean) / std * inits["gamma"] + inits["beta"], rtol=0, atol=1e-5)


def test_split_leaves_a_node_whose_statistics_are_read_and_needs_opset_17():
    model = _skip_norm_node_model(["y", "mean"], with_bias=False)
    untouched, count = split_skip_layer_norms(model)
    assert count == 0 and [n.op_type for n in untouched.graph.node] == ["SkipLayerNormalization"]
    old = _skip_norm_node_model(["y"], with_bias=False)
    del old.opset_import[:]
    old.opset_import.extend([helper.make_opsetid("", 16), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ValueError, match="opset >= 17"):
        split_skip_layer_norms(old)


def _reshape_chain_model() -> onnx.ModelProto:
    """x (2, 3, 4) -> Reshape(6, 4) -> Unsqueeze(0) -> Reshape(4, 6) -> y; the first Reshape is also read by
    a Relu (z), and a Reshape with a 0 entry (copy a dimension) reads the Unsqueeze (w)."""
    inits = [
        numpy_helper.from_array(np.array([6, 4], np.int64), "rows"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([4, 6], np.int64), "cols"),
        numpy_helper.from_array(np.array([0, 24], np.int64), "copy_first"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["a"], name="r1"),
        helper.make_node("Relu", ["a"], ["z"], name="relu"),
        helper.make_node("Unsqueeze", ["a", "axis0"], ["b"], name="u"),
        helper.make_node("Reshape", ["b", "cols"], ["y"], name="r2"),
        helper.make_node("Reshape", ["b", "copy_first"], ["w"], name="r3"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z", "w")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_reshape_chain_collapses_into_its_last_reshape_bit_identically():
    model = _reshape_chain_model()
    collapsed, removed = collapse_reshape_chains(model)
    nodes = {node.name: node for node in collapsed.graph.node}
    assert nodes["r2"].input[0] == "x"  # reads past the Unsqueeze and the first Reshape
    assert nodes["r3"].input[0] == "b"  # a 0 entry copies a dimension of its input: left alone
    assert removed == 0 and "r1" in nodes and "u" in nodes  # still read by the Relu and by r3
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    before = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})
    after = _session(collapsed, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})
    for expected, got in zip(before, after, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_reshape_nodes_nothing_reads_after_the_collapse_are_removed():
    model = _reshape_chain_model()
    graph = model.graph
    keep = [node for node in graph.node if node.name not in ("relu", "r3")]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.output[1:]
    collapsed, removed = collapse_reshape_chains(model)
    assert removed == 2 and [(n.name, list(n.input)) for n in collapsed.graph.node] == [("r2", ["x", "cols"])]
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = _session(collapsed, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, x.reshape(4, 6))


def _broadcast_model(small_shape: list, full_shape: list, op: str, small_constant: bool) -> onnx.ModelProto:
    """y = op(full, small): the small input broadcast to the full one (a graph input or a constant)."""
    inputs = [helper.make_tensor_value_info("full", TensorProto.FLOAT, full_shape)]
    inits = []
    if small_constant:
        value = np.random.default_rng(4).uniform(1, 2, small_shape).astype(np.float32)  # static when constant
        inits.append(numpy_helper.from_array(value, "small"))
    else:
        inputs.append(helper.make_tensor_value_info("small", TensorProto.FLOAT, small_shape))
    node = helper.make_node(op, ["full", "small"], ["y"], name="op")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(
    ("small_shape", "full_shape", "op", "constant", "expected"),
    [
        (["pairs", 1, 1, 4, 2], ["pairs", 4, 2, 4, 2], "Add", False, "Expand"),  # SCA reference + offsets, runs of 8
        ([1, 1, 1, 1, 2], [1, 500, 4, 4, 2], "Div", True, "initializer"),  # offset normalizer: stored expanded
        ([1, 500, 1], [1, 500, 64], "Div", False, None),  # runs of 64: ORT's broadcast is fast enough
        ([4, 1, 300, 8], [4, 16, 300, 8], "Mul", False, None),  # one long run per channel: left alone
        ([], [1, 500, 4, 2], "Mul", True, None),  # a scalar
        ([1, 1, 2], [1, 20, 2], "Sub", False, None),  # 40 elements: not worth a node
    ],
)
def test_short_run_broadcasts_are_expanded_bit_identically(small_shape, full_shape, op, constant, expected):
    model = _broadcast_model(small_shape, full_shape, op, constant)
    rewritten, count = expand_short_run_broadcasts(model)
    op_types = [node.op_type for node in rewritten.graph.node]
    names = {init.name for init in rewritten.graph.initializer}
    assert count == (expected is not None)
    assert ("Expand" in op_types) == (expected == "Expand")
    assert any(name.startswith("small_expanded") for name in names) == (expected == "initializer")
    rng = np.random.default_rng(5)
    feeds = {"full": rng.normal(size=[7 if isinstance(d, str) else d for d in full_shape]).astype(np.float32)}
    if not constant:
        static_small = [7 if isinstance(d, str) else d for d in small_shape]
        feeds["small"] = rng.uniform(1, 2, static_small).astype(np.float32)
    before = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)[0]
    after = _session(rewritten, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, feeds)[0]
    np.testing.assert_array_equal(after, before)
