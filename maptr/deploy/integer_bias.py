"""Integer biases for the quantized linears whose output stays float, so ONNX Runtime runs them as QGemm.

A quantized linear reaches ORT as ``DQ(x uint8) -> MatMul(DQ(W int8)) -> Add(float bias)``. ORT turns
it into an integer ``QGemm`` only when every input of the fused ``Gemm`` is dequantized, bias included,
and ORT's own bias quantization (``WeightBiasQuantization``) runs only where the linear's output goes
to a ``QuantizeLinear``. A linear whose output is read by a float operator (the deformable attention's
sampling offsets, attention-weight logits and value projection, whose readers are a division, a softmax
and a grid sampling; the spatial cross-attention's output projection, read by a scatter-add) therefore
ran as a float ``Gemm`` on dequantized inputs: on nano, 10 of the 26 uint8 linears.

:func:`quantize_float_output_biases` writes the bias those linears are missing: ``round(b / (s_x * s_w))``
in int32 with scale ``s_x * s_w`` (per output channel), the grid of the int32 accumulator, computed in
float32 as ORT computes it for the other linears. ORT then fuses the group into a ``QGemm`` with a float
output: the same uint8 x int8 -> int32 product as the fake-quant model, plus a bias rounded by at most
``s_x * s_w / 2`` (on nano ~1e-4 of an output whose own input grid step is ~100x larger).

Linears with int16 inputs are left alone: ORT has no integer kernel for them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptr.deploy.onnx_graph import GraphIndex, GraphPass, attribute, copy_and_index, optional_input, rebuild_nodes

_INT32_MAX = np.float32(2**31 - 1)


def _weight_dequantize(node: onnx.NodeProto | None, index: GraphIndex) -> tuple[onnx.NodeProto, bool] | None:
    """The weight's DQ feeding a MatMul's or Gemm's second input, and whether a Transpose sits between them."""
    transposed = node is not None and node.op_type == "Transpose"
    if transposed:
        node = index.producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    return node, transposed


def _bias_scale(matmul: onnx.NodeProto, index: GraphIndex, channels: int) -> np.ndarray | None:
    """``s_x * s_w`` per output channel (float32, length ``channels``) of a uint8 x int8 MatMul or Gemm."""
    x_dq = index.producers.get(matmul.input[0])
    weight = _weight_dequantize(index.producers.get(matmul.input[1]), index)
    if x_dq is None or x_dq.op_type != "DequantizeLinear" or weight is None:
        return None
    w_dq, transposed = weight
    if matmul.op_type == "Gemm":
        if attribute(matmul, "alpha", 1.0) != 1.0 or attribute(matmul, "beta", 1.0) != 1.0:
            return None
        if attribute(matmul, "transA", 0):
            return None
        transposed = transposed != bool(attribute(matmul, "transB", 0))
    x_scale, w_scale = index.constant(x_dq.input[1]), index.constant(w_dq.input[1])
    x_int, w_int = index.constant(x_dq.input[0]), index.constant(w_dq.input[0])
    x_zero = index.constant(optional_input(x_dq, 2))
    if x_scale is None or w_scale is None or w_int is None or x_int is not None or x_zero is None:
        return None  # run-time weight, or an activation that is not a run-time tensor
    if x_zero.dtype != np.uint8 or w_int.dtype != np.int8 or x_scale.size != 1 or w_int.ndim != 2:
        return None  # int16 activations: no integer kernel in ORT
    # The output channels are axis 0 of the (C_out, C_in) weight the exporter transposes, else axis 1.
    channel_axis = 0 if transposed else 1
    if w_scale.size != 1:
        axis = attribute(w_dq, "axis", 1)
        if axis % 2 != channel_axis or w_scale.size != channels:
            return None
    if w_int.shape[channel_axis] != channels:
        return None
    return np.broadcast_to(
        x_scale.reshape(()).astype(np.float32) * w_scale.astype(np.float32).reshape(-1), (channels,)
    ).copy()


def _bias_input(node: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, int] | None:
    """(the linear's MatMul or Gemm, index of ``node``'s input holding the 1-D float bias), or None.

    A linear is exported as ``MatMul`` + ``Add(bias)`` (3-D inputs) or as one ``Gemm`` (2-D inputs).
    """
    if node.op_type == "Gemm" and len(node.input) == 3:
        slots = [(node, 2)]
    elif node.op_type == "Add":
        slots = [(index.producers.get(node.input[0]), 1), (index.producers.get(node.input[1]), 0)]
        slots = [(linear, slot) for linear, slot in slots if linear is not None and linear.op_type == "MatMul"]
    else:
        return None
    for linear, slot in slots:
        bias = index.constant(node.input[slot])
        if bias is not None and bias.ndim == 1 and bias.dtype == np.float32:
            return linear, slot
    return None


def quantize_float_output_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` where each uint8 linear's float bias is an int32 DQ (see the module doc).

    Only ``MatMul + Add`` pairs and ``Gemm`` nodes (alpha = beta = 1, A not transposed) with a 1-D
    constant bias, a uint8 per-tensor activation DQ and an int8 weight DQ (per tensor or per output
    channel) are changed, and only where the rounded bias fits int32.

    Returns:
        the new model and the number of biases quantized.
    """
    out, index = copy_and_index(model)
    new_initializers: list[onnx.TensorProto] = []
    with_bias: dict[str, list[onnx.NodeProto]] = {}  # Add / Gemm output -> [its bias DQ, the Add / Gemm]
    for node in out.graph.node:
        target = _bias_input(node, index)
        if target is None:
            continue
        linear, slot = target
        bias = index.constant(node.input[slot])
        scale = _bias_scale(linear, index, bias.shape[0])
        if scale is None or not np.all(scale > 0):
            continue
        steps = np.round(bias.astype(np.float32) / scale)
        if np.abs(steps).max(initial=0) >= _INT32_MAX:
            continue
        base = f"{node.name or node.output[0]}_int32_bias"
        new_initializers += [
            numpy_helper.from_array(steps.astype(np.int32), f"{base}_quantized"),
            numpy_helper.from_array(scale, f"{base}_scale"),
        ]
        bias_dq = helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", f"{base}_scale"], [base], name=base, axis=0
        )
        node.input[slot] = base
        with_bias[node.output[0]] = [bias_dq, node]
    rebuild_nodes(out.graph, with_bias)
    out.graph.initializer.extend(new_initializers)
    return out, len(with_bias)


PASS = GraphPass(quantize_float_output_biases, counts="uint8 linears given an int32 bias", measured_on_ort="1.32.0")
