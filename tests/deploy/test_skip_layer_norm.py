"""Pass 9, ``split_skip_layer_norms`` (maptr/deploy/skip_layer_norm.py): ORT's fused SkipLayerNormalization
written back as Sum -> LayerNormalization, not fused again at load, the same values up to float rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from ort_graphs import WITH_CONTRIB, make_model, op_types, optimized, run, session, value

from maptr.deploy.skip_layer_norm import split_skip_layer_norms

_SHAPE = [1, 7, 8]


def _residual_norm_model() -> onnx.ModelProto:
    """x (1, 7, 8) -> MatMul -> Add(x) -> LayerNormalization: the post-norm residual ORT fuses."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.normal(size=(8, 8)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "beta": rng.normal(size=8).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["x", "h"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
    ]
    return make_model(nodes, [value("x", _SHAPE)], [value("y", _SHAPE)], inits)


def test_skip_layer_norm_is_split_and_not_fused_again_at_load(tmp_path):
    x = {"x": np.random.default_rng(1).normal(size=_SHAPE).astype(np.float32)}
    fused = optimized(_residual_norm_model(), tmp_path)
    assert "SkipLayerNormalization" in op_types(fused)
    split, count = split_skip_layer_norms(fused)
    assert count == 1
    assert "SkipLayerNormalization" not in op_types(split) and {"Sum", "LayerNormalization"} <= set(op_types(split))
    onnx.checker.check_model(split)
    # Loaded at ORT's `all` level (as every deployed session is), the split stays split ...
    loaded = session(split, "all", saved=tmp_path / "all.onnx")
    assert "SkipLayerNormalization" not in op_types(onnx.load(str(tmp_path / "all.onnx")))
    # ... and computes what the fused node did, up to float rounding.
    np.testing.assert_allclose(loaded.run(None, x)[0], run(fused, x)[0], rtol=0, atol=1e-5)


def _skip_norm_node_model(outputs: list[str], with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {
        "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "beta": rng.normal(size=8).astype(np.float32),
        "bias": rng.normal(size=8).astype(np.float32),
    }
    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    node = helper.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft", epsilon=1e-5)
    return make_model(
        [node], [value(name, _SHAPE) for name in ("x", "skip")],
        [value(name, [1, 7, 1] if name == "mean" else _SHAPE) for name in outputs if name],
        inits, WITH_CONTRIB,
    )  # fmt: skip


def test_split_keeps_the_bias_and_the_sum_output_and_matches_the_formula():
    rng = np.random.default_rng(3)
    feeds = {name: rng.normal(size=_SHAPE).astype(np.float32) for name in ("x", "skip")}
    model = _skip_norm_node_model(["y", "", "", "total"], with_bias=True)
    split, count = split_skip_layer_norms(model)
    assert count == 1
    assert [(n.op_type, len(n.input)) for n in split.graph.node] == [("Sum", 3), ("LayerNormalization", 3)]
    y, total = session(split).run(["y", "total"], feeds)
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    expected_total = feeds["x"] + feeds["skip"] + inits["bias"]
    mean = expected_total.mean(-1, keepdims=True)
    std = np.sqrt(expected_total.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(total, expected_total, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, (expected_total - mean) / std * inits["gamma"] + inits["beta"], rtol=0, atol=1e-5)


def test_split_leaves_a_node_whose_statistics_are_read_and_needs_opset_17():
    model = _skip_norm_node_model(["y", "mean"], with_bias=False)
    untouched, count = split_skip_layer_norms(model)
    assert count == 0 and op_types(untouched) == ["SkipLayerNormalization"]
    old = _skip_norm_node_model(["y"], with_bias=False)
    del old.opset_import[:]
    old.opset_import.extend([helper.make_opsetid("", 16), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ValueError, match="opset >= 17"):
        split_skip_layer_norms(old)
