"""What every graph pass of the compile stage shares: the pass type, and the lookups and edits of an ONNX
graph that the passes would otherwise each write again.

A pass is a :class:`GraphPass`: a function ``ModelProto -> (ModelProto, count)`` that returns a rewritten
copy and how many places it changed, plus what that count counts and the ONNX Runtime version the pass was
measured on. :mod:`maptr.deploy.ort_compile` lists the passes in the order they run.

Lookups: who writes a tensor, who reads it, the initializers and a constant's value (:class:`GraphIndex`), a
node's attribute or optional input, the static shapes of the tensors.
Edits: copy a model, replace a node by others or by none (:func:`rebuild_nodes`), remove nodes and let
their readers read another tensor (:func:`bypass`), drop the initializers and shape records that no longer
belong to anything (:func:`prune_initializers`, :func:`prune_value_info`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

Dim = int | str | None  # a static size, a symbolic one, or unknown


@dataclass(frozen=True)
class GraphPass:
    """One rewrite of the compile stage.

    ``run(model)`` returns a rewritten copy of ``model`` (which it leaves as it is) and how many places it
    changed; its name is the pass's key in ``reports/compile.json``'s ``passes``. Most passes work around
    what one ONNX Runtime version's optimizer or CPU kernels do, so each records the version on which it was
    measured to pay off (``measured_on_ort``): on another version, measure it again.
    """

    run: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, int]]
    counts: str  # what the count is, for the report ("ReLUs removed")
    measured_on_ort: str  # onnxruntime.__version__ of the measurements its docstring quotes

    @property
    def name(self) -> str:
        return self.run.__name__


def run_passes(model: onnx.ModelProto, passes: Iterable[GraphPass]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``passes`` applied in order; returns the last one's model and each pass's count by name, in order."""
    counts: dict[str, int] = {}
    for graph_pass in passes:
        model, counts[graph_pass.name] = graph_pass.run(model)
    return model, counts


# --- lookups ---


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (graph inputs and initializers have none)."""
    return {name: node for node in graph.node for name in node.output}


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order (a node reading it twice is listed twice)."""
    read: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            read.setdefault(name, []).append(node)
    return read


class GraphIndex:
    """The lookups of one graph, taken once, before a pass edits it: the initializers by name, who writes a
    tensor (:func:`producers`), who reads it (:func:`readers`), the names of the graph's outputs."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers: dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
        self.producers = producers(graph)
        self.readers = readers(graph)
        self.outputs = {output.name for output in graph.output}  # read outside the graph: values must stay

    def constant(self, name: str) -> np.ndarray | None:
        """The value of tensor ``name`` when it is an initializer, else None (a run-time tensor or no name)."""
        return numpy_helper.to_array(self.initializers[name]) if name in self.initializers else None


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name`` (ints as a list, a string as bytes), ``default`` if unset."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def optional_input(node: onnx.NodeProto, index: int) -> str:
    """The name of ``node``'s input ``index``; "" when it is omitted (ONNX writes a trailing one not at all)."""
    return node.input[index] if len(node.input) > index else ""


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[Dim]]:
    """Tensor name -> shape from ONNX shape inference (symbolic dims as strings, unknown as None)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    shapes: dict[str, list[Dim]] = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
            ]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


# --- edits ---


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, for a pass to edit while its argument stays as it was."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def copy_and_index(model: onnx.ModelProto) -> tuple[onnx.ModelProto, GraphIndex]:
    """A copy of ``model`` for a pass to edit, and the lookups of its graph as it is before any edit."""
    out = copy_model(model)
    return out, GraphIndex(out.graph)


def replace_all(field, items: Iterable) -> None:
    """Sets a repeated protobuf field (``graph.node``, ``graph.initializer``, ...) to ``items``, in order."""
    items = list(items)  # items may be read from the field itself
    del field[:]
    field.extend(items)


def rebuild_nodes(graph: onnx.GraphProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Replaces, in place and in graph order, each node whose first output is a key of ``replacements`` by
    the nodes it maps to (an empty list removes it); the other nodes stay where they are."""
    replace_all(graph.node, [new for node in graph.node for new in replacements.get(node.output[0], [node])])


def bypass(model: onnx.ModelProto, removed: set[str], rewire: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` without the nodes whose first output is in ``removed``, every reader of a tensor
    ``t`` in ``rewire`` reading ``rewire[t]`` instead, and no shape record (value_info) of a removed output."""
    out = copy_model(model)
    kept = [node for node in out.graph.node if node.output[0] not in removed]
    for node in kept:
        for index, name in enumerate(node.input):
            if name in rewire:
                node.input[index] = rewire[name]
    replace_all(out.graph.node, kept)
    replace_all(out.graph.value_info, [info for info in out.graph.value_info if info.name not in removed])
    return out


def prune_initializers(graph: onnx.GraphProto) -> None:
    """Removes, in place, the initializers that no node reads and no graph output is."""
    needed = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    replace_all(graph.initializer, [init for init in graph.initializer if init.name in needed])


def prune_value_info(graph: onnx.GraphProto) -> None:
    """Removes, in place, the shape records of tensors that no node writes any more: a stale record of a
    removed tensor would only mislead a reader of the graph."""
    written = {name for node in graph.node for name in node.output}
    replace_all(graph.value_info, [info for info in graph.value_info if info.name in written])
