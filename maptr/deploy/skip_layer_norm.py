"""ORT's fused ``SkipLayerNormalization`` nodes written back as ``Sum -> LayerNormalization``.

At ``extended`` level ONNX Runtime fuses every residual ``Add -> LayerNormalization`` of a transformer
into one ``com.microsoft.SkipLayerNormalization`` node. Its CPU kernel (ORT 1.32) normalizes one row per
thread-pool task with a scalar loop and a division per element, where the standard
``LayerNormalization`` kernel is vectorized. On MapTR's shapes (64 channels) the fused node is the slow
one: (1, 1250, 64) takes 473 us against 81 us for ``Sum + LayerNormalization`` at 1 thread, 263 vs
113 us at 2 threads (``benchmarks/bench_ort_kernels.py``).

The sum is written as ``Sum``, not ``Add``: ORT's ``SkipLayerNormFusion`` matches an ``Add`` parent,
so an ``Add`` would be fused again when the file is loaded at level ``all``; ``Sum`` of two tensors of
one shape is the same elementwise addition. Both nodes compute what the fused one did: the sum of the
input, the skip and the optional bias, normalized over the last axis with the node's gamma, beta and
epsilon; the outputs differ by float rounding (the kernels accumulate the mean and variance in
different orders).
"""

from __future__ import annotations

import onnx
from onnx import helper

from maptr.deploy.onnx_graph import GraphPass, attribute, copy_model, rebuild_nodes

_MS_DOMAIN = "com.microsoft"
_DEFAULT_EPSILON = 1e-12  # the contrib op's default, for a node written without the attribute


def split_skip_layer_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each ``SkipLayerNormalization`` as ``Sum -> LayerNormalization``.

    A node is left fused when its mean or inverse-deviation output (outputs 1 and 2, training-only
    statistics that ``LayerNormalization`` lays out differently) is used. Its optional sum output
    (output 3) becomes the ``Sum``'s output.

    Args:
        model: an ONNX model (opset >= 17, where ``LayerNormalization`` is a standard op).
    Returns:
        the new model and the number of nodes split.
    """
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        raise ValueError(f"LayerNormalization needs opset >= 17; this model imports opset {opset}")
    out = copy_model(model)
    split: dict[str, list[onnx.NodeProto]] = {}  # the fused node's output -> Sum, LayerNormalization
    for node in out.graph.node:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != "SkipLayerNormalization" or node.domain != _MS_DOMAIN or any(outputs[1:3]):
            continue
        inputs = list(node.input) + [""] * (5 - len(node.input))
        data, skip, gamma, beta, bias = inputs[:5]
        # The fused node's sum output, when a later node reads it; otherwise a fresh name.
        total = outputs[3] or f"{node.output[0]}_skip_sum"
        total_node = helper.make_node("Sum", [data, skip] + ([bias] if bias else []), [total], name=f"{node.name}_sum")
        norm_inputs = [total, gamma] + ([beta] if beta else [])
        norm = helper.make_node("LayerNormalization", norm_inputs, [node.output[0]], name=f"{node.name}_norm")
        epsilon = float(attribute(node, "epsilon", _DEFAULT_EPSILON))
        norm.attribute.extend([helper.make_attribute("axis", -1), helper.make_attribute("epsilon", epsilon)])
        split[node.output[0]] = [total_node, norm]
    rebuild_nodes(out.graph, split)
    return out, len(split)


PASS = GraphPass(split_skip_layer_norms, counts="SkipLayerNormalization nodes split", measured_on_ort="1.32.0")
