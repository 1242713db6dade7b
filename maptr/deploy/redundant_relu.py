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

from maptr.deploy.onnx_graph import GraphIndex, GraphPass, bypass, optional_input

_LOWEST = {np.dtype(np.uint8): 0, np.dtype(np.int8): -128, np.dtype(np.uint16): 0, np.dtype(np.int16): -32768}


def _zero_point_at_lowest(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """True when ``node`` (a QuantizeLinear) has constant zero points, all at the lowest integer value."""
    zero_point = index.constant(optional_input(node, 2))
    if zero_point is None:
        return False  # no zero point means uint8 0 in ONNX, but the output type is then implicit: leave it
    lowest = _LOWEST.get(zero_point.dtype)
    return lowest is not None and bool(np.all(zero_point == lowest))


def drop_relus_before_quantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` without the ReLUs its QuantizeLinear nodes make redundant (see the module doc).

    Args:
        model: an ONNX model whose nodes are in topological order.
    Returns:
        the new model (same inputs, outputs and values) and the number of ReLUs removed.
    """
    index = GraphIndex(model.graph)
    redundant: dict[str, str] = {}  # ReLU output -> ReLU input, for each ReLU removed
    for node in model.graph.node:
        if node.op_type != "Relu" or node.output[0] in index.outputs:
            continue
        consumers = index.readers.get(node.output[0], [])
        if len(consumers) == 1 and consumers[0].op_type == "QuantizeLinear" and consumers[0].input[0] == node.output[0]:
            if _zero_point_at_lowest(consumers[0], index):
                redundant[node.output[0]] = node.input[0]

    # The quantization after each removed ReLU reads the ReLU's input instead.
    return bypass(model, removed=set(redundant), rewire=redundant), len(redundant)


PASS = GraphPass(drop_relus_before_quantize, counts="ReLUs removed", measured_on_ort="1.32.0")
