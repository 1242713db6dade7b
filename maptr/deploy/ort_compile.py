"""Compiling for ONNX Runtime (CPU): optimize the Q/DQ graph once, save it, and measure what it became.

"Compiling" here is graph rewrites run ahead of time (:func:`prepare_for_ort`), then ORT's optimizer:

1. the input-independent part of the graph is computed once
   (:func:`~maptr.deploy.constant_folding.fold_constants`: ORT folds it in a float model but not
   behind a DequantizeLinear);
2. the ReLUs that the uint8 quantization after them already performs are removed
   (:func:`~maptr.deploy.redundant_relu.drop_relus_before_quantize`: left in, they keep linears in float);
3. every uint8 linear gets its int32 bias written here
   (:func:`~maptr.deploy.integer_bias.quantize_float_output_biases`): ORT writes it only for those
   followed by a ``QuantizeLinear``, so the ones whose output stays float ran as float Gemm on
   dequantized inputs;
4. the stem convolution is rewritten over 2x2 blocks
   (:func:`~maptr.deploy.stem_space_to_depth.space_to_depth_stem`: 12 input channels instead of 3 reach
   ORT's fast integer convolution kernel; bit-identical outputs);
5. ORT's own graph optimizer: at ``extended`` level it fuses every ``DequantizeLinear -> op ->
   QuantizeLinear`` group it has an integer kernel for (QLinearConv, QGemm, QLinearAdd, QLinearMatMul,
   ...), folds constants and fuses LayerNorm patterns; the result is written with
   ``SessionOptions.optimized_model_filepath``;
6. ORT's fused integer linears (``QGemm``) move to kernels that add the bias after the integer GEMM
   (:func:`~maptr.deploy.qgemm_kernels.move_qgemm_to_faster_kernels`): a channels-last 1x1
   ``QLinearConv`` where the output is uint8 (bit-identical), ``MatMulIntegerToFloat`` with a float bias
   where it is float (float rounding); QGemm's accumulate-mode bias kept it from using a second thread;
7. the constant DQs ORT left in front of kernels that stay float are folded into float initializers
   (nothing reads their integer grid any more), except the weight and bias DQs of a float ``Gemm`` or
   ``Conv``, which ORT would re-quantize per tensor when loading the file
   (:data:`~maptr.deploy.constant_folding._WEIGHT_REQUANTIZED_AT_LOAD`).

That file is portable across x86 CPUs. Every session of the deployed model loads it at
:data:`~maptr.deploy.ort_runner.DEPLOYED_LEVEL` (``all``): ORT then adds the layouts of the CPU it runs
on (channels-last integer convolutions and max-pool), which it cannot save portably.

The report puts the deployed model beside the float ONNX model: latency percentiles over alternating
rounds (both models see the same machine conditions; one ORT session alive at a time), file size,
operator-type counts of ORT's optimized graph, and how many compute kernels take integer inputs vs
float, from ORT's profiler (:func:`maptr.deploy.checker.run_onnx_runtime`).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from maptr.atomic import atomic_file
from maptr.deploy.checker import LEVELS, KernelInfo, kernel_class, run_onnx_runtime
from maptr.deploy.constant_folding import FoldReport, fold_constants
from maptr.deploy.integer_bias import quantize_float_output_biases
from maptr.deploy.ort_runner import DEPLOYED_LEVEL, SAVED, create_session, run_frame, session_options
from maptr.deploy.qgemm_kernels import QGemmRewrites, move_qgemm_to_faster_kernels
from maptr.deploy.redundant_relu import drop_relus_before_quantize
from maptr.deploy.stem_space_to_depth import space_to_depth_stem

if TYPE_CHECKING:
    import onnxruntime as ort

COMPILE_KEYS = ("latency_ms_p50", "latency_ms_p90", "size_mb", "ops")


@dataclass
class PreparedModel:
    """A Q/DQ model after the rewrites that run before ORT's optimizer, and what each did."""

    model: onnx.ModelProto
    fold: FoldReport  # what the constant folding removed
    relus_removed: int  # ReLUs made redundant by the uint8 quantization after them
    integer_biases: int  # float biases of uint8 linears written as int32 DQs
    space_to_depth_convs: int  # stride-2 integer convolutions on < 4 channels rewritten over 2x2 blocks


@dataclass
class CompiledModel:
    path: Path  # the saved, optimized model
    fold: FoldReport  # what the constant folding removed
    relus_removed: int  # ReLUs made redundant by the uint8 quantization after them
    integer_biases: int  # uint8 linears given an int32 bias, so that the float-output ones run as QGemm too
    space_to_depth_convs: int  # the stem convolution as a 12-channel block convolution (exact)
    qgemm_rewrites: QGemmRewrites  # ORT's QGemm nodes moved to kernels that add the bias after the GEMM
    float_weights_folded: int  # constant DQs ORT left in front of float kernels, folded after its optimizer


def prepare_for_ort(model: onnx.ModelProto) -> PreparedModel:
    """The graph rewrites done before ORT's optimizer: constant folding, redundant ReLUs, integer biases,
    the stem convolution over 2x2 blocks."""
    folded, report = fold_constants(model)
    without_relus, relus = drop_relus_before_quantize(folded)
    with_biases, biases = quantize_float_output_biases(without_relus)
    prepared, stems = space_to_depth_stem(with_biases)
    onnx.checker.check_model(prepared)
    return PreparedModel(prepared, report, relus, biases, stems)


def _ort_optimize(prepared: onnx.ModelProto, path: str | Path, level: str) -> None:
    """ORT's graph optimizations at ``level`` applied to ``prepared``, the result written as ONNX to ``path``."""
    import onnxruntime as ort

    options = session_options(threads=1, level=level)
    options.optimized_model_filepath = str(path)
    # A temporary name has no .onnx / .ort suffix, from which ORT would guess the format.
    options.add_session_config_entry("session.save_model_format", "ONNX")
    ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _after_ort(optimized: onnx.ModelProto) -> tuple[onnx.ModelProto, QGemmRewrites, int]:
    """The rewrites of ORT's optimized graph: QGemm onto faster kernels, then the leftover constant DQs
    folded. Returns the graph, the QGemm rewrites and the number of DQs folded."""
    rewritten, qgemms = move_qgemm_to_faster_kernels(optimized)
    # A constant DQ that ORT could not fuse feeds a float kernel: left in, it dequantizes the same
    # tensor on every frame. Float Gemm / Conv weights keep theirs (see fold_constants).
    folded, leftover = fold_constants(rewritten, keep_dequantize=False)
    return folded, qgemms, leftover.folded_nodes


def optimize_and_save(source: str | Path, target: str | Path, level: str = "extended") -> CompiledModel:
    """:func:`prepare_for_ort`, then ORT's graph optimizations at ``level`` and the rewrites after them,
    saved atomically as ONNX to ``target``.

    Returns:
        the saved file's path and what the graph rewrites did.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    target = Path(target)
    prepared = prepare_for_ort(onnx.load(str(source)))
    with atomic_file(target) as tmp:
        _ort_optimize(prepared.model, tmp, level)
        compiled, qgemms, folded = _after_ort(onnx.load(str(tmp)))
        onnx.save(compiled, str(tmp))
        onnx.checker.check_model(str(tmp))  # what is saved is a loadable, valid model
    return CompiledModel(
        target, prepared.fold, prepared.relus_removed, prepared.integer_biases, prepared.space_to_depth_convs,
        qgemms, folded,
    )  # fmt: skip


def _max_differences(a: ort.InferenceSession, b: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Max |difference| of (scores, pts) between two sessions on ``feeds``."""
    out_a = run_frame(a, feeds["img"], feeds["lidar2img"])
    out_b = run_frame(b, feeds["img"], feeds["lidar2img"])
    return np.array([np.abs(x - y).max() for x, y in zip(out_a, out_b, strict=True)], dtype=np.float64)


@dataclass
class SavedModelCheck:
    """Max |difference| per output (``scores``, ``pts``) of the checks in :func:`outputs_match`."""

    reproduces: dict[str, float]  # worst of the three reproduction checks: 0 unless the file is not the model
    qgemm_rewrite_effect: dict[str, float]  # ORT's own QGemm graph vs the deployed file, both at ORT level all


def outputs_match(
    reference: str | Path, deployed: str | Path, feeds: dict[str, np.ndarray], level: str = "extended"
) -> SavedModelCheck:
    """Whether the saved ``deployed`` file is ``reference`` compiled, and what the QGemm rewrite changes.

    Three reproduction checks, each between runs of the same graph with the same kernels, so anything
    above float rounding means the saved file is not the model that was compiled:

    - :func:`prepare_for_ort` of the Q/DQ model optimized in one go at
      :data:`~maptr.deploy.ort_runner.DEPLOYED_LEVEL` vs the same optimized at the compile ``level``, saved and
      loaded at ``DEPLOYED_LEVEL``: ORT's optimizer survives the save;
    - that saved graph after the post-ORT rewrites, made here in memory, vs the deployed file, both run as
      written (level ``disabled``): the file holds the compiled graph;
    - the deployed file run as written vs loaded at ``DEPLOYED_LEVEL``: what a user who loads the file with
      ORT's defaults runs. This one caught ORT re-quantizing folded float weights at load time (see
      :data:`~maptr.deploy.constant_folding._WEIGHT_REQUANTIZED_AT_LOAD`).

    The QGemm rewrite (:mod:`~maptr.deploy.qgemm_kernels`) is a numerics choice, not a reproduction: the
    float-output linears add their bias after the scale, which moves a value by float rounding and, where
    that value sits on a rounding boundary of a later QuantizeLinear, the code there by one step. Its
    effect is measured against ORT's plain QGemm graph and reported, not checked.
    """
    prepared = prepare_for_ort(onnx.load(str(reference))).model
    with tempfile.TemporaryDirectory() as tmp:
        prepared_path, ort_path, compiled_path = (Path(tmp) / f"{n}.onnx" for n in ("prepared", "ort", "compiled"))
        onnx.save(prepared, str(prepared_path))
        _ort_optimize(prepared, ort_path, level)
        onnx.save(_after_ort(onnx.load(str(ort_path)))[0], str(compiled_path))
        one_go = create_session(prepared_path, threads=1, level=DEPLOYED_LEVEL)
        ort_graph = create_session(ort_path, threads=1, level=DEPLOYED_LEVEL)
        compiled_as_written = create_session(compiled_path, threads=1, level=SAVED)
    saved = create_session(deployed, threads=1, level=SAVED)
    loaded = create_session(deployed, threads=1, level=DEPLOYED_LEVEL)
    worst = np.maximum.reduce([
        _max_differences(one_go, ort_graph, feeds),
        _max_differences(compiled_as_written, saved, feeds),
        _max_differences(saved, loaded, feeds),
    ])  # fmt: skip
    effect = _max_differences(ort_graph, loaded, feeds)
    names = ("scores", "pts")
    return SavedModelCheck(
        {name: float(v) for name, v in zip(names, worst, strict=True)},
        {name: float(v) for name, v in zip(names, effect, strict=True)},
    )


def round_shares(runs: int, rounds: int) -> list[int]:
    """How :func:`alternating_latency` splits ``runs`` timed runs over ``rounds`` rounds (earlier rounds +1)."""
    rounds = min(rounds, runs)
    return [runs // rounds + (1 if index < runs % rounds else 0) for index in range(rounds)]


def alternating_latency(
    models: dict[str, tuple[str | Path, str]],
    feeds: dict[str, np.ndarray],
    threads: int,
    warmup: int,
    runs: int,
    rounds: int = 5,
) -> dict[str, np.ndarray]:
    """Wall-clock milliseconds of ``runs`` runs of each model, in ``rounds`` alternating rounds.

    Each round gives every model a fresh session of its own, ``warmup`` untimed runs, then its share of
    the timed runs (:func:`round_shares`), and closes it before the next model's. One session alive at a
    time matters: after a run, ORT's intra-op worker threads spin-wait for more work, so a second live
    session's pool takes cores from the one being timed (on 2 cores that inflated both models' p50 by ~40
    ms, 45 -> 84 ms, and hid their difference). Many short rounds let the models see the same machine
    conditions (a shared VM's speed drifts by tens of percent within a minute), and the order within a
    round alternates so that neither model always runs right after a session start.

    Args:
        models: name -> (path, load-time optimization level).
        feeds: one frame's inputs (img, lidar2img).
    Returns:
        name -> (runs,) milliseconds, round by round.
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"runs and rounds must be >= 1 and warmup >= 0, got {runs}, {rounds}, {warmup}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index, share in enumerate(round_shares(runs, rounds)):
        order = list(models.items())
        for name, (path, level) in order if round_index % 2 == 0 else reversed(order):
            session = create_session(path, threads, level)
            for _ in range(warmup):
                run_frame(session, feeds["img"], feeds["lidar2img"])
            for _ in range(share):
                start = time.perf_counter()
                run_frame(session, feeds["img"], feeds["lidar2img"])
                times[name].append((time.perf_counter() - start) * 1e3)
            del session  # its thread pool goes with it: nothing spins beside the next model's runs
    return {name: np.asarray(values) for name, values in times.items()}


@dataclass
class OpTable:
    """Operator figures of one model as ORT runs it (its optimized graph, profiled)."""

    op_counts: dict[str, int]  # op type -> nodes in the optimized graph
    kernel_classes: dict[str, int]  # integer / float / qdq / data_movement -> nodes
    microseconds_by_op: dict[str, int]  # op type (with input type) -> profiled time per run

    def to_dict(self) -> dict:
        return {
            "op_counts": self.op_counts,
            "integer_kernels": self.kernel_classes.get("integer", 0),
            "float_kernels": self.kernel_classes.get("float", 0),
            "qdq_nodes": self.kernel_classes.get("qdq", 0),
            "data_movement_nodes": self.kernel_classes.get("data_movement", 0),
            "microseconds_by_op": self.microseconds_by_op,
        }


def op_table(kernels: list[KernelInfo]) -> OpTable:
    """Counts and profiled times of :func:`~maptr.deploy.checker.run_onnx_runtime`'s kernels."""
    counts = Counter(kernel.op_type for kernel in kernels)
    classes = Counter(kernel_class(kernel) for kernel in kernels)
    micros: Counter[str] = Counter()
    for kernel in kernels:
        dtype = kernel.input_types[0] if kernel.input_types else "-"
        micros[f"{kernel.op_type} ({dtype})"] += kernel.microseconds
    return OpTable(dict(sorted(counts.items())), dict(classes), dict(micros.most_common()))


def profile_ops(path: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int, level: str) -> OpTable:
    """:class:`OpTable` of ``path`` loaded at ``level``, as its latency session loads it."""
    with tempfile.TemporaryDirectory() as tmp:
        kernels, _ = run_onnx_runtime(path, Path(tmp) / "profiled.onnx", feeds, level, threads, runs)
    return op_table(kernels)


def model_figures(latency_ms: np.ndarray, path: str | Path, table: OpTable) -> dict:
    """One model's entry of ``reports/compile.json``: the documented keys plus the op details."""
    return {
        "latency_ms_p50": float(np.percentile(latency_ms, 50)),
        "latency_ms_p90": float(np.percentile(latency_ms, 90)),
        "latency_ms_min": float(latency_ms.min()),
        "size_mb": Path(path).stat().st_size / 2**20,
        "ops": table.to_dict(),
    }


def latency_summary(times: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """p50 of the float and deployed models from :func:`alternating_latency`'s times, and their ratio.

    Also the spread of the ratio between rounds (deployed median / float median of each round, its
    quartiles): how much the machine's drift moves the figure.
    """
    float_p50, deployed_p50 = (float(np.percentile(times[name], 50)) for name in ("float", "deployed"))
    bounds = np.cumsum([0, *round_shares(len(times["float"]), rounds)])
    per_round = [
        np.median(times["deployed"][start:stop]) / np.median(times["float"][start:stop])
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    q25, q50, q75 = (float(np.percentile(per_round, q)) for q in (25, 50, 75))
    return {
        "float_ms_p50": float_p50,
        "deployed_ms_p50": deployed_p50,
        "deployed_over_float": deployed_p50 / float_p50,
        "round_ratio_p25": q25,
        "round_ratio_p50": q50,
        "round_ratio_p75": q75,
    }


def compile_markdown(report: dict, top: int = 12) -> str:
    """The readable table of a compile report: figures side by side, then where the time goes."""
    float_, deployed = report["float"], report["deployed"]
    lines = [
        f"# Compile report: {report['deployed_model']} vs {report['float_model']}",
        "",
        f"ONNX Runtime {report['onnxruntime']} CPU, {report['threads']} intra-op thread(s), "
        f"{report['runs']} timed runs per model in {report.get('rounds', 1)} alternating rounds (one session alive "
        f"at a time, {report['warmup']} untimed runs per session); load average "
        f"{report['load_average']}; graph optimizations saved at `{report['optimization_level']}`.",
        "",
        "| | float ONNX | deployed (Q/DQ, optimized) |",
        "|---|---|---|",
        f"| latency p50 (ms) | {float_['latency_ms_p50']:.1f} | {deployed['latency_ms_p50']:.1f} |",
        f"| latency p90 (ms) | {float_['latency_ms_p90']:.1f} | {deployed['latency_ms_p90']:.1f} |",
        f"| latency min (ms) | {float_['latency_ms_min']:.1f} | {deployed['latency_ms_min']:.1f} |",
        f"| size (MB) | {float_['size_mb']:.2f} | {deployed['size_mb']:.2f} |",
        f"| integer compute kernels | {float_['ops']['integer_kernels']} | {deployed['ops']['integer_kernels']} |",
        f"| float compute kernels | {float_['ops']['float_kernels']} | {deployed['ops']['float_kernels']} |",
        f"| Q / DQ nodes left | {float_['ops']['qdq_nodes']} | {deployed['ops']['qdq_nodes']} |",
        "",
        f"Speed-up (p50 float / p50 deployed): **{report['speedup_p50']:.2f}x** "
        f"(deployed / float = {1 / report['speedup_p50']:.2f}).",
        "",
    ]
    paired = report.get("by_threads", {}).get(str(report["threads"]), {})
    if "round_ratio_p50" in paired:
        lines += [
            f"Deployed / float paired by round (the median of the per-round ratios, robust to the machine's "
            f"drift during the run): **{paired['round_ratio_p50']:.2f}** (p25 - p75: "
            f"{paired['round_ratio_p25']:.2f} - {paired['round_ratio_p75']:.2f}). When the machine changes speed "
            "during the run, the two models' p50s can come from different mixtures of its states, and this is "
            "the figure to read.",
            "",
        ]
    lines += [
        f"Maximum |saved deployed model - in-memory compilation| per output: {report['saved_model_check']}. "
        f"Effect of moving ORT's QGemm nodes to faster kernels (max |difference| against ORT's own QGemm graph; "
        f"the float-output linears add their bias after the scale): {report.get('qgemm_rewrite_effect', '-')}.",
        "",
    ]
    sweep = report.get("by_threads")
    if sweep:
        lines += [
            "| threads | float p50 (ms) | deployed p50 (ms) | p50 ratio | per-round ratio: median (p25 - p75) |",
            "|---|---|---|---|---|",
        ]
        for threads, row in sweep.items():
            spread = "-"
            if "round_ratio_p25" in row:
                spread = f"{row['round_ratio_p50']:.2f} ({row['round_ratio_p25']:.2f} - {row['round_ratio_p75']:.2f})"
            lines.append(f"| {threads} | {row['float_ms_p50']:.1f} | {row['deployed_ms_p50']:.1f} | "
                         f"{row['deployed_over_float']:.2f} | {spread} |")  # fmt: skip
        lines += [
            "",
            "Per-round ratio: the deployed median over the float median of each alternating round; its quartiles "
            "show how far the machine's drift moves the ratio between rounds a few seconds apart.",
            "",
        ]
    fold = report.get("constant_folding")
    qgemm = report.get("qgemm_rewrites", {})
    if fold:
        lines += [
            f"Constant folding before ORT's optimizer: {fold['folded_nodes']} of the Q/DQ graph's "
            f"{fold['nodes_before']} nodes depend on no input and were computed once ({fold['new_initializers']} "
            f"tensors; {fold['kept_constant_dq']} constant DequantizeLinear kept for the integer fusions). "
            f"ReLUs made redundant by the uint8 quantization after them, removed: {report.get('relus_removed', 0)}. "
            f"uint8 linears given an int32 bias before ORT's optimizer (so that those with a float output "
            f"run as QGemm too): "
            f"{report.get('integer_biases', 0)}. "
            f"Stride-2 integer convolutions on < 4 channels rewritten over 2x2 blocks (space-to-depth, exact): "
            f"{report.get('space_to_depth_convs', 0)}. "
            f"ORT's QGemm nodes moved to kernels that add the bias after the integer GEMM: "
            f"{qgemm.get('to_channels_last_conv', 0)} to a channels-last 1x1 QLinearConv (uint8 output, exact), "
            f"{qgemm.get('to_matmul_integer_to_float', 0)} to MatMulIntegerToFloat (float output). "
            f"Constant DQs left in front of float kernels by ORT, folded: {report.get('float_weights_folded', 0)}. "
            f"Deployed sessions load the saved file at ORT level `{report.get('deployed_load_level', 'disabled')}`.",
            "",
        ]
    for name, entry in (("float", float_), ("deployed", deployed)):
        micros = entry["ops"]["microseconds_by_op"]
        total = max(sum(micros.values()), 1)
        lines += [f"## Where the time goes: {name} (profiled, per run)", "", "| op (input type) | us | share |",
                  "|---|---|---|"]  # fmt: skip
        for op, us in list(micros.items())[:top]:
            lines.append(f"| {op} | {us} | {100 * us / total:.1f}% |")
        lines.append("")
    lines += ["## Operator types in the optimized graphs", "", "| op type | float | deployed |", "|---|---|---|"]
    for op in sorted(set(float_["ops"]["op_counts"]) | set(deployed["ops"]["op_counts"])):
        lines.append(f"| {op} | {float_['ops']['op_counts'].get(op, 0)} | {deployed['ops']['op_counts'].get(op, 0)} |")
    return "\n".join(lines) + "\n"
