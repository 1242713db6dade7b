"""The stride-2 integer convolution on few input channels (ResNet's stem), rewritten as space-to-depth.

ONNX Runtime's fast integer convolution on x86 (MLAS's symmetric ``ConvSym`` kernels, indirect
convolution on channels-last uint8) needs a multiple of 4 input channels. The stem convolution reads the
3 colour channels, so it falls back to the generic im2col path: 49 taps of 3 bytes per output, and on
nano the 7x7/2 stem took 1.8-2.1 ms of the deployed model at 2 threads, about as long as the float
convolution (``benchmarks/bench_stem_conv.py``), where the 3x3 convolutions on 64 channels run ~3x
faster than float.

The rewrite is exact. With the input cut into 2x2 blocks (``SpaceToDepth``, 4C channels in DCR order),
a k x k stride-2 convolution is a stride-1 convolution over the blocks: output y reads input rows
2y - top + ky, and with an even top pad (an odd one gets a leading zero row in the kernel, ky + 1)
ky = 2a + b makes a the block offset and b the row inside the block. The weight is zero-padded to an
even size and rearranged accordingly, and the convolution's own padding, in blocks, stands for the
original one (QLinearConv pads with the input zero point, i.e. real 0; the 7x7 stem's pad 3 becomes
2 blocks before and 1 after). Every integer product and the int32 sum stay the same, so ORT's
QLinearConv gives bit-identical outputs, and 12 channels take the ``ConvSym`` path. The float ONNX
model keeps its direct convolution: for float, space-to-depth is slower (3.0 vs 2.2 ms).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptr.deploy.onnx_graph import (
    GraphPass,
    attribute,
    copy_and_index,
    prune_initializers,
    rebuild_nodes,
    tensor_shapes,
)

_SYM_CHANNEL_ALIGNMENT = 4  # MLAS ConvSym's KernelInputChannelAlignment on x86


def space_to_depth_weight(weight: np.ndarray) -> np.ndarray:
    """(O, C, kh, kw) stride-2 kernel -> (O, 4C, ceil(kh/2), ceil(kw/2)) stride-1 kernel over 2x2 blocks."""
    out_channels, channels, kh, kw = weight.shape
    bh, bw = -(-kh // 2), -(-kw // 2)
    padded = np.zeros((out_channels, channels, 2 * bh, 2 * bw), weight.dtype)
    padded[:, :, :kh, :kw] = weight
    # (O, C, a, by, b, bx) -> (O, by, bx, C, a, b): SpaceToDepth's DCR channel order is (by * 2 + bx) * C + c
    blocks = padded.reshape(out_channels, channels, bh, 2, bw, 2).transpose(0, 3, 5, 1, 2, 4)
    return np.ascontiguousarray(blocks.reshape(out_channels, 4 * channels, bh, bw))


def space_to_depth_stem(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each eligible quantized stride-2 convolution rewritten (see the module doc).

    Eligible: ``DQ(x uint8, per tensor) -> Conv(DQ(W int8 constant))`` with group 1, stride 2, dilation
    1, fewer than a multiple of 4 input channels, and a static input shape for which the block
    convolution gives the same output size.

    Returns:
        the new model and the number of convolutions rewritten.
    """
    out, index = copy_and_index(model)
    graph = out.graph
    shapes = tensor_shapes(out)

    replaced: dict[str, list[onnx.NodeProto]] = {}  # a Conv's output -> the nodes replacing it; [] drops a DQ
    new_initializers: list[onnx.TensorProto] = []
    convs = 0
    for conv in graph.node:
        if conv.op_type != "Conv":
            continue
        x_dq, w_dq = index.producers.get(conv.input[0]), index.producers.get(conv.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if len(index.readers[x_dq.output[0]]) != 1 or len(x_dq.input) < 3 or x_dq.input[0] in index.initializers:
            continue
        weight, zero_point = index.constant(w_dq.input[0]), index.constant(x_dq.input[2])
        if weight is None or zero_point is None:
            continue
        shape = shapes.get(conv.input[0])
        if weight.dtype != np.int8 or weight.ndim != 4 or zero_point.dtype != np.uint8 or zero_point.size != 1:
            continue
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
            continue  # the block convolution's padding needs the input's size
        if weight.shape[1] % _SYM_CHANNEL_ALIGNMENT == 0:
            continue
        if (
            attribute(conv, "group", 1) != 1
            or list(attribute(conv, "strides", [1, 1])) != [2, 2]
            or list(attribute(conv, "dilations", [1, 1])) != [1, 1]
            or attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            continue
        top, left, bottom, right = attribute(conv, "pads", [0, 0, 0, 0])
        kh, kw = weight.shape[2:]
        out_h, out_w = (shape[2] + top + bottom - kh) // 2 + 1, (shape[3] + left + right - kw) // 2 + 1
        # An odd top / left pad puts the padded grid's 2x2 blocks on odd input rows / columns: one
        # leading zero row / column of the kernel moves them onto the input's own blocks.
        shift_h, shift_w = top % 2, left % 2
        shifted = np.zeros((*weight.shape[:2], kh + shift_h, kw + shift_w), weight.dtype)
        shifted[:, :, shift_h:, shift_w:] = weight
        block_weight = space_to_depth_weight(shifted)
        bh, bw = block_weight.shape[2:]
        extra_h, extra_w = shape[2] % 2, shape[3] % 2  # an odd input size gets one zero-point row / column
        rows, cols = (shape[2] + extra_h) // 2, (shape[3] + extra_w) // 2
        # The convolution's padding in blocks; the bottom / right pads give the original output size.
        block_pads = [(top + shift_h) // 2, (left + shift_w) // 2]
        block_pads += [out_h - 1 + bh - rows - block_pads[0], out_w - 1 + bw - cols - block_pads[1]]
        if min(block_pads) < 0:
            continue
        base = f"{conv.name or conv.output[0]}_space_to_depth"
        new_initializers.append(numpy_helper.from_array(block_weight, f"{base}_weight"))
        weight_inputs = [f"{base}_weight", *w_dq.input[1:]]
        conv_attributes = {"kernel_shape": [bh, bw], "strides": [1, 1], "pads": block_pads, "group": 1}
        replaced[x_dq.output[0]] = []  # the Conv read it alone
        if len(index.readers[w_dq.output[0]]) == 1:
            replaced[w_dq.output[0]] = []
        blocks_input = x_dq.input[0]
        block_conv: list[onnx.NodeProto] = []
        if extra_h or extra_w:
            pads = np.array([0, 0, 0, 0, 0, 0, extra_h, extra_w], np.int64)
            new_initializers.append(numpy_helper.from_array(pads, f"{base}_pads"))
            # Padding the uint8 tensor with its zero point is padding the real tensor with 0.
            pad_inputs = [blocks_input, f"{base}_pads", x_dq.input[2]]
            pad = helper.make_node("Pad", pad_inputs, [f"{base}_padded"], mode="constant", name=f"{base}_pad")
            block_conv.append(pad)
            blocks_input = f"{base}_padded"
        replaced[conv.output[0]] = block_conv + [
            helper.make_node("SpaceToDepth", [blocks_input], [f"{base}_blocks"], blocksize=2),
            helper.make_node(
                "DequantizeLinear", [f"{base}_blocks", *x_dq.input[1:]], [f"{base}_x"], name=f"{base}_x_dq"
            ),
            helper.make_node(
                "DequantizeLinear", weight_inputs, [f"{base}_w"], name=f"{base}_w_dq", axis=attribute(w_dq, "axis", 1)
            ),
            helper.make_node(
                "Conv", [f"{base}_x", f"{base}_w", *conv.input[2:]], list(conv.output), name=base, **conv_attributes
            ),  # fmt: skip
        ]
        convs += 1
    if not convs:
        return out, 0  # as it was, initializers included
    rebuild_nodes(graph, replaced)
    graph.initializer.extend(new_initializers)
    prune_initializers(graph)  # the old weight, if nothing else reads it
    return out, convs


PASS = GraphPass(space_to_depth_stem, counts="stride-2 integer convolutions rewritten over 2x2 blocks",
                 measured_on_ort="1.32.0")  # fmt: skip
