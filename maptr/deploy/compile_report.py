"""What the compile stage measures: the deployed model beside the float ONNX model.

Latency percentiles over alternating rounds (both models see the same machine conditions; one ORT
session alive at a time), and the median of the per-round ratios, robust to the machine's drift; file
size, operator-type counts of ORT's optimized graph, and how many compute kernels take integer inputs vs
float, from ORT's profiler (:func:`maptr.deploy.checker.run_onnx_runtime`); and the readable table of
``reports/compile.json`` (with what each compile pass changed).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maptr.deploy.checker import KernelInfo, kernel_class, run_onnx_runtime
from maptr.deploy.ort_runner import create_session, run_frame

COMPILE_KEYS = ("latency_ms_p50", "latency_ms_p90", "size_mb", "ops")


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
    passes = report.get("passes", {})
    if passes:
        lines += [
            "## Compile passes (`maptr/deploy/ort_compile.py`, in the order they ran)",
            "",
            "| step | pass | runs | count | what it counts | measured on ORT |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in passes.items():
            lines.append(f"| {entry['step']} | `{name}` | {entry['runs']} | {entry['count']} | {entry['counts']} | "
                         f"{entry['measured_on_ort']} |")  # fmt: skip
        # A pass works around what one ORT version does: on another, its gain and exactness are unproven.
        other = [name for name, entry in passes.items() if entry["measured_on_ort"] != report["onnxruntime"]]
        if other:
            lines += ["", f"Measured on another ORT version than this run's {report['onnxruntime']}, to measure "
                          f"again: {', '.join(other)}."]  # fmt: skip
        lines += [
            "",
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
