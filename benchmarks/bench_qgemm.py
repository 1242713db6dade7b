"""MapTR's linears on ONNX Runtime: integer QGemm vs float Gemm, at 1 and 2 threads.

    python benchmarks/bench_qgemm.py
    python benchmarks/bench_qgemm.py --rounds 40 --runs 20

nano's transformer runs its linears on a few hundred to ~2000 rows of 64 or 128 channels (the BEV
queries: 50 x 25 = 1250, the decoder's 500 point queries, the 1800 visible camera pairs). The script
times single-node graphs of those shapes as the compile stage produces them, at ORT level `all`:

- ``DQ(x uint8) -> MatMul(DQ(W int8, per channel)) -> Add(DQ(int32 bias)) -> Q``, which ORT fuses into
  one ``QGemm`` with a uint8 output;
- the same without the final Q (``QGemm`` with a float output: the linears read by float operators);
- the float ``MatMul + Add`` (ORT's ``Gemm``);
- the two QGemm after the compile stage's rewrite (:mod:`maptr.deploy.qgemm_kernels`): the uint8-output
  one as a channels-last 1x1 ``QLinearConv``, the float-output one as ``MatMulIntegerToFloat`` with a
  float bias. ORT's QGemm adds its int32 bias in MLAS's accumulate mode, which gains nothing from a
  second thread; these two kernels add it after the GEMM.

Each shape and thread count is timed in ``--rounds`` alternating rounds of ``--runs`` runs (one session
alive at a time), median per round, then the median over rounds; the session's run overhead (~10 us) is
included, as it is for every node of the model.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy.qgemm_kernels import move_qgemm_to_faster_kernels

SHAPES = [(500, 64, 64), (1250, 64, 64), (1250, 64, 128), (1800, 64, 64)]  # (rows, in, out) of nano's linears


def _model(rows: int, k: int, n: int, kind: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    if kind == "float":
        inits = [numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w"),
                 numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b")]  # fmt: skip
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        inits = [
            numpy_helper.from_array(rng.integers(-60, 60, (k, n)).astype(np.int8), "w"),
            numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
            numpy_helper.from_array(rng.integers(-1000, 1000, n).astype(np.int32), "b"),
            numpy_helper.from_array(np.full(n, 0.0005, np.float32), "b_scale"),
        ]
        nodes = [
            helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"]),
            helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=1),
            helper.make_node("DequantizeLinear", ["b", "b_scale"], ["bf"], axis=0),
            helper.make_node("MatMul", ["xf", "wf"], ["m"]),
            helper.make_node("Add", ["m", "bf"], ["y" if kind == "qgemm_float_out" else "yf"]),
        ]
        x_type, y_type = TensorProto.UINT8, TensorProto.FLOAT
        if kind == "qgemm":
            inits += [numpy_helper.from_array(np.array(0.04, np.float32), "y_scale"),
                      numpy_helper.from_array(np.array(128, np.uint8), "y_zero")]  # fmt: skip
            nodes.append(helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["y"]))
            y_type = TensorProto.UINT8
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", x_type, [rows, k])],
        [helper.make_tensor_value_info("y", y_type, [rows, n])], initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _extended(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's graph of ``model`` after its ``extended`` optimizations (where the Q/DQ fusions happen)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(f"{tmp}/optimized.onnx")


def _compiled(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as the compile stage saves it: ORT's ``extended`` optimizations, then the QGemm rewrite."""
    return move_qgemm_to_faster_kernels(_extended(model))[0]


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _fused_ops(model: onnx.ModelProto) -> list[str]:
    """The node types ORT makes of ``model``: checked, so that each row times the kernel it names."""
    return [node.op_type for node in _extended(model).graph.node]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    kinds = ("qgemm", "channels_last_conv", "qgemm_float_out", "matmul_integer_to_float", "float")
    rewritten = {"channels_last_conv": ("qgemm", "QLinearConv"), "matmul_integer_to_float": ("qgemm_float_out",
                 "MatMulIntegerToFloat")}  # fmt: skip
    print(f"median over {args.rounds} alternating rounds of {args.runs} runs, microseconds per run")
    print(f"{'rows x in x out':>16} | " + " | ".join(f"{k + ', 1 / 2 thr':>30}" for k in kinds))
    for rows, k, n in SHAPES:
        models = {kind: _model(rows, k, n, kind) for kind in kinds if kind not in rewritten}
        for kind, model in models.items():
            ops = _fused_ops(model)
            if ("QGemm" in ops) != kind.startswith("qgemm") or len(ops) != 1:
                raise SystemExit(f"{kind} {rows}x{k}x{n}: ORT made {ops}, not one {kind} kernel")
        for kind, (source, op) in rewritten.items():
            models[kind] = _compiled(models[source])
            if op not in [node.op_type for node in models[kind].graph.node]:
                raise SystemExit(f"{kind} {rows}x{k}x{n}: the rewrite made no {op}")
        models = {kind: models[kind] for kind in kinds}
        rng = np.random.default_rng(1)
        feeds = {
            "qgemm": rng.integers(0, 256, (rows, k)).astype(np.uint8),
            "float": rng.normal(size=(rows, k)).astype(np.float32),
        }
        medians: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for threads in (1, 2):
                for kind, model in models.items():
                    session = _session(model, threads)
                    x = feeds["float" if kind == "float" else "qgemm"]
                    for _ in range(5):
                        session.run(None, {"x": x})
                    times = []
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        session.run(None, {"x": x})
                        times.append(time.perf_counter() - start)
                    medians.setdefault((kind, threads), []).append(float(np.median(times)) * 1e6)
                    del session
        cells = []
        for kind in kinds:
            one, two = (np.median(medians[(kind, t)]) for t in (1, 2))
            cells.append(f"{one:7.1f} / {two:6.1f} ({one / two:4.2f}x)")
        print(f"{f'{rows} x {k} x {n}':>16} | " + " | ".join(f"{c:>30}" for c in cells))


if __name__ == "__main__":
    main()
