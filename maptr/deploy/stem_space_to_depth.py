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

from maptr.deploy.graph_index import producers as graph_producers

_SYM_CHANNEL_ALIGNMENT = 4  # MLAS ConvSym's KernelInputChannelAlignment on x86


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _static_shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    for info in [*model.graph.value_info, *model.graph.input]:
        if info.name == name:
            dims = info.type.tensor_type.shape.dim
            return [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None
    return None


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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = graph_producers(graph)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()  # outputs of the DQ nodes the rewritten convolutions no longer read
    new_initializers: list[onnx.TensorProto] = []
    for index, conv in enumerate(graph.node):
        if conv.op_type != "Conv":
            continue
        x_dq, w_dq = producers.get(conv.input[0]), producers.get(conv.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if readers.get(x_dq.output[0], 0) != 1 or len(x_dq.input) < 3 or x_dq.input[0] in initializers:
            continue
        if w_dq.input[0] not in initializers or x_dq.input[2] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[w_dq.input[0]])
        zero_point = numpy_helper.to_array(initializers[x_dq.input[2]])
        shape = _static_shape(inferred, conv.input[0])
        if weight.dtype != np.int8 or weight.ndim != 4 or zero_point.dtype != np.uint8 or zero_point.size != 1:
            continue
        if shape is None or len(shape) != 4 or weight.shape[1] % _SYM_CHANNEL_ALIGNMENT == 0:
            continue
        if (
            _attribute(conv, "group", 1) != 1
            or list(_attribute(conv, "strides", [1, 1])) != [2, 2]
            or list(_attribute(conv, "dilations", [1, 1])) != [1, 1]
            or _attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            continue
        top, left, bottom, right = _attribute(conv, "pads", [0, 0, 0, 0])
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
        dropped.add(x_dq.output[0])
        if readers.get(w_dq.output[0], 0) == 1:
            dropped.add(w_dq.output[0])
        blocks_input = x_dq.input[0]
        replaced[index] = []
        if extra_h or extra_w:
            pads = np.array([0, 0, 0, 0, 0, 0, extra_h, extra_w], np.int64)
            new_initializers.append(numpy_helper.from_array(pads, f"{base}_pads"))
            # Padding the uint8 tensor with its zero point is padding the real tensor with 0.
            pad_inputs = [blocks_input, f"{base}_pads", x_dq.input[2]]
            pad = helper.make_node("Pad", pad_inputs, [f"{base}_padded"], mode="constant", name=f"{base}_pad")
            replaced[index].append(pad)
            blocks_input = f"{base}_padded"
        replaced[index] += [
            helper.make_node("SpaceToDepth", [blocks_input], [f"{base}_blocks"], blocksize=2),
            helper.make_node(
                "DequantizeLinear", [f"{base}_blocks", *x_dq.input[1:]], [f"{base}_x"], name=f"{base}_x_dq"
            ),
            helper.make_node(
                "DequantizeLinear", weight_inputs, [f"{base}_w"], name=f"{base}_w_dq", axis=_attribute(w_dq, "axis", 1)
            ),
            helper.make_node(
                "Conv", [f"{base}_x", f"{base}_w", *conv.input[2:]], list(conv.output), name=base, **conv_attributes
            ),  # fmt: skip
        ]
    if not replaced:
        return out, 0
    nodes = []
    for index, node in enumerate(graph.node):
        if node.output[0] not in dropped:
            nodes.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in read]  # the old weight, if nothing else reads it
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out, len(replaced)
