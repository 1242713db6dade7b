"""Chains of shape-only nodes ending in a ``Reshape`` collapsed into that one ``Reshape``.

A ``Reshape`` to a constant shape does not depend on the shape of its input, only on its element count
(with no 0 entry, which would copy a dimension of the input). So ``Reshape(Reshape(x, a), b)``,
``Reshape(Unsqueeze(x), b)`` and the like equal ``Reshape(x, b)``. ORT leaves such chains in the graph:
it wraps every fused linear in ``Reshape`` nodes (to 2-D rows and back), and the QGemm rewrite of
:mod:`~maptr.deploy.qgemm_kernels` adds its own around each channels-last 1x1 convolution, so one
transformer linear's output is often reshaped two or three times in a row (nano: 52 of 97 ``Reshape``
nodes read another shape-only node's output). Each node costs its own kernel launch per frame.

The collapsed ``Reshape`` reads the start of the chain; a bypassed node is removed once nothing reads it.
Values are untouched (a ``Reshape`` copies or aliases its input), so the outputs are bit-identical.
"""

from __future__ import annotations

import onnx

from maptr.deploy.onnx_graph import GraphIndex, GraphPass, copy_and_index, optional_input, prune_value_info, replace_all

# Nodes whose output holds the input's elements in the same order, only with another shape.
_SHAPE_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def _constant_shape_without_zeros(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """True for a ``Reshape`` whose target shape is an initializer with no 0 (copy-this-dimension) entry."""
    shape = index.constant(optional_input(node, 1))
    return shape is not None and bool((shape != 0).all())


def collapse_reshape_chains(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` in which every ``Reshape`` to a constant shape reads past the shape-only nodes
    before it (see the module doc), and the nodes nothing reads any more are removed.

    Args:
        model: an ONNX model whose nodes are in topological order.
    Returns:
        the new model and the number of nodes removed.
    """
    out, index = copy_and_index(model)
    graph = out.graph
    for node in graph.node:
        if node.op_type != "Reshape" or not _constant_shape_without_zeros(node, index):
            continue
        producer = index.producers.get(node.input[0])
        while producer is not None and producer.op_type in _SHAPE_ONLY and len(producer.output) == 1:
            node.input[0] = producer.input[0]  # same elements, same order: only the count matters
            producer = index.producers.get(node.input[0])

    removed = 0
    changed = True
    while changed:  # removing one node may leave its own producer unread
        read = {name for node in graph.node for name in node.input} | index.outputs
        keep = [
            node for node in graph.node
            if not (node.op_type in _SHAPE_ONLY and not any(name in read for name in node.output))
        ]  # fmt: skip
        changed = len(keep) < len(graph.node)
        removed += len(graph.node) - len(keep)
        replace_all(graph.node, keep)
    prune_value_info(graph)
    return out, removed


PASS = GraphPass(collapse_reshape_chains, counts="shape-only nodes removed", measured_on_ort="1.32.0")
