"""ONNX Runtime CPU kernels behind compile steps 9-11, timed on one-node graphs of MapTR's shapes (nano).

    python benchmarks/bench_ort_kernels.py --threads 2      # and --threads 1
    python benchmarks/bench_ort_kernels.py --threads 2 --float-rewritten --runs 100   # after dvc repro

Layer norm (step 9): ORT's fused ``SkipLayerNormalization`` against ``Sum -> LayerNormalization`` (what
the compile stage writes) and ``Add -> LayerNormalization`` (which ORT fuses again at level ``all``), on
the encoder's (1, 1250, 64) and the decoder's (1, 500, 64) tokens.

Broadcasts (step 11): the element-wise nodes of deformable attention that broadcast in short runs, as
exported (ORT's broadcast) and with the small input expanded first (``Expand`` + an operator on equal
shapes), plus a long-run broadcast that the rewrite leaves alone.

``--float-rewritten``: the float ONNX model given the same float-kernel rewrites as the deployed one
(ORT's ``extended`` optimizations saved, then steps 9-11), timed in alternating rounds beside the float
model and the deployed model: how much of the deployed / float ratio those rewrites alone explain.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repository

_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _median_us(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = _ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()]
    graph = helper.make_graph(
        nodes, "bench", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def layer_norms(threads: int, runs: int) -> None:
    rng = np.random.default_rng(0)
    params = {"gamma": rng.uniform(0.5, 1.5, 64).astype(np.float32), "beta": rng.normal(size=64).astype(np.float32)}
    variants = {
        "SkipLayerNormalization": [
            helper.make_node(
                "SkipLayerNormalization", ["x", "s", "gamma", "beta"], ["y"], domain="com.microsoft", epsilon=1e-5
            )
        ],  # fmt: skip
        "Sum + LayerNormalization": [
            helper.make_node("Sum", ["x", "s"], ["t"]),
            helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
        ],  # fmt: skip
        "Add + LayerNormalization": [
            helper.make_node("Add", ["x", "s"], ["t"]),
            helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
        ],  # fmt: skip
    }
    for rows in (1250, 500):
        shape = [1, rows, 64]
        feeds = {name: rng.normal(size=shape).astype(np.float32) for name in ("x", "s")}
        line = ", ".join(
            f"{name} {_median_us(_model(nodes, {'x': shape, 's': shape}, params), feeds, threads, runs):.0f} us"
            for name, nodes in variants.items()
        )
        print(f"layer norm (1, {rows}, 64), {threads} thread(s): {line}")


# (op, small input's shape, full input's shape, small input constant): nano's nodes, SCA pairs = 1342.
_BROADCASTS = [
    ("Add", [1342, 1, 1, 4, 2], [1342, 4, 2, 4, 2], False),  # SCA: reference points + offsets, runs of 8
    ("Add", [1, 500, 1, 1, 1, 2], [1, 500, 4, 1, 4, 2], False),  # decoder: reference + offsets, runs of 2
    ("Div", [1, 1, 1, 1, 1, 1, 2], [1, 1, 500, 4, 1, 4, 2], True),  # decoder: offsets / (W, H), runs of 2
    ("Mul", [4, 1, 1342, 8], [4, 16, 1342, 8], False),  # SCA: samples x weights, runs of 10736: left alone
]


def broadcasts(threads: int, runs: int) -> None:
    rng = np.random.default_rng(0)
    for op, small, full, constant in _BROADCASTS:
        value = rng.uniform(1, 2, small).astype(np.float32)
        feeds = {"full": rng.normal(size=full).astype(np.float32)}
        inputs = {"full": full}
        inits: dict[str, np.ndarray] = {}
        if constant:
            inits["small"] = value
        else:
            feeds["small"] = value
            inputs["small"] = small
        plain = _model([helper.make_node(op, ["full", "small"], ["y"])], inputs, inits)
        if constant:  # stored expanded, as the compile stage does for a constant
            expanded = _model([helper.make_node(op, ["full", "small"], ["y"])], inputs,
                              {"small": np.ascontiguousarray(np.broadcast_to(value, full))})  # fmt: skip
        else:
            nodes = [
                helper.make_node("Shape", ["full"], ["shape"]),
                helper.make_node("Expand", ["small", "shape"], ["big"]),
                helper.make_node(op, ["full", "big"], ["y"]),
            ]
            expanded = _model(nodes, inputs, inits)
        before = _median_us(plain, feeds, threads, runs)
        after = _median_us(expanded, feeds, threads, runs)
        print(f"{op} {small} -> {full}, {threads} thread(s): broadcast {before:.0f} us, expanded {after:.0f} us "
              f"({before / after:.1f}x)")  # fmt: skip


def float_rewritten(args: argparse.Namespace) -> None:
    from maptr.deploy.compile_report import alternating_latency, latency_summary
    from maptr.deploy.ort_compile import ort_optimize
    from maptr.deploy.ort_runner import DEPLOYED_LEVEL
    from maptr.deploy.reshape_chains import collapse_reshape_chains
    from maptr.deploy.skip_layer_norm import split_skip_layer_norms
    from maptr.deploy.small_broadcasts import expand_short_run_broadcasts
    from pipeline.compile import frame_inputs

    feeds = frame_inputs(args.qdq)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "float_extended.onnx"
        ort_optimize(onnx.load(args.float_model), optimized, "extended")
        model, norms = split_skip_layer_norms(onnx.load(str(optimized)))
        model, reshapes = collapse_reshape_chains(model)
        model, expanded = expand_short_run_broadcasts(model)
        rewritten = Path(tmp) / "float_rewritten.onnx"
        onnx.save(model, str(rewritten))
        print(f"float model rewritten: {norms} skip layer norms split, {reshapes} reshape nodes removed, "
              f"{expanded} broadcasts expanded")  # fmt: skip
        models = {"float": (args.float_model, "all"), "float rewritten": (rewritten, "all"),
                  "deployed": (args.deployed, DEPLOYED_LEVEL)}  # fmt: skip
        times = alternating_latency(models, feeds, args.threads, 5, args.runs, args.rounds)
    print(f"{args.threads} thread(s), {args.runs} runs in {args.rounds} alternating rounds, load {os.getloadavg()}")
    for name, ms in times.items():
        print(f"  {name:<16} min {ms.min():6.2f}  p50 {np.median(ms):6.2f}  p90 {np.percentile(ms, 90):6.2f} ms")
    for baseline in ("float", "float rewritten"):
        pair = {"float": times[baseline], "deployed": times["deployed"]}
        summary = latency_summary(pair, args.rounds)
        print(f"  deployed / {baseline}: {summary['deployed_over_float']:.3f} "
              f"(per-round median {summary['round_ratio_p50']:.3f})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=300, help="timed runs per one-node graph (per model with "
                   "--float-rewritten)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=25, help="with --float-rewritten: alternating rounds")
    p.add_argument("--float-rewritten", action="store_true", help="time the float model with steps 9-11 too")
    p.add_argument("--float", dest="float_model", default="models/maptr_float.onnx")
    p.add_argument("--qdq", default="models/maptr_qdq.onnx", help="the exported Q/DQ model (for the example frame)")
    p.add_argument("--deployed", default="models/maptr_deploy.onnx")
    args = p.parse_args()
    if args.float_rewritten:
        float_rewritten(args)
        return
    layer_norms(args.threads, args.runs)
    broadcasts(args.threads, args.runs)


if __name__ == "__main__":
    main()
