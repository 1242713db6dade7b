"""The compile stage's pass lists (maptr/deploy/ort_compile.py): their order as the module doc numbers it,
one signature for every pass, the report entry of each, and the ORT options every session shares."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper
from ort_graphs import make_model, optimized, qdq_linear_model, value

from maptr.deploy import ort_compile
from maptr.deploy.checker import run_onnx_runtime
from maptr.deploy.onnx_graph import run_passes
from maptr.deploy.ort_compile import AFTER_ORT, BEFORE_ORT, CompiledModel, ort_optimize

PASSES = (*BEFORE_ORT, *AFTER_ORT)


def test_the_module_doc_numbers_the_passes_in_the_order_they_run():
    numbered = re.findall(r"^\s*(\d+)\. ``(\w+)``", ort_compile.__doc__, flags=re.MULTILINE)
    assert [int(number) for number, _ in numbered] == list(range(1, len(PASSES) + 1))
    assert [name for _, name in numbered] == [graph_pass.name for graph_pass in PASSES]
    # ORT's optimizer is described between the two lists
    doc = ort_compile.__doc__
    last_before = doc.index(f"``{BEFORE_ORT[-1].name}``")
    assert last_before < doc.index("ORT's own graph optimizer") < doc.index(f"``{AFTER_ORT[0].name}``")


def test_every_pass_returns_a_new_model_and_a_count_and_leaves_its_argument_alone(tmp_path):
    model = qdq_linear_model(relu=True)
    graphs = [(BEFORE_ORT, model), (AFTER_ORT, optimized(ort_compile.prepare_for_ort(model)[0], tmp_path))]
    for passes, graph in graphs:
        for graph_pass in passes:
            before = graph.SerializeToString()
            rewritten, count = graph_pass.run(graph)
            assert isinstance(rewritten, onnx.ModelProto) and type(count) is int and count >= 0, graph_pass.name
            assert graph.SerializeToString() == before, graph_pass.name
            onnx.checker.check_model(rewritten)


def test_passes_have_distinct_names_and_record_the_ort_version_they_were_measured_on():
    names = [graph_pass.name for graph_pass in PASSES]
    assert len(set(names)) == len(names) == 11
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", graph_pass.measured_on_ort) for graph_pass in PASSES)
    assert all(graph_pass.counts for graph_pass in PASSES)


def test_counts_come_back_by_pass_in_order_and_the_report_entry_numbers_them():
    model = qdq_linear_model(relu=True)
    _, counts = run_passes(model, BEFORE_ORT)
    assert list(counts) == [graph_pass.name for graph_pass in BEFORE_ORT]
    assert counts["fold_constants"] == 1 and counts["drop_relus_before_quantize"] == 1
    all_counts = {graph_pass.name: index for index, graph_pass in enumerate(PASSES)}
    entries = CompiledModel(path=None, counts=all_counts).passes()
    assert list(entries) == list(all_counts)
    assert [entry["step"] for entry in entries.values()] == list(range(1, 12))
    assert [entry["runs"] for entry in entries.values()] == ["before ORT"] * 5 + ["after ORT"] * 6
    assert entries["collapse_reshape_chains"]["count"] == all_counts["collapse_reshape_chains"]
    assert entries["collapse_reshape_chains"]["measured_on_ort"] == AFTER_ORT[4].measured_on_ort


def test_optimize_and_save_refuses_an_unknown_level(tmp_path):
    with pytest.raises(ValueError, match="level must be one of"):
        ort_compile.optimize_and_save(tmp_path / "in.onnx", tmp_path / "out.onnx", level="max")


def _int8_weight_linear() -> onnx.ModelProto:
    """x float (1, 4, 32) -> MatMul with an int8 weight DQ: ORT fuses it into MatMulNBits."""
    rng = np.random.default_rng(0)
    inits = {"w_q": rng.integers(-60, 60, size=(32, 32)).astype(np.int8), "w_scale": np.full(32, 0.02, np.float32),
             "w_zp": np.zeros(32, np.int8)}  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=0),
        helper.make_node("Transpose", ["w_f"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y"]),
    ]
    return make_model(nodes, [value("x", [1, 4, 32])], [value("y", [1, 4, 32])], inits)


def _accuracy_levels(model: onnx.ModelProto) -> list[int]:
    return [
        helper.get_attribute_value(attr)
        for node in model.graph.node if node.op_type == "MatMulNBits"
        for attr in node.attribute if attr.name == "accuracy_level"
    ]  # fmt: skip


def test_the_compiler_and_the_checker_run_matmul_nbits_in_float32(tmp_path):
    """ORT's default accuracy level 4 quantizes MatMulNBits' input to int8, which the QAT model never does;
    every session takes level 1 from ort_runner.session_options (the level is saved in the nodes)."""
    model = _int8_weight_linear()
    ort_optimize(model, tmp_path / "compiled.onnx", "extended")
    assert _accuracy_levels(onnx.load(str(tmp_path / "compiled.onnx"))) == [1]
    onnx.save(model, str(tmp_path / "model.onnx"))
    feeds = {"x": np.ones((1, 4, 32), np.float32)}
    run_onnx_runtime(tmp_path / "model.onnx", tmp_path / "checked.onnx", feeds, level="extended")
    assert _accuracy_levels(onnx.load(str(tmp_path / "checked.onnx"))) == [1]
