"""16-bit QuantizeLinear -> DequantizeLinear pairs removed from a Q/DQ graph before ORT's optimizer.

The quantizer gives the inputs of the most sensitive operators 16-bit grids (the guide's int16 top-k).
ONNX Runtime's CPU provider has no 16-bit compute kernel: every such operator runs as a float kernel
between the pair, which then only rounds a float tensor to a 65536-level grid, at two memory passes per
frame (nano: 5 pairs). Removed, the operator reads the float tensor itself, finer than the QAT model's
16-bit grid by at most half a step (scale / 2, where the scale is range / 65535). A pair whose output
also feeds a node that is not a ``DequantizeLinear`` stays.

With the pair gone, ORT no longer sees a dequantized input in front of these linears, so its
``WeightBiasQuantization`` does not re-quantize their weights at load time either, and the weight
``DequantizeLinear`` nodes of those linears can be folded after ORT's optimizer like any other
(:func:`~maptr.deploy.leftover_dequantize.fold_leftover_dequantize`).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from maptr.deploy.onnx_graph import GraphIndex, GraphPass, bypass, optional_input

_SIXTEEN_BIT = {TensorProto.INT16, TensorProto.UINT16}


def _is_sixteen_bit(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """True for a QuantizeLinear whose zero point (which sets its output type) is a 16-bit constant."""
    zero_point = index.initializers.get(optional_input(node, 2))
    return zero_point is not None and zero_point.data_type in _SIXTEEN_BIT


def drop_int16_rounding(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` without its 16-bit Q -> DQ pairs (see the module doc).

    Returns:
        the new model and the number of QuantizeLinear nodes removed (each with its DequantizeLinears).
    """
    index = GraphIndex(model.graph)
    replacement: dict[str, str] = {}  # a removed DQ's output -> the float tensor its Q read
    removed: set[str] = set()  # outputs of the removed Q and DQ nodes
    pairs = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not _is_sixteen_bit(node, index):
            continue
        quantized = node.output[0]
        consumers = index.readers.get(quantized, [])
        if quantized in index.outputs or not consumers or any(c.op_type != "DequantizeLinear" for c in consumers):
            continue
        if any(c.input[0] != quantized or c.output[0] in index.outputs for c in consumers):
            continue
        for dequantize in consumers:
            replacement[dequantize.output[0]] = node.input[0]
            removed.add(dequantize.output[0])
        removed.add(quantized)
        pairs += 1
    return bypass(model, removed, rewire=replacement), pairs


PASS = GraphPass(drop_int16_rounding, counts="16-bit QuantizeLinear nodes removed, each with its DQs",
                 measured_on_ort="1.32.0")  # fmt: skip
