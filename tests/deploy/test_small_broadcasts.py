"""Pass 11, ``expand_short_run_broadcasts`` (maptr/deploy/small_broadcasts.py): an element-wise operator that
broadcasts in runs of a few elements reads its small input expanded (stored expanded when constant); long
runs, scalars and small outputs stay; the values are bit-identical."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from ort_graphs import make_model, op_types, run, value

from maptr.deploy.small_broadcasts import expand_short_run_broadcasts


def _broadcast_model(small_shape: list, full_shape: list, op: str, small_constant: bool) -> onnx.ModelProto:
    """y = op(full, small): the small input broadcast to the full one (a graph input or a constant)."""
    inputs = [value("full", full_shape)]
    inits = {}
    if small_constant:
        inits["small"] = np.random.default_rng(4).uniform(1, 2, small_shape).astype(np.float32)  # static when constant
    else:
        inputs.append(value("small", small_shape))
    node = helper.make_node(op, ["full", "small"], ["y"], name="op")
    return make_model([node], inputs, [value("y", full_shape)], inits)


@pytest.mark.parametrize(
    ("small_shape", "full_shape", "op", "constant", "expected"),
    [
        (["pairs", 1, 1, 4, 2], ["pairs", 4, 2, 4, 2], "Add", False, "Expand"),  # SCA reference + offsets, runs of 8
        ([1, 1, 1, 1, 2], [1, 500, 4, 4, 2], "Div", True, "initializer"),  # offset normalizer: stored expanded
        ([1, 500, 1], [1, 500, 64], "Div", False, None),  # runs of 64: ORT's broadcast is fast enough
        ([4, 1, 300, 8], [4, 16, 300, 8], "Mul", False, None),  # one long run per channel: left alone
        ([], [1, 500, 4, 2], "Mul", True, None),  # a scalar
        ([1, 1, 2], [1, 20, 2], "Sub", False, None),  # 40 elements: not worth a node
    ],
)
def test_short_run_broadcasts_are_expanded_bit_identically(small_shape, full_shape, op, constant, expected):
    model = _broadcast_model(small_shape, full_shape, op, constant)
    rewritten, count = expand_short_run_broadcasts(model)
    names = {init.name for init in rewritten.graph.initializer}
    assert count == (expected is not None)
    assert ("Expand" in op_types(rewritten)) == (expected == "Expand")
    assert any(name.startswith("small_expanded") for name in names) == (expected == "initializer")
    rng = np.random.default_rng(5)
    feeds = {"full": rng.normal(size=[7 if isinstance(d, str) else d for d in full_shape]).astype(np.float32)}
    if not constant:
        static_small = [7 if isinstance(d, str) else d for d in small_shape]
        feeds["small"] = rng.uniform(1, 2, static_small).astype(np.float32)
    np.testing.assert_array_equal(run(rewritten, feeds, level="all")[0], run(model, feeds)[0])
