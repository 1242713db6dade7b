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

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from maptr.deploy.onnx_graph import GraphIndex, GraphPass, copy_model, prune_initializers, prune_value_info, replace_all
from maptr.deploy.ort_runner import SAVED, session_options

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
    graph = onnx.helper.make_graph(
        nodes,
        "constant_part",
        inputs=[],
        outputs=[onnx.ValueInfoProto(name=name) for name in names],
        initializer=list(model.graph.initializer),
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # Each node as written (no optimizer): the reference semantics, which the fake-quant model computes.
    options = session_options(threads=1, level=SAVED)
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {}), strict=True))


def fold_constants(model: onnx.ModelProto, keep_dequantize: bool = True) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with its input-independent nodes replaced by initializers (see the module doc).

    Args:
        model: an ONNX model (float or Q/DQ), nodes in topological order, no external data.
        keep_dequantize: keep a constant DQ (and its layout chain) read by a run-time node, so that ORT
            can still fuse it into an integer kernel. ``False`` folds it too: for a graph ORT has already
            optimized (:func:`~maptr.deploy.leftover_dequantize.fold_leftover_dequantize`), except the
            weight / bias DQs of the kernels ORT re-quantizes at load time (:data:`_WEIGHT_REQUANTIZED_AT_LOAD`).
    Returns:
        the folded model (same inputs, outputs and opsets; ``onnx.checker`` clean) and the number of nodes
        removed (computed once).
    """
    graph = model.graph
    nodes = list(graph.node)  # holds one wrapper per node, so that id() names a node below
    constant = {id(node) for node, flag in zip(nodes, constant_nodes(graph), strict=True) if flag}
    index = GraphIndex(graph)

    def requantized_at_load(reader: onnx.NodeProto, name: str) -> bool:
        """``name`` is a weight or bias of ``reader`` that ORT re-quantizes when loading the file."""
        if reader.op_type not in _WEIGHT_REQUANTIZED_AT_LOAD or list(reader.input).index(name) < 1:
            return False
        data = index.producers.get(reader.input[0])
        return data is not None and data.op_type == "DequantizeLinear"

    # A constant DQ feeding a run-time node directly or through layout ops (a weight's DQ -> Transpose ->
    # MatMul) stays with that chain: folding it would hand ORT a float weight and lose the integer kernel.
    dq_rooted: set[int] = set()
    for node in nodes:
        if id(node) not in constant:
            continue
        if node.op_type == "DequantizeLinear":
            if keep_dequantize or any(
                requantized_at_load(reader, name) for name in node.output for reader in index.readers.get(name, [])
            ):
                dq_rooted.add(id(node))
        elif node.op_type in _LAYOUT_OPS and node.input:
            source = index.producers.get(node.input[0])
            if source is not None and id(source) in dq_rooted:
                dq_rooted.add(id(node))

    kept = {id(node) for node in nodes if id(node) not in constant}
    for node in reversed(nodes):  # readers before the nodes they read
        if id(node) in dq_rooted and any(
            name in index.outputs or any(id(reader) in kept for reader in index.readers.get(name, []))
            for name in node.output
        ):
            kept.add(id(node))
    folded = [node for node in nodes if id(node) not in kept]
    kept_nodes = [node for node in nodes if id(node) in kept]
    produced_by_folded = {name for node in folded for name in node.output}
    needed = sorted(
        {name for node in kept_nodes for name in node.input if name in produced_by_folded}
        | (index.outputs & produced_by_folded)
    )
    if set(index.initializers) & set(needed):
        raise AssertionError("a folded tensor has the name of an existing initializer")  # ONNX forbids both
    # Evaluate every constant node, the kept DQs too: a kept DQ's output may also feed folded nodes.
    values = _evaluate(model, [node for node in nodes if id(node) in constant], needed) if needed else {}

    out = copy_model(model)
    replace_all(out.graph.node, kept_nodes)
    prune_initializers(out.graph)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(values[name]), name) for name in needed)
    prune_value_info(out.graph)
    onnx.checker.check_model(out)
    return out, len(folded)


PASS = GraphPass(fold_constants, counts="input-independent nodes computed once", measured_on_ort="1.32.0")
