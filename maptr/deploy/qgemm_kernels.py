"""ORT's fused integer linears (``QGemm``) moved onto faster integer kernels, after ORT's optimizer.

ORT fuses every quantized linear into a ``com.microsoft`` ``QGemm`` (uint8 x int8 -> int32, then a
per-channel scale). When the linear has a bias, QGemm first broadcasts the int32 bias into its
accumulator and runs MLAS's integer GEMM in accumulate mode, and that mode does not gain from a second
thread: on nano's 1250 x 64 -> 64 linear (2 cores of an Intel Xeon with VNNI, ``benchmarks/bench_qgemm.py``)
QGemm takes ~100 us at 1 thread and ~94 us at 2 (without a bias: ~54 and ~33). Two other ORT CPU
kernels do the same arithmetic and add the bias after the GEMM, in their output stage:

- a uint8 output (the linear's output quantized again): a **1x1 ``QLinearConv`` on channels-last
  data** (``com.microsoft`` domain, ``channels_last = 1``), the rows of the linear as pixels. It
  requantizes ``(x - z_x) . W + b`` exactly as QGemm does, so outputs are bit-identical; 50 / 40 us on
  that linear, 1.7-2.7x faster than QGemm at 2 threads on nano's shapes;
- a float output (read by float operators): ``MatMulIntegerToFloat`` with the bias as float,
  ``b_float = b_int32 * s_x * s_w`` per channel: 83 / 52 us against QGemm's 90 / 87. The product is the
  same integer sum; the bias is added after the scale instead of before it, which moves an output by
  float rounding (~1e-7 relative) and, where a later QuantizeLinear rounds that value on a boundary,
  the code there by one step (measured by the compile stage, ``qgemm_rewrite_effect``).

:func:`move_qgemm_to_faster_kernels` rewrites ORT's saved ``extended``-level graph; the result still
loads at every ORT level (both ops are ORT CPU kernels, not hardware-specific layouts).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptr.deploy.onnx_graph import (
    GraphIndex,
    GraphPass,
    attribute,
    copy_and_index,
    optional_input,
    prune_initializers,
    rebuild_nodes,
)

_MS_DOMAIN = "com.microsoft"
# QGemm's inputs (com.microsoft contrib op schema).
_A, _A_SCALE, _A_ZERO, _B, _B_SCALE, _B_ZERO, _C, _Y_SCALE, _Y_ZERO = range(9)


def _weight_in_k_n(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    """QGemm's constant B as (K, N) int8 / uint8, or None when B is computed at run time."""
    weight = index.constant(node.input[_B])
    if weight is None or weight.ndim != 2:
        return None
    return np.ascontiguousarray(weight.T) if attribute(node, "transB", 0) else weight


def _per_channel(node: onnx.NodeProto, index: GraphIndex, slot: int) -> np.ndarray | None:
    """The constant value of QGemm's input ``slot`` (a scale, zero point or bias), None if not a constant."""
    return index.constant(optional_input(node, slot))


def _conv_nodes(
    node: onnx.NodeProto, weight: np.ndarray, base: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """uint8-output QGemm (A (M, K) -> Y (M, N)) as Reshape -> channels-last 1x1 QLinearConv -> Reshape."""
    k, n = weight.shape
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(weight.T).reshape(n, k, 1, 1), f"{base}_weight"),  # (N, K, 1, 1)
        numpy_helper.from_array(np.array([1, -1, 1, k], np.int64), f"{base}_rows_as_pixels"),  # (1, M, 1, K) NHWC
        numpy_helper.from_array(np.array([-1, n], np.int64), f"{base}_pixels_as_rows"),  # (M, N)
    ]
    conv_inputs = [
        f"{base}_pixels", node.input[_A_SCALE], node.input[_A_ZERO], f"{base}_weight", node.input[_B_SCALE],
        node.input[_B_ZERO], node.input[_Y_SCALE], node.input[_Y_ZERO],
    ]  # fmt: skip
    if optional_input(node, _C):
        conv_inputs.append(node.input[_C])  # int32 bias, added in the requantization stage
    nodes = [
        helper.make_node("Reshape", [node.input[_A], f"{base}_rows_as_pixels"], [f"{base}_pixels"],
                         name=f"{base}_to_nhwc"),
        helper.make_node(
            "QLinearConv", conv_inputs, [f"{base}_conv"], name=f"{base}_conv", domain=_MS_DOMAIN,
            channels_last=1, kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1,
        ),
        helper.make_node("Reshape", [f"{base}_conv", f"{base}_pixels_as_rows"], [node.output[0]],
                         name=f"{base}_to_rows"),
    ]  # fmt: skip
    return nodes, initializers


def _matmul_to_float_nodes(
    node: onnx.NodeProto, weight: np.ndarray, index: GraphIndex, base: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """Float-output QGemm as MatMulIntegerToFloat with the int32 bias turned float (see the module doc)."""
    a_scale = _per_channel(node, index, _A_SCALE)
    b_scale = _per_channel(node, index, _B_SCALE)
    if a_scale is None or b_scale is None:
        return None
    new = [numpy_helper.from_array(weight, f"{base}_weight")]  # (K, N)
    inputs = [
        node.input[_A], f"{base}_weight", node.input[_A_SCALE], node.input[_B_SCALE], node.input[_A_ZERO],
        node.input[_B_ZERO],
    ]  # fmt: skip
    if optional_input(node, _C):
        bias = _per_channel(node, index, _C)
        if bias is None or bias.ndim != 1 or bias.shape[0] != weight.shape[1]:
            return None
        # QGemm's own output scale, computed as it computes it: (alpha * s_x) * s_w[n], alpha = 1.
        scale = a_scale.astype(np.float32).reshape(()) * b_scale.astype(np.float32).reshape(-1)
        new.append(numpy_helper.from_array((bias.astype(np.float32) * scale).astype(np.float32), f"{base}_bias"))
        inputs.append(f"{base}_bias")
    matmul = helper.make_node(
        "MatMulIntegerToFloat", inputs, [node.output[0]], name=f"{base}_matmul", domain=_MS_DOMAIN
    )
    return [matmul], new


def move_qgemm_to_faster_kernels(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` (ORT's optimized graph) with its QGemm nodes on faster kernels (see the module doc).

    Rewritten: QGemm with alpha = 1, A not transposed, a constant 2-D weight, a 1-D int32 bias or none,
    and weight zero points all equal (QLinearConv's requirement). Others are left as they are.

    Returns:
        the new model and how many QGemm nodes moved (a uint8 output to ``QLinearConv``, a float one to
        ``MatMulIntegerToFloat``).
    """
    out, index = copy_and_index(model)
    graph = out.graph
    rewritten: dict[str, list[onnx.NodeProto]] = {}  # QGemm output -> the nodes computing it instead
    new_initializers: list[onnx.TensorProto] = []
    for node in graph.node:
        weight = _weight_in_k_n(node, index) if node.op_type == "QGemm" and node.domain == _MS_DOMAIN else None
        zero = _per_channel(node, index, _B_ZERO) if weight is not None else None
        eligible = (
            weight is not None and zero is not None and np.all(zero == zero.reshape(-1)[0])
            and attribute(node, "alpha", 1.0) == 1.0 and not attribute(node, "transA", 0)
        )  # fmt: skip
        if not eligible:
            continue
        base = f"{node.name or node.output[0]}_rewritten"
        if optional_input(node, _Y_SCALE):
            bias = _per_channel(node, index, _C) if optional_input(node, _C) else None
            if optional_input(node, _C) and (bias is None or bias.shape != (weight.shape[1],)):  # QLinearConv: (N,)
                continue
            added, inits = _conv_nodes(node, weight, base)
        else:
            moved = _matmul_to_float_nodes(node, weight, index, base)
            if moved is None:
                continue
            added, inits = moved
        rewritten[node.output[0]] = added
        new_initializers += inits
    rebuild_nodes(graph, rewritten)
    graph.initializer.extend(new_initializers)
    prune_initializers(graph)  # the QGemm weights now unread
    return out, len(rewritten)


PASS = GraphPass(move_qgemm_to_faster_kernels, counts="QGemm nodes moved to QLinearConv / MatMulIntegerToFloat",
                 measured_on_ort="1.32.0")  # fmt: skip
