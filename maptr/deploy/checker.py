"""Model checker (the guide's ``model_checker``): how ONNX Runtime runs each operator of a quantized MapTR.

For an exported Q/DQ model, ONNX Runtime (CPU provider) optimizes the graph, fusing
``DequantizeLinear -> op -> QuantizeLinear`` groups into integer kernels where it can, and runs it once
with profiling on. Both facts come from ORT itself:

- the optimized graph (``SessionOptions.optimized_model_filepath``): which node each operator became;
- the profiler's per-kernel records: the element types each node actually received. A node counts as
  an integer kernel when its data input (input 0) is an 8- or 16-bit integer tensor (QLinearConv,
  QGemm, QLinearAdd, MatMulIntegerToFloat, an integer MaxPool, ...); ``DequantizeLinear`` nodes and
  kernels reading float (a Conv between DQ and an int16 Q, ``MatMulNBits`` with float activations) do not.

Operators are matched to ONNX nodes through the exporter's ``pkg.torch.onnx.name_scopes`` metadata (the
module path of every node) and ORT's node names (a fused node keeps the name of the node it replaced,
with ``/<FusionName>`` appended).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from torch import Tensor

from maptr.deploy.constant_folding import constant_nodes
from maptr.deploy.ort_runner import session_options
from maptr.quant.quantizer import OperatorInfo

_QDQ = {"QuantizeLinear", "DequantizeLinear"}
# Nodes that only move, select or describe data: not counted as operators of the model.
_DATA_MOVEMENT = {
    "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Shape", "Gather", "Slice", "Concat", "Split",
    "Cast", "Constant", "Identity", "Flatten", "ConstantOfShape", "Range",
}  # fmt: skip
_INTEGER_TYPES = {"uint8", "int8", "uint16", "int16"}


@dataclass
class KernelInfo:
    """One node of ORT's optimized graph, as it ran."""

    name: str
    op_type: str
    inputs: list[str]  # tensor names
    input_types: list[str]  # element types as received at run time ("uint8", "float", ...)
    microseconds: int

    @property
    def integer(self) -> bool:
        return bool(self.input_types) and self.input_types[0] in _INTEGER_TYPES and self.op_type not in _QDQ


@dataclass
class OperatorCheck:
    """One row of the checker's table: a quantized operator or a float one."""

    name: str  # module path in MapTR (quantized operators) or module scope of a float ONNX node
    kind: str  # Conv2d / Linear / Add / ... or the ONNX op type of a float node
    activation_dtype: str  # uint8 / int16 / float
    weight_dtype: str | None  # int8 for convs and linears
    ort_kernels: list[str] = field(default_factory=list)  # op types ORT runs for it
    integer: bool = False  # ORT runs it as an integer kernel
    microseconds: int = 0  # kernel time in the profiled run


@dataclass
class CheckReport:
    operators: list[OperatorCheck]
    float_operators: list[OperatorCheck]
    ort_op_counts: dict[str, int]
    max_abs_diff: dict[str, float]  # ORT vs PyTorch, per output
    optimization_level: str

    def summary(self) -> dict[str, int]:
        ops = self.operators
        return {
            "quantized_operators": len(ops),
            "int16_operators": sum(op.activation_dtype == "int16" for op in ops),
            "integer_kernels": sum(op.integer for op in ops),
            "float_kernels_of_quantized_operators": sum(not op.integer for op in ops),
            "float_operators": len(self.float_operators),
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "optimization_level": self.optimization_level,
            "max_abs_diff_ort_vs_torch": self.max_abs_diff,
            "ort_op_counts": self.ort_op_counts,
            "operators": [asdict(op) for op in self.operators],
            "float_operators": [asdict(op) for op in self.float_operators],
        }


# Suffixes that rewrites append to the name of the node they replace: ORT's layout transformer at level
# `all` ("_token_6"), the compile stage's space-to-depth stem and QGemm rewrites. A fused node keeps its
# source's name before a "/" (ORT's fusions).
_REWRITE_SUFFIX = re.compile(r"(_space_to_depth|_rewritten_(matmul|conv|to_nhwc|to_rows))?(_token_\d+)*$")


def _source_node_name(kernel_name: str) -> str:
    """The exported node an ORT kernel came from, by name (see :data:`_REWRITE_SUFFIX`)."""
    return _REWRITE_SUFFIX.sub("", kernel_name.split("/")[0])


def _module_scopes(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX node name -> module path of the innermost module it came from (MapTR paths, no ``model.``)."""
    scopes = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                names = [s for s in ast.literal_eval(prop.value)[:-1] if s]  # last entry: the op itself
                scopes[node.name] = names[-1].removeprefix("model.") if names else ""
    return scopes


def run_onnx_runtime(
    onnx_path: str | Path, optimized_path: str | Path, inputs: dict[str, np.ndarray], level: str = "extended",
    threads: int = 1, runs: int = 1,
) -> tuple[list[KernelInfo], list[np.ndarray]]:  # fmt: skip
    """Optimizes ``onnx_path`` with ORT (saved to ``optimized_path``), runs it ``runs`` times with profiling.

    Returns the kernels of the optimized graph, in graph order, with the input types they received and
    their mean time per run (the first run included: ORT allocates its buffers then), and the outputs of
    the last run.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    options = session_options(threads, level)
    options.optimized_model_filepath = str(optimized_path)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(optimized_path).with_suffix("")) + "_profile"
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        outputs = session.run(None, inputs)
    profile_path = Path(session.end_profiling())
    events = json.loads(profile_path.read_text())
    profile_path.unlink()
    ran: dict[str, tuple[list[str], int]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            types = [next(iter(entry)) for entry in event["args"].get("input_type_shape", [])]
            name = event["name"].removesuffix("_kernel_time")
            ran[name] = (types, ran.get(name, ([], 0))[1] + int(event.get("dur", 0)))
    ran = {name: (types, round(micros / runs)) for name, (types, micros) in ran.items()}
    kernels = []
    for node in onnx.load(str(optimized_path)).graph.node:
        types, micros = ran.get(node.name, ([], 0))
        kernels.append(KernelInfo(node.name, node.op_type, list(node.input), types, micros))
    return kernels, outputs


def kernel_class(kernel: KernelInfo) -> str:
    """What a kernel of ORT's optimized graph does: "qdq", "data_movement", "integer" or "float" compute."""
    if kernel.op_type in _QDQ:
        return "qdq"
    if kernel.op_type in _DATA_MOVEMENT:
        return "data_movement"
    return "integer" if kernel.integer else "float"


def check_operators(
    exported: onnx.ModelProto, kernels: list[KernelInfo], operators: list[OperatorInfo],
    folded_label: str = "(folded away by ORT)",
) -> tuple[list[OperatorCheck], list[OperatorCheck]]:  # fmt: skip
    """Matches every quantized operator to the ORT kernel(s) it became; lists the remaining float kernels.

    Args:
        exported: the ONNX model as exported (with the exporter's module-path metadata).
        kernels: :func:`run_onnx_runtime`'s kernels of ORT's optimized graph.
        operators: the quantized model's operators (:func:`~maptr.quant.quantizer.quantized_operators`).
        folded_label: the kernel column of an operator that depends on no input and no kernel runs.
    Returns:
        (one row per quantized operator, one row per float compute kernel not belonging to one).
    """
    scopes = _module_scopes(exported)
    source = {kernel.name: _source_node_name(kernel.name) for kernel in kernels}
    # The compute node of operator X lives in the scope "X.module" (QuantWrapper) or "X.op" (QuantizedOp).
    owner: dict[str, str] = {}
    owner_of_output: dict[str, str] = {}  # ORT's channels-blocked float Conv is named "<its output>_nchwc"
    op_inputs: dict[str, set[str]] = {}  # operator -> the tensors its compute nodes read (DQ outputs)
    runs_per_frame: set[str] = set()  # operators with a compute node that depends on the model's inputs
    for node, constant in zip(exported.graph.node, constant_nodes(exported.graph), strict=True):
        base, _, leaf = scopes.get(node.name, "").rpartition(".")
        if leaf in ("module", "op") and node.op_type not in _QDQ | _DATA_MOVEMENT:
            owner[node.name] = base
            owner_of_output.update(dict.fromkeys(node.output, base))
            op_inputs.setdefault(base, set()).update(name for name in node.input if name)
            if not constant:
                runs_per_frame.add(base)
    by_operator: dict[str, list[KernelInfo]] = {op.name: [] for op in operators}
    unowned = []
    for kernel in kernels:
        name = owner.get(source[kernel.name]) or owner_of_output.get(source[kernel.name].removesuffix("_nchwc"))
        if name in by_operator:
            by_operator[name].append(kernel)
        elif kernel.op_type not in _QDQ | _DATA_MOVEMENT:
            unowned.append(kernel)
    # An operator whose node ORT merged into a new one (e.g. residual Add + LayerNorm ->
    # SkipLayerNormalization) is found through the tensors that node reads.
    claimed: set[str] = set()
    for op in operators:
        if not by_operator[op.name] and op.name in op_inputs:
            fused = [kernel for kernel in unowned if op_inputs[op.name] & set(kernel.inputs)]
            by_operator[op.name] = fused
            claimed.update(kernel.name for kernel in fused)
    rows = []
    for op in operators:
        found = by_operator[op.name]
        if op.name not in op_inputs:
            kinds = ["(not in the inference graph)"]  # e.g. the class branch of an auxiliary decoder layer
        else:
            unmatched = "(no kernel matched)" if op.name in runs_per_frame else folded_label
            kinds = [kernel.op_type for kernel in found] or [unmatched]
        rows.append(
            OperatorCheck(
                name=op.name,
                kind=op.kind,
                activation_dtype=op.activation_dtype,
                weight_dtype=op.weight_dtype,
                ort_kernels=kinds,
                integer=any(kernel.integer for kernel in found),
                microseconds=sum(kernel.microseconds for kernel in found),
            )
        )
    unowned = [kernel for kernel in unowned if kernel.name not in claimed]
    float_rows = [
        OperatorCheck(
            name=scopes.get(source[kernel.name]) or "(node created by ORT)",
            kind=kernel.op_type,
            activation_dtype="integer" if kernel.integer else "float",
            weight_dtype=None,
            ort_kernels=[kernel.op_type],
            integer=kernel.integer,
            microseconds=kernel.microseconds,
        )
        for kernel in unowned
    ]
    return rows, float_rows


def check_model(
    onnx_path: str | Path,
    operators: list[OperatorInfo],
    inputs: tuple[Tensor, Tensor],
    reference: tuple[Tensor, Tensor],
    level: str = "extended",
    threads: int = 1,
    run_path: str | Path | None = None,
) -> CheckReport:
    """The full check of an exported model: ORT's kernels per operator and ORT-vs-PyTorch agreement.

    Args:
        onnx_path: the exported model (:func:`~maptr.deploy.onnx_export.export_onnx`).
        operators: the quantized operators of the model that was exported.
        inputs: the (img, lidar2img) to run; reference: PyTorch's (scores, pts) for them.
        level: the ORT optimization level the model is loaded at.
        run_path: the file ORT runs, when not ``onnx_path`` itself: the compile stage's output for that
            export (:func:`~maptr.deploy.ort_compile.optimize_and_save`), so that the table shows the
            kernels the deployed model runs. Operators are still found through ``onnx_path``'s module
            scopes.
    """
    onnx_path = Path(onnx_path)
    ran = Path(run_path) if run_path is not None else onnx_path
    optimized = ran.with_name(ran.stem + f"_ort_{level}.onnx")
    feeds = {"img": inputs[0].numpy(), "lidar2img": inputs[1].numpy()}
    kernels, outputs = run_onnx_runtime(ran, optimized, feeds, level, threads)
    folded = "(folded away by ORT)" if run_path is None else "(constant: computed at compile time)"
    rows, float_rows = check_operators(onnx.load(str(onnx_path)), kernels, operators, folded)
    diff = {
        name: float(np.abs(out - ref.numpy()).max())
        for name, out, ref in zip(("scores", "pts"), outputs, reference, strict=True)
    }
    counts = Counter(kernel.op_type for kernel in kernels)
    described = level if run_path is None else f"{level}, on the compiled file {ran.name}"
    return CheckReport(rows, float_rows, dict(sorted(counts.items())), diff, described)


def format_report(report: CheckReport) -> str:
    """A fixed-width text table of the report (one line per operator), then float kernels by type."""
    lines = [f"{'operator':<58} {'kind':<10} {'act':<6} {'weight':<6} {'ORT kernel':<28} {'integer':<7} {'us':>7}"]
    for op in report.operators:
        lines.append(
            f"{op.name:<58} {op.kind:<10} {op.activation_dtype:<6} {op.weight_dtype or '-':<6} "
            f"{'+'.join(op.ort_kernels):<28.28} {'yes' if op.integer else 'no':<7} {op.microseconds:>7}"
        )
    lines.append("")
    lines.append("float operators (not quantized by design, see maptr.quant.float_set.FLOAT_OPERATIONS):")
    by_type = Counter(op.kind for op in report.float_operators if not op.integer)
    micros = Counter()
    for op in report.float_operators:
        micros[op.kind] += op.microseconds
    for kind, count in sorted(by_type.items()):
        lines.append(f"  {kind:<28} x{count:<4} {micros[kind]:>9} us")
    summary = report.summary()
    lines.append("")
    lines.append(
        f"{summary['quantized_operators']} quantized operators ({summary['int16_operators']} with int16 inputs): "
        f"{summary['integer_kernels']} run as integer kernels in ONNX Runtime ({report.optimization_level}), "
        f"{summary['float_kernels_of_quantized_operators']} as float kernels between Q/DQ; "
        f"max |ORT - torch|: scores {report.max_abs_diff['scores']:.2e}, pts {report.max_abs_diff['pts']:.2e}"
    )
    return "\n".join(lines)
