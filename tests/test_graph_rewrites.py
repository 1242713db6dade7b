"""The ONNX rewrites of the compile stage, on hand-made graphs: constant folding of a Q/DQ graph, the
removal of ReLUs that a uint8 QuantizeLinear makes redundant (both must keep every output value), and
the int32 biases that let ORT run a float-output linear as QGemm (within half a bias step), and the stem
convolution over 2x2 blocks (bit-identical integer outputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy import constant_folding
from maptr.deploy.constant_folding import constant_nodes, fold_constants
from maptr.deploy.integer_bias import quantize_float_output_biases
from maptr.deploy.ort_compile import prepare_for_ort
from maptr.deploy.redundant_relu import drop_relus_before_quantize
from maptr.deploy.stem_space_to_depth import space_to_depth_stem, space_to_depth_weight

OPSET = 21


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str = "disabled") -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _optimized_op_types(model: onnx.ModelProto, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def _qdq_linear_model(relu: bool) -> onnx.ModelProto:
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
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])],
        init,
    )


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32) * 3}


def test_constant_nodes_are_those_that_read_no_graph_input():
    model = _qdq_linear_model(relu=False)
    flags = dict(zip((node.output[0] for node in model.graph.node), constant_nodes(model.graph), strict=True))
    assert flags == {"query2": True, "xq": False, "x_u8": False, "x_f": False, "w_f": True, "w_t": True,
                     "mm": False, "lin": False, "y_u8": False, "y": False}  # fmt: skip


def test_folding_keeps_the_values_and_the_weight_chain_for_the_integer_kernel(tmp_path):
    model = _qdq_linear_model(relu=False)
    folded, report = fold_constants(model)
    ops = [node.op_type for node in folded.graph.node]
    assert "Mul" not in ops  # the constant query branch was computed once ...
    assert ops.count("DequantizeLinear") == 3 and "Transpose" in ops  # ... the weight's DQ -> Transpose was not
    assert report.folded_nodes == 1 and report.kept_constant_dq == 1 and report.nodes_after == len(ops)
    assert {"w_q", "w_scale"} <= {name for node in folded.graph.node for name in node.input}  # learned int8 grid
    np.testing.assert_array_equal(_run(folded, _feeds())[0], _run(model, _feeds())[0])
    # Folded into a float initializer, the weight would be requantized by ORT on its own per-tensor grid.
    assert "QGemm" in _optimized_op_types(folded, tmp_path)


def _ort_extended(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def test_after_ort_a_constant_dequantize_read_by_a_float_kernel_is_folded(tmp_path):
    # A constant uint8 tensor (a learned query, folded) dequantized into a float Mul: per frame for nothing.
    init = {"c_q": np.arange(6, dtype=np.uint8), "c_scale": np.array(0.5, np.float32), "c_zp": np.array(2, np.uint8)}
    model = _model(
        [helper.make_node("DequantizeLinear", ["c_q", "c_scale", "c_zp"], ["c"]),
         helper.make_node("Mul", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
        init,
    )  # fmt: skip
    optimized = _ort_extended(model, tmp_path)
    assert "DequantizeLinear" in [node.op_type for node in optimized.graph.node]
    assert len(fold_constants(optimized)[0].graph.node) == 2  # before ORT's optimizer the DQ must stay ...
    folded, report = fold_constants(optimized, keep_dequantize=False)  # ... after it, nothing fuses it any more
    assert [node.op_type for node in folded.graph.node] == ["Mul"] and report.folded_nodes == 1
    feeds = {"x": np.arange(6, dtype=np.float32)}
    np.testing.assert_array_equal(_run(folded, feeds)[0], _run(optimized, feeds)[0])


def test_after_ort_a_float_gemm_keeps_its_weight_dequantize_so_that_loading_does_not_requantize_it(
    tmp_path, monkeypatch
):
    """An int16-input linear stays a float Gemm. Loaded at ORT's default level, ORT's WeightBiasQuantization
    re-quantizes a float weight of such a Gemm per tensor: a folded per-channel weight would change value."""
    model = _qdq_linear_model(relu=False)
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int16), "x_zp16"))
    for node in model.graph.node:
        if node.input[1:2] == ["x_scale"]:
            node.input[2] = "x_zp16"
    optimized = _ort_extended(model, tmp_path)
    assert "Gemm" in [node.op_type for node in optimized.graph.node]
    folded, _ = fold_constants(optimized, keep_dequantize=False)
    int8_initializers = {init.name for init in folded.graph.initializer if init.data_type == TensorProto.INT8}
    weight_dq = [node for node in folded.graph.node
                 if node.op_type == "DequantizeLinear" and node.input[0] in int8_initializers]  # fmt: skip
    assert len(weight_dq) == 1  # the int8 per-channel weight is still read through its DQ
    feeds = _feeds()
    np.testing.assert_array_equal(_run(folded, feeds, level="all")[0], _run(optimized, feeds, level="all")[0])
    # The hazard the rule avoids: with the weight and bias DQs folded too (the rule switched off), the file
    # computes the same as written, but loaded at `all` ORT re-quantizes the float weight per tensor.
    monkeypatch.setattr(constant_folding, "_WEIGHT_REQUANTIZED_AT_LOAD", set())
    naive, _ = fold_constants(optimized, keep_dequantize=False)
    assert not [
        node for node in naive.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in int8_initializers
    ]
    np.testing.assert_allclose(_run(naive, feeds)[0], _run(optimized, feeds)[0], atol=1e-6)
    assert np.abs(_run(naive, feeds, level="all")[0] - _run(optimized, feeds, level="all")[0]).max() > 0


def test_folding_a_graph_output_that_is_constant():
    init = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["a"], ["c"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])],
        init,
    )  # fmt: skip
    folded, report = fold_constants(model)
    assert [node.op_type for node in folded.graph.node] == ["Relu"] and report.new_initializers == 1
    y, c = _run(folded, {"x": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(c, -init["a"])
    np.testing.assert_array_equal(y, [0.0, 2.0])


def test_relu_before_a_zero_point_0_uint8_quantize_is_dropped_and_the_linear_becomes_integer(tmp_path):
    model = _qdq_linear_model(relu=True)
    dropped, count = drop_relus_before_quantize(model)
    assert count == 1 and "Relu" not in [node.op_type for node in dropped.graph.node]
    onnx.checker.check_model(dropped)
    feeds = _feeds()
    reference = _run(model, feeds)[0]
    assert (reference == 0).any() and (reference > 0).any()  # the ReLU did clip something
    np.testing.assert_array_equal(_run(dropped, feeds)[0], reference)
    prepared = prepare_for_ort(model)
    assert prepared.relus_removed == 1 and "QGemm" in _optimized_op_types(prepared.model, tmp_path)


@pytest.mark.parametrize("zero_point, second_reader", [(np.uint8(3), False), (np.uint8(0), True)])
def test_relu_that_changes_values_is_kept(zero_point, second_reader):
    """A zero point above the bottom of the range keeps negative values apart from 0; a second reader of
    the ReLU output needs the ReLU itself."""
    init = {"s": np.array(0.1, np.float32), "z": np.array(zero_point)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    if second_reader:
        nodes.append(helper.make_node("Neg", ["r"], ["n"]))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [3]))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])], outputs, init)
    kept, count = drop_relus_before_quantize(model)
    assert count == 0 and [node.op_type for node in kept.graph.node] == [node.op_type for node in model.graph.node]


def _float_output_linear(activation_zero_point: np.ndarray) -> onnx.ModelProto:
    """The linear of :func:`_qdq_linear_model` with its output left float (read by a float operator)."""
    model = _qdq_linear_model(relu=False)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] == "x_scale":
            node.input[2] = "x_zp16" if activation_zero_point.dtype == np.int16 else "x_zp"
    model.graph.initializer.append(numpy_helper.from_array(activation_zero_point, "x_zp16"))
    model.graph.node.pop()  # the output DQ ...
    model.graph.node.pop()  # ... and Q
    model.graph.output[0].name = "lin"
    onnx.checker.check_model(model)
    return model


def test_a_float_output_linear_gets_an_int32_bias_and_runs_as_qgemm(tmp_path):
    model = _float_output_linear(np.array(128, np.uint8))
    assert "QGemm" not in _optimized_op_types(model, tmp_path)  # ORT alone keeps it float
    rewritten, count = quantize_float_output_biases(model)
    assert count == 1
    onnx.checker.check_model(rewritten)
    bias = {init.name: numpy_helper.to_array(init) for init in rewritten.graph.initializer}
    quantized = next(value for name, value in bias.items() if name.endswith("_quantized"))
    scale = next(value for name, value in bias.items() if name.endswith("_int32_bias_scale"))
    np.testing.assert_allclose(scale, 0.05 * 0.02, rtol=1e-6)  # s_x * s_w per output channel
    assert quantized.dtype == np.int32 and quantized.shape == (16,)
    assert "QGemm" in _optimized_op_types(rewritten, tmp_path)
    feeds = _feeds()
    reference = _run(model, feeds)[0]
    exact = _run(rewritten, feeds)[0]
    integer = _run(rewritten, feeds, level="extended")[0]
    half_step = 0.5 * 0.05 * 0.02
    assert 0 < np.abs(exact - reference).max() <= half_step * (1 + 1e-3)  # only the bias rounding moved
    np.testing.assert_allclose(integer, exact, atol=1e-5)  # the QGemm computes the rewritten graph


def test_int16_linears_and_linears_without_bias_keep_their_float_bias():
    model = _float_output_linear(np.array(0, np.int16))
    assert quantize_float_output_biases(model)[1] == 0  # no integer kernel for int16 in ORT anyway
    no_bias = _float_output_linear(np.array(128, np.uint8))
    add = next(node for node in no_bias.graph.node if node.op_type == "Add" and "bias" in node.input)
    add.op_type, add.input[1] = "Sub", "bias"  # not a bias add: nothing to quantize
    assert quantize_float_output_biases(no_bias)[1] == 0


def _qdq_stem_model(height: int, width: int, kernel: int = 7) -> onnx.ModelProto:
    """x (2, 3, H, W) -> uint8 Q/DQ (zero point 128) -> Conv kernel x kernel / 2 with a per-channel int8
    weight and a bias -> uint8 Q/DQ -> y: ResNet's stem as the exporter writes it."""
    rng = np.random.default_rng(0)
    init = {
        "w_q": rng.integers(-60, 60, size=(8, 3, kernel, kernel)).astype(np.int8),
        "w_scale": rng.uniform(0.01, 0.03, 8).astype(np.float32), "w_zp": np.zeros(8, np.int8),
        "bias": rng.normal(size=8).astype(np.float32),
        "x_scale": np.array(1 / 128, np.float32), "x_zp": np.array(128, np.uint8),
        "y_scale": np.array(0.05, np.float32), "y_zp": np.array(128, np.uint8),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_u8"]),
        helper.make_node("DequantizeLinear", ["x_u8", "x_scale", "x_zp"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=0),
        helper.make_node(
            "Conv",
            ["x_f", "w_f", "bias"],
            ["conv"],
            kernel_shape=[kernel, kernel],
            strides=[2, 2],
            pads=[kernel // 2] * 4,
        ),  # fmt: skip
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zp"], ["y_u8"]),
        helper.make_node("DequantizeLinear", ["y_u8", "y_scale", "y_zp"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, (height + 1) // 2, (width + 1) // 2])],
        init,
    )


@pytest.mark.parametrize("height, width", [(16, 24), (15, 21)])  # even and odd padded sizes
def test_stem_convolution_over_2x2_blocks_gives_identical_integer_outputs(height, width, tmp_path):
    model = _qdq_stem_model(height, width)
    rewritten, count = space_to_depth_stem(model)
    assert count == 1
    onnx.checker.check_model(rewritten)
    conv = next(node for node in rewritten.graph.node if node.op_type == "Conv")
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[4, 4]]
    op_types = {node.op_type for node in rewritten.graph.node}
    # the 7x7 stem's pad of 3 is the block convolution's own padding (2 blocks before, 1 after); only an odd
    # input size needs an explicit zero-point row / column
    assert "SpaceToDepth" in op_types and ("Pad" in op_types) == (height % 2 == 1 or width % 2 == 1)
    assert [a.ints for a in conv.attribute if a.name == "pads"] == [[2, 2, 1, 1]]
    assert "w_q" not in {init.name for init in rewritten.graph.initializer}  # the 7x7 weight is gone
    assert "QLinearConv" in _optimized_op_types(rewritten, tmp_path)
    feeds = {"x": np.random.default_rng(2).uniform(-1, 1, (2, 3, height, width)).astype(np.float32)}
    reference = _run(model, feeds, level="extended")[0]
    assert reference.shape == (2, 8, (height + 1) // 2, (width + 1) // 2)
    np.testing.assert_array_equal(_run(rewritten, feeds, level="extended")[0], reference)  # same int32 sums
    # as written (float convolutions), only the order of the float sums differs
    np.testing.assert_allclose(_run(rewritten, feeds)[0], _run(model, feeds)[0], atol=0.05 + 1e-6)


def test_space_to_depth_weight_matches_the_strided_convolution():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(2, 3, 7, 7)).astype(np.float32)
    x = rng.normal(size=(1, 3, 10, 12)).astype(np.float32)
    direct = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=2, padding=3)
    padded = torch.nn.functional.pad(torch.from_numpy(x), (3, 3, 3, 3))  # (1, 3, 16, 18)
    blocks = padded.reshape(1, 3, 8, 2, 9, 2).permute(0, 3, 5, 1, 2, 4).reshape(1, 12, 8, 9)  # DCR order
    rewritten = torch.nn.functional.conv2d(blocks, torch.from_numpy(space_to_depth_weight(weight)))
    torch.testing.assert_close(rewritten, direct, rtol=1e-5, atol=1e-5)


def test_stride_1_convolutions_are_not_rewritten():
    model = _qdq_stem_model(16, 24, kernel=3)
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    for attr in conv.attribute:
        if attr.name == "strides":
            attr.ints[:] = [1, 1]
    assert space_to_depth_stem(model)[1] == 0
