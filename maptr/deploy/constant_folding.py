"""Constant folding of a Q/DQ graph: the part of the model that does not depend on the inputs, computed once.

Much of MapTR's inference graph depends only on learned parameters: the BEV queries and their positional
code, so the whole temporal self-attention of the first encoder layer (there is no previous BEV at
inference) and the sampling offsets and attention weights of the spatial cross-attention; the decoder's
instance and point queries, so the first decoder layer's self-attention. ONNX Runtime folds all of it
in the float model, but not in a Q/DQ one: it never folds a ``DequantizeLinear`` (it keeps weight DQs
so that it can fuse them into integer kernels), and everything downstream of a DQ then runs on every
frame. On the nano preset that was ~20 extra linears, 5 softmaxes and a grid sampling per frame.

:func:`fold_constants` evaluates that subgraph once with ONNX Runtime and replaces it by initializers,
with one exception that keeps the integer fusions possible: a constant ``DequantizeLinear`` whose output
is read by a node that runs per frame stays in the graph, fed by its (folded) integer tensor. Every
runtime operator therefore sees the same Q/DQ pattern as before, only with constant inputs where the
constant part used to be.

The folded values come from ONNX Runtime with graph optimizations off, i.e. the reference semantics of
each node (Q and DQ as written), which is what the fake-quant PyTorch model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# Ops whose output is not a function of their inputs: never folded.
_NONDETERMINISTIC = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
}  # fmt: skip
# Ops that only rearrange a tensor: between a constant DQ and its run-time reader, ORT's Q/DQ optimizers
# see through them (they move a weight's Transpose into the integer initializer).
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
# Kernels whose weight / bias DQ stays even in an ORT-optimized graph: ORT's WeightBiasQuantization
# transformer runs again whenever the file is loaded at `extended` or `all`, and it re-quantizes a float
# weight of these ops per tensor to int8 when their input comes from a DequantizeLinear (a linear with
# int16 inputs, which stays float). A folded per-channel weight would thus change value at load time;
# the DQs of such a kernel are kept only while its data input is a DequantizeLinear's output.
_WEIGHT_REQUANTIZED_AT_LOAD = {"Gemm", "Conv", "ConvTranspose"}


@dataclass
class FoldReport:
    """What :func:`fold_constants` did."""

    folded_nodes: int  # nodes removed from the graph (computed once)
    kept_constant_dq: int  # constant DequantizeLinear nodes left for ORT's integer fusions
    new_initializers: int  # folded tensors the remaining graph reads
    nodes_before: int
    nodes_after: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute)


def constant_nodes(graph: onnx.GraphProto) -> list[bool]:
    """For each node (graph order, which ONNX requires to be topological): does it depend on no graph input?"""
    known = {init.name for init in graph.initializer}
    flags = []
    for node in graph.node:
        constant = (
            node.op_type not in _NONDETERMINISTIC
            and not _has_subgraph(node)
            and all(name == "" or name in known for name in node.input)  # "" = an omitted optional input
        )
        flags.append(constant)
        if constant:
            known.update(node.output)
    return flags


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], names: list[str]) -> dict[str, np.ndarray]:
    """Runs ``nodes`` (all constant) in ONNX Runtime, optimizations off; returns the tensors ``names``."""
    import onnxruntime as ort

    graph = onnx.helper.make_graph(
        nodes,
        "constant_part",
        inputs=[],
        outputs=[onnx.ValueInfoProto(name=name) for name in names],
        initializer=list(model.graph.initializer),
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {}), strict=True))


def fold_constants(model: onnx.ModelProto, keep_dequantize: bool = True) -> tuple[onnx.ModelProto, FoldReport]:
    """A copy of ``model`` with its input-independent nodes replaced by initializers (see the module doc).

    Args:
        model: an ONNX model (float or Q/DQ), nodes in topological order, no external data.
        keep_dequantize: keep a constant DQ (and its layout chain) read by a run-time node, so that ORT
            can still fuse it into an integer kernel. ``False`` folds it too: for a graph ORT has already
            optimized, where a DQ left in place feeds a float kernel and would only run on every frame;
            except the weight / bias DQs of the kernels ORT re-quantizes at load time
            (:data:`_WEIGHT_REQUANTIZED_AT_LOAD`).
    Returns:
        the folded model (same inputs, outputs and opsets; ``onnx.checker`` clean) and a :class:`FoldReport`.
    """
    graph = model.graph
    flags = constant_nodes(graph)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    graph_outputs = {out.name for out in graph.output}

    # A constant DQ feeding a run-time node directly or through layout ops (a weight's DQ -> Transpose ->
    # MatMul) stays with that chain: folding it would hand ORT a float weight and lose the integer kernel.
    dq_rooted = [False] * len(graph.node)
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}

    def requantized_at_load(reader: onnx.NodeProto, name: str) -> bool:
        """``name`` is a weight or bias of ``reader`` that ORT re-quantizes when loading the file."""
        if reader.op_type not in _WEIGHT_REQUANTIZED_AT_LOAD or list(reader.input).index(name) < 1:
            return False
        data = producer.get(reader.input[0])
        return data is not None and graph.node[data].op_type == "DequantizeLinear"

    for index, node in enumerate(graph.node):
        if not flags[index]:
            continue
        if node.op_type == "DequantizeLinear":
            dq_rooted[index] = keep_dequantize or any(
                requantized_at_load(graph.node[i], name) for name in node.output for i in consumers.get(name, [])
            )
        elif node.op_type in _LAYOUT_OPS and node.input and node.input[0] in producer:
            dq_rooted[index] = dq_rooted[producer[node.input[0]]]

    keep = [not constant for constant in flags]
    for index in reversed(range(len(graph.node))):  # consumers before producers
        node = graph.node[index]
        if dq_rooted[index] and any(
            name in graph_outputs or any(keep[i] for i in consumers.get(name, [])) for name in node.output
        ):
            keep[index] = True
    kept_dq = sum(1 for index, node in enumerate(graph.node) if flags[index] and keep[index]
                  and node.op_type == "DequantizeLinear")  # fmt: skip
    folded = [node for node, kept in zip(graph.node, keep, strict=True) if not kept]
    initializer_names = {init.name for init in graph.initializer}
    produced_by_folded = {name for node in folded for name in node.output}
    kept_nodes = [node for node, kept in zip(graph.node, keep, strict=True) if kept]
    needed = sorted(
        {name for node in kept_nodes for name in node.input if name in produced_by_folded}
        | (graph_outputs & produced_by_folded)
    )
    # Evaluate every constant node, the kept DQs too: a kept DQ's output may also feed folded nodes.
    constant = [node for node, flag in zip(graph.node, flags, strict=True) if flag]
    values = _evaluate(model, constant, needed) if needed else {}

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept_nodes)
    referenced = {name for node in kept_nodes for name in node.input} | graph_outputs
    initializers = [init for init in graph.initializer if init.name in referenced]
    initializers += [numpy_helper.from_array(np.asarray(values[name]), name) for name in needed]
    del out.graph.initializer[:]
    out.graph.initializer.extend(initializers)
    # Shapes recorded for tensors that no longer exist would only confuse readers of the graph.
    live = {name for node in kept_nodes for name in node.output}
    value_info = [info for info in graph.value_info if info.name in live]
    del out.graph.value_info[:]
    out.graph.value_info.extend(value_info)
    if initializer_names & set(needed):
        raise AssertionError("a folded tensor has the name of an existing initializer")  # ONNX forbids both
    onnx.checker.check_model(out)
    report = FoldReport(
        folded_nodes=len(folded),
        kept_constant_dq=kept_dq,
        new_initializers=len(needed),
        nodes_before=len(graph.node),
        nodes_after=len(kept_nodes),
    )
    return out, report
