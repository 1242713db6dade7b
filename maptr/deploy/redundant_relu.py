"""ReLUs that the quantization right after them already performs, removed from a Q/DQ graph.

A ``Relu`` whose only reader is a ``QuantizeLinear`` with every zero point at the bottom of its integer
range (uint8 zero point 0, int8 -128) changes nothing: a negative input rounds to a value below the
zero point and saturates to it, exactly the zero a ReLU would have given. The quantizer produces this
pattern wherever a linear is followed by a ReLU (the FFNs' first linear, the regression branches): the
ReLU output's range starts at 0, so its uint8 grid has zero point 0.

ONNX Runtime removes such a ReLU itself, but only after it has fused ``MatMul + Add`` into a ``Gemm``
with ``Reshape`` nodes around it, and a ``Reshape`` between the ``Gemm`` and its ``QuantizeLinear``
keeps the Gemm in float (no integer bias, no ``QGemm``). Removed before ORT's optimizer runs, the same
linears become ``QGemm`` kernels (nano: 11 -> 16 QGemm, 17 -> 13 float Gemm).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from maptr.deploy.graph_index import readers as graph_readers

_LOWEST = {np.dtype(np.uint8): 0, np.dtype(np.int8): -128, np.dtype(np.uint16): 0, np.dtype(np.int16): -32768}


def _zero_point_at_lowest(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """True when ``node`` (a QuantizeLinear) has constant zero points, all at the lowest integer value."""
    if len(node.input) < 3 or node.input[2] not in initializers:
        return False  # no zero point means uint8 0 in ONNX, but the output type is then implicit: leave it
    zero_point = numpy_helper.to_array(initializers[node.input[2]])
    lowest = _LOWEST.get(zero_point.dtype)
    return lowest is not None and bool(np.all(zero_point == lowest))


def drop_relus_before_quantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` without the ReLUs its QuantizeLinear nodes make redundant (see the module doc).

    Args:
        model: an ONNX model whose nodes are in topological order.
    Returns:
        the new model (same inputs, outputs and values) and the number of ReLUs removed.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = graph_readers(graph)
    graph_outputs = {out.name for out in graph.output}

    redundant: dict[str, str] = {}  # ReLU output -> ReLU input, for each ReLU removed
    for node in graph.node:
        if node.op_type != "Relu" or node.output[0] in graph_outputs:
            continue
        consumers = readers.get(node.output[0], [])
        if len(consumers) == 1 and consumers[0].op_type == "QuantizeLinear" and consumers[0].input[0] == node.output[0]:
            if _zero_point_at_lowest(consumers[0], initializers):
                redundant[node.output[0]] = node.input[0]

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [node for node in out.graph.node if not (node.op_type == "Relu" and node.output[0] in redundant)]
    for node in kept:
        for index, name in enumerate(node.input):
            if name in redundant:
                node.input[index] = redundant[name]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    value_info = [info for info in out.graph.value_info if info.name not in redundant]
    del out.graph.value_info[:]
    out.graph.value_info.extend(value_info)
    return out, len(redundant)
