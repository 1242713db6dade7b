"""The constant DequantizeLinear nodes that ORT's optimizer left in front of float kernels, folded after it.

Before ORT's optimizer, :func:`~maptr.deploy.constant_folding.fold_constants` keeps every constant
``DequantizeLinear`` read by a run-time node, so that ORT can fuse it into an integer kernel. The ones ORT
did not fuse now feed a kernel that stays float (a learned query dequantized into a float ``Mul``, a weight
of a linear with 16-bit inputs): nothing reads their integer grid any more, and left in, each dequantizes
the same tensor on every frame. They are folded into float initializers here (nano: 3 until the residual
sums stayed float on 2026-12-06, 0 since; tiny: 1).

Not folded: the weight and bias DQs of a float ``Gemm`` or ``Conv`` whose input is a DequantizeLinear's
output. ORT's ``WeightBiasQuantization`` runs again whenever the file is loaded at ``extended`` or ``all``,
and it re-quantizes a float weight of such a kernel per tensor to int8: a folded per-channel weight would
change value at load time (:data:`~maptr.deploy.constant_folding._WEIGHT_REQUANTIZED_AT_LOAD`; none left on
nano once :mod:`~maptr.deploy.int16_rounding` removed the 16-bit pairs in front of those kernels).
"""

from __future__ import annotations

import onnx

from maptr.deploy.constant_folding import fold_constants
from maptr.deploy.onnx_graph import GraphPass


def fold_leftover_dequantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` (ORT's optimized graph) with its constant DQs and what only they feed folded
    into initializers, except the weights ORT would re-quantize at load (see the module doc).

    Returns:
        the new model and the number of nodes folded.
    """
    return fold_constants(model, keep_dequantize=False)


PASS = GraphPass(fold_leftover_dequantize, counts="constant DQs (and their layout nodes) folded",
                 measured_on_ort="1.32.0")  # fmt: skip
