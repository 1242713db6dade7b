"""Element-wise operators that broadcast in short runs get their small input expanded first.

ONNX Runtime's CPU ``Add`` / ``Sub`` / ``Mul`` / ``Div`` walk a broadcast in runs: the trailing dimensions
over which both inputs advance together (or one stays put) form one vectorized run, and each run is
a separate call, on one thread. Deformable attention broadcasts in very short runs: the reference points
``(K, 1, 1, A, 2)`` added to the sampling offsets ``(K, M, P/A, A, 2)`` move in runs of 8 floats, the
decoder's ``(1, Q, 1, 1, 1, 2)`` reference and its offset normalizer ``(..., 2)`` in runs of 2. One
``Expand`` of the small input to the full shape (ORT fills it by doubling copies) and an operator on two
tensors of one shape is 2.4-10x faster on those nodes (``benchmarks/README.md``).

The rewrite is exact: the operator sees the same pairs of values. A small input that is a constant,
beside a full-size input of static shape, is expanded here once and stored; otherwise the graph
expands it per run with ``Expand(small, Shape(full))``, which follows a dynamic dimension (the number of
visible camera-query pairs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptr.deploy.onnx_graph import Dim, GraphPass, copy_and_index, rebuild_nodes, tensor_shapes

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
# Runs shorter than this many elements are expanded (measured: runs of 2 and 8 gain 2.4-10x; a run of
# 10k elements broadcast over 16 channels loses 2.5x, so long runs stay as they are).
MAX_RUN = 16
# Outputs with fewer elements are left alone: their broadcast costs microseconds either way.
MIN_ELEMENTS = 4096


def _short_run_broadcast(small: list[Dim], full: list[Dim]) -> bool:
    """True when ``small`` broadcasts to ``full`` (same rank or lower) in runs shorter than MAX_RUN elements,
    over an output of at least MIN_ELEMENTS (a symbolic dimension counts as large)."""
    if any(d is None for d in small + full) or len(small) > len(full):
        return False
    small = [1] * (len(full) - len(small)) + small
    if any(s != 1 and s != f for s, f in zip(small, full, strict=True)) or small == full:
        return False  # not a one-sided broadcast, or no broadcast at all
    # The run: trailing output dims (size-1 dims merge with anything) over which the small input does
    # the same thing (advances, or stays put) as over the last non-trivial one.
    run, pattern = 1, None
    for s, f in reversed(list(zip(small, full, strict=True))):
        if f == 1:
            continue
        advances = s == f
        if pattern is None:
            pattern = advances
        elif advances != pattern:
            break
        if isinstance(f, str):
            return False  # a dynamic dimension inside the run: long enough
        run *= f
    elements = 1
    for f in full:
        elements *= f if isinstance(f, int) else MIN_ELEMENTS
    return run < MAX_RUN and elements >= MIN_ELEMENTS


def expand_short_run_broadcasts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` in which each element-wise operator that broadcasts in short runs reads its small
    input expanded to the full shape (see the module doc).

    Returns:
        the new model and the number of operators rewritten.
    """
    shapes = tensor_shapes(model)
    out, index = copy_and_index(model)
    graph = out.graph
    rewritten: dict[str, list[onnx.NodeProto]] = {}  # the operator's output -> [Shape, Expand,] the operator
    for node in graph.node:
        if node.op_type in _ELEMENTWISE and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            a, b = node.input
            for small_index, (small, full) in enumerate(((a, b), (b, a))):
                if small not in shapes or full not in shapes:
                    continue
                if not _short_run_broadcast(shapes[small], shapes[full]):
                    continue
                full_shape = shapes[full]
                expanded = f"{small}_expanded_for_{node.name or node.output[0]}"
                value = index.constant(small)
                if value is not None and all(isinstance(d, int) for d in full_shape):
                    stored = np.ascontiguousarray(np.broadcast_to(value, full_shape))
                    graph.initializer.append(numpy_helper.from_array(stored, expanded))
                    rewritten[node.output[0]] = [node]
                else:
                    shape = f"{expanded}_shape"
                    rewritten[node.output[0]] = [
                        helper.make_node("Shape", [full], [shape], name=f"{expanded}/shape"),
                        helper.make_node("Expand", [small, shape], [expanded], name=f"{expanded}/expand"),
                        node,
                    ]
                node.input[small_index] = expanded
                break
    rebuild_nodes(graph, rewritten)
    return out, len(rewritten)


PASS = GraphPass(expand_short_run_broadcasts, counts="element-wise operators given their small input expanded",
                 measured_on_ort="1.32.0")  # fmt: skip
