"""Lookups every ONNX graph rewrite of the compile stage needs: who writes a tensor, who reads it."""

from __future__ import annotations

import onnx


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (graph inputs and initializers have none)."""
    return {name: node for node in graph.node for name in node.output}


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order (a node reading it twice is listed twice)."""
    read: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            read.setdefault(name, []).append(node)
    return read
