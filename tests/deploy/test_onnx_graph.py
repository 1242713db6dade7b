"""The graph lookups and edits every compile pass shares (maptr/deploy/onnx_graph.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from ort_graphs import make_model, op_types, run, value

from maptr.deploy.onnx_graph import (
    GraphIndex,
    attribute,
    bypass,
    optional_input,
    prune_initializers,
    prune_value_info,
    rebuild_nodes,
)


def _chain() -> onnx.ModelProto:
    """x -> Neg (n) -> Relu (r) -> Mul(r, r) (y); c: a constant that is also a graph output; w: read by no one."""
    nodes = [
        helper.make_node("Neg", ["x"], ["n"], name="neg"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "r"], ["y"], name="mul"),
    ]
    model = make_model(
        nodes, [value("x", [3])], [value("y", [3]), value("c", [2])],
        {"c": np.ones(2, np.float32), "w": np.zeros(4, np.float32)},
    )  # fmt: skip
    model.graph.value_info.extend([value("n", [3]), value("r", [3])])
    return model


def test_index_finds_writers_readers_and_constants():
    model = _chain()
    index = GraphIndex(model.graph)
    assert index.producers["r"].name == "relu" and "x" not in index.producers
    assert [node.name for node in index.readers["r"]] == ["mul", "mul"]  # read twice: listed twice
    assert index.outputs == {"y", "c"}
    np.testing.assert_array_equal(index.constant("c"), np.ones(2, np.float32))
    assert index.constant("n") is None and index.constant("") is None
    relu = index.producers["r"]
    assert optional_input(relu, 0) == "n" and optional_input(relu, 2) == ""
    assert attribute(relu, "alpha", 0.5) == 0.5


def test_bypass_removes_nodes_rewires_their_readers_and_their_shape_records():
    model = _chain()
    before = model.SerializeToString()
    out = bypass(model, removed={"r"}, rewire={"r": "n"})
    assert model.SerializeToString() == before  # a copy
    assert op_types(out) == ["Neg", "Mul"] and list(out.graph.node[1].input) == ["n", "n"]
    assert [info.name for info in out.graph.value_info] == ["n"]
    x = {"x": np.array([-1.0, 2.0, -3.0], np.float32)}
    np.testing.assert_array_equal(run(out, x)[0], np.square(-x["x"]))


def test_rebuild_replaces_in_place_and_removes_with_an_empty_list():
    model = _chain()
    abs_node = helper.make_node("Abs", ["n"], ["r"], name="abs")
    rebuild_nodes(model.graph, {"r": [abs_node], "n": [helper.make_node("Identity", ["x"], ["n"])]})
    assert op_types(model) == ["Identity", "Abs", "Mul"]
    rebuild_nodes(model.graph, {"y": []})
    assert op_types(model) == ["Identity", "Abs"]


def test_prune_keeps_what_a_node_reads_or_the_graph_outputs():
    model = _chain()
    rebuild_nodes(model.graph, {"r": []})  # "r" is now written by no one
    prune_initializers(model.graph)
    prune_value_info(model.graph)
    assert [init.name for init in model.graph.initializer] == ["c"]  # "w" was read by no one
    assert [info.name for info in model.graph.value_info] == ["n"]
