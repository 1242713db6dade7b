"""Feature maps flattened to tokens in channels-last order, so that ORT's NHWC convolutions need no
transpose back to NCHW before it.

The camera features leave the neck as an NCHW map and enter the BEV encoder as tokens:
``Reshape(N, C, H*W) -> Transpose(0, 2, 1)`` gives (N, H*W, C). When ONNX Runtime loads the deployed
file at level ``all`` it runs the convolution channels-last and puts ``Transpose(0, 3, 1, 2)`` (NHWC ->
NCHW) after it; its transpose optimizer cannot move that transpose through the ``Reshape``, so the map
is transposed twice per frame, back to NCHW and forward again to tokens.

The same tokens come from ``Transpose(0, 2, 3, 1) -> Reshape(N, H*W, C)``: element (n, c, h, w) of the
map lands at token ``h * W + w``, channel ``c``, in both. Written that way, the transpose ORT adds and
this one are inverses, and ORT removes both at load time (nano: 2 of the runtime graph's 27 transposes,
~50 us per frame at 2 threads). The values are the same bytes, moved in the same order.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptr.deploy.onnx_graph import GraphIndex, GraphPass, attribute, copy_model, rebuild_nodes

_CONVS = ("QLinearConv", "Conv")


def _token_shape(target: np.ndarray, channels: int) -> np.ndarray | None:
    """(N, C, S) -> (N, S, C) when ``target`` names C explicitly and has no 0 ("copy") entry."""
    if target.shape != (3,) or target[1] != channels or 0 in target:
        return None
    return np.array([target[0], target[2], target[1]], dtype=np.int64)


def flatten_conv_outputs_channels_last(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each ``conv -> Reshape(N, C, H*W) -> Transpose(0, 2, 1)`` written as
    ``conv -> Transpose(0, 2, 3, 1) -> Reshape(N, H*W, C)`` (see the module doc).

    Only 2-D convolutions with a constant weight whose output feeds nothing but that ``Reshape`` are
    rewritten, so that (N, C) of the reshape are the convolution's batch and output channels.

    Args:
        model: an ONNX model whose nodes are in topological order.
    Returns:
        the new model (same inputs, outputs and values) and the number of rewrites.
    """
    index = GraphIndex(model.graph)
    # keyed by output names (node names may be empty): a Reshape's -> the two nodes replacing it, the
    # Transpose's after it -> none (folded into them)
    replacements: dict[str, list[onnx.NodeProto]] = {}
    new_initializers = []
    for transpose in model.graph.node:
        if transpose.op_type != "Transpose" or attribute(transpose, "perm", None) != [0, 2, 1]:
            continue
        reshape = index.producers.get(transpose.input[0])
        if reshape is None or reshape.op_type != "Reshape" or len(index.readers[reshape.output[0]]) != 1:
            continue
        conv = index.producers.get(reshape.input[0])
        if conv is None or conv.op_type not in _CONVS or len(index.readers[conv.output[0]]) != 1:
            continue
        if {reshape.output[0], conv.output[0]} & index.outputs:  # read outside the graph: values must stay
            continue
        weight_name = conv.input[3] if conv.op_type == "QLinearConv" else conv.input[1]
        target = index.constant(reshape.input[1])
        if weight_name not in index.initializers or target is None:
            continue
        weight_shape = tuple(index.initializers[weight_name].dims)
        tokens = _token_shape(target, weight_shape[0]) if len(weight_shape) == 4 else None
        if tokens is None:
            continue
        shape_name = f"{transpose.output[0]}_token_shape"
        new_initializers.append(numpy_helper.from_array(tokens, shape_name))
        channels_last = f"{transpose.output[0]}_channels_last"
        replacements[reshape.output[0]] = [
            helper.make_node("Transpose", [conv.output[0]], [channels_last], name=channels_last, perm=[0, 2, 3, 1]),
            helper.make_node(
                "Reshape", [channels_last, shape_name], [transpose.output[0]], name=f"{channels_last}_tokens"
            ),
        ]
        replacements[transpose.output[0]] = []

    out = copy_model(model)
    rebuild_nodes(out.graph, replacements)
    out.graph.initializer.extend(new_initializers)
    return out, len(new_initializers)  # one token shape per rewrite


PASS = GraphPass(flatten_conv_outputs_channels_last, counts="convolution outputs flattened to tokens channels-last",
                 measured_on_ort="1.32.0")  # fmt: skip
