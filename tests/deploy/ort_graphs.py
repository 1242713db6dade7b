"""What the tests of the compile passes share: hand-made ONNX graphs and ONNX Runtime runners.

Sessions take their options from :func:`maptr.deploy.ort_runner.session_options` (one thread), as every
session of the project does; levels are named as there ("disabled", "basic", "extended", "all").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy.ort_runner import session_options

OPSET = 21
WITH_CONTRIB = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]  # ORT's own ops too


def value(name: str, shape: list | None, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A graph input or output (``shape`` None: unknown)."""
    return helper.make_tensor_value_info(name, elem_type, shape)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray],
    opsets: list[onnx.OperatorSetIdProto] | None = None,
) -> onnx.ModelProto:
    """A model of one graph, ``onnx.checker`` clean; ``initializers``: name -> value, in that order."""
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    )
    model = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto, level: str = "disabled", saved: str | Path | None = None) -> ort.InferenceSession:
    """A one-thread session of ``model`` at ORT level ``level``; ``saved``: where ORT writes its optimized graph."""
    options = session_options(threads=1, level=level)
    if saved is not None:
        options.optimized_model_filepath = str(saved)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str = "disabled") -> list[np.ndarray]:
    """Every output of ``model`` on ``feeds`` (level "disabled": each node as written)."""
    return session(model, level).run(None, feeds)


def optimized(model: onnx.ModelProto, tmp_path: Path, level: str = "extended") -> onnx.ModelProto:
    """The graph ORT optimizes ``model`` into at ``level``, as it saves it."""
    path = tmp_path / f"optimized_{level}.onnx"
    session(model, level, saved=path)
    return onnx.load(str(path))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def qdq_linear_model(relu: bool) -> onnx.ModelProto:
    """x (1, 4, 8) -> uint8 Q/DQ -> MatMul with a per-channel int8 weight (DQ -> Transpose, as the exporter
    writes a linear) -> + bias [-> Relu] -> uint8 Q (zero point 0) / DQ -> y. A constant branch
    (query embedding -> Mul -> Add) feeds the input too, as MapTR's learned queries do. The input is 3-D,
    as MapTR's (batch, queries, channels): ORT then wraps its Gemm in Reshapes."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-60, 60, size=(16, 8)).astype(np.int8)  # (C_out, C_in), axis-0 scales
    init = {
        "w_q": weight, "w_scale": np.full(16, 0.02, np.float32), "w_zp": np.zeros(16, np.int8),
        "bias": rng.normal(size=16).astype(np.float32),
        "query": rng.normal(size=(1, 4, 8)).astype(np.float32), "two": np.array(2.0, np.float32),
        "x_scale": np.array(0.05, np.float32), "x_zp": np.array(128, np.uint8),
        "y_scale": np.array(0.04, np.float32), "y_zp": np.array(0, np.uint8),
    }  # fmt: skip
    nodes = [
        helper.make_node("Mul", ["query", "two"], ["query2"]),  # constant
        helper.make_node("Add", ["x", "query2"], ["xq"]),
        helper.make_node("QuantizeLinear", ["xq", "x_scale", "x_zp"], ["x_u8"]),
        helper.make_node("DequantizeLinear", ["x_u8", "x_scale", "x_zp"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=0),  # constant
        helper.make_node("Transpose", ["w_f"], ["w_t"], perm=[1, 0]),  # constant, between DQ and MatMul
        helper.make_node("MatMul", ["x_f", "w_t"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["lin"]),
    ]
    if relu:
        nodes.append(helper.make_node("Relu", ["lin"], ["act"]))
    nodes += [
        helper.make_node("QuantizeLinear", ["act" if relu else "lin", "y_scale", "y_zp"], ["y_u8"]),
        helper.make_node("DequantizeLinear", ["y_u8", "y_scale", "y_zp"], ["y"]),
    ]
    return make_model(nodes, [value("x", [1, 4, 8])], [value("y", [1, 4, 16])], init)


def linear_feeds() -> dict[str, np.ndarray]:
    """An input for :func:`qdq_linear_model` that the ReLU clips in places."""
    return {"x": np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32) * 3}
