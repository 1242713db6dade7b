"""Pass 10, ``collapse_reshape_chains`` (maptr/deploy/reshape_chains.py): a chain of shape-only nodes ending
in a Reshape collapses into that Reshape, bit-identically; nodes nothing reads any more are removed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from ort_graphs import make_model, run, value

from maptr.deploy.reshape_chains import collapse_reshape_chains


def _reshape_chain_model() -> onnx.ModelProto:
    """x (2, 3, 4) -> Reshape(6, 4) -> Unsqueeze(0) -> Reshape(4, 6) -> y; the first Reshape is also read by
    a Relu (z), and a Reshape with a 0 entry (copy a dimension) reads the Unsqueeze (w)."""
    inits = {
        "rows": np.array([6, 4], np.int64), "axis0": np.array([0], np.int64),
        "cols": np.array([4, 6], np.int64), "copy_first": np.array([0, 24], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["a"], name="r1"),
        helper.make_node("Relu", ["a"], ["z"], name="relu"),
        helper.make_node("Unsqueeze", ["a", "axis0"], ["b"], name="u"),
        helper.make_node("Reshape", ["b", "cols"], ["y"], name="r2"),
        helper.make_node("Reshape", ["b", "copy_first"], ["w"], name="r3"),
    ]
    outputs = [value("y", [4, 6]), value("z", [6, 4]), value("w", [1, 24])]
    return make_model(nodes, [value("x", [2, 3, 4])], outputs, inits)


def test_reshape_chain_collapses_into_its_last_reshape_bit_identically():
    model = _reshape_chain_model()
    collapsed, removed = collapse_reshape_chains(model)
    nodes = {node.name: node for node in collapsed.graph.node}
    assert nodes["r2"].input[0] == "x"  # reads past the Unsqueeze and the first Reshape
    assert nodes["r3"].input[0] == "b"  # a 0 entry copies a dimension of its input: left alone
    assert removed == 0 and "r1" in nodes and "u" in nodes  # still read by the Relu and by r3
    x = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10}
    for expected, got in zip(run(model, x), run(collapsed, x), strict=True):
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
    np.testing.assert_array_equal(run(collapsed, {"x": x})[0], x.reshape(4, 6))
