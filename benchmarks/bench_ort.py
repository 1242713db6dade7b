"""ONNX Runtime deployment: float ONNX vs deployed (Q/DQ optimized) latency, and the r50 preset's export.

    python benchmarks/bench_ort.py --threads 1 --runs 30          # the default preset's models (after dvc repro)
    python benchmarks/bench_ort.py --threads 2 --runs 30
    python benchmarks/bench_ort.py --r50                          # untrained r50: export float + Q/DQ, timed
    python benchmarks/bench_ort.py --threads 2 --camera-paths     # exported camera attention: visible vs dense
    python benchmarks/bench_ort.py --threads 2 --bound            # profiled conv share and the int latency bound
    python benchmarks/bench_ort.py --threads 2 --as-saved         # + the deployed file loaded without load-time layouts

Latency: models/maptr_float.onnx (ORT's default optimizations, `all`) and models/maptr_deploy.onnx (saved
at the compile level, loaded at ORT level `all` as every deployed session is) run in alternating rounds on
the same random frame; prints
min / median / p90 and the ratio. `--r50` builds the untrained r50 preset (800x480, ResNet50, BEV 200x100),
exports it as float ONNX, then quantizes it (all 8-bit, calibrated on one random frame) and exports the
Q/DQ graph, printing each step's time and the files' sizes; then compiles the Q/DQ graph as the compile
stage does and times float vs deployed (`--r50-runs` runs each, one warm-up; several minutes in all).
`--camera-paths` exports the float and QAT checkpoints of the default run twice, with the spatial
cross-attention's visible-pairs path (what the export stage writes) and with its dense, masked path (what
it wrote before 2026-11-25), compiles both Q/DQ graphs and times the four models alike. `--bound` profiles
both models of the default run (ORT's profiler, `--runs` runs) and splits their kernel time into
convolutions and the rest: how much faster the integer convolutions are, and the deployed / float ratio
if every convolution ran at that speed-up and nothing else changed (no Q/DQ cost at all).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maptr.config import load_model_config, load_params
from maptr.deploy.compile_report import alternating_latency, latency_summary
from maptr.deploy.onnx_export import check_onnx_file, example_inputs, export_onnx
from maptr.deploy.ort_runner import DEPLOYED_LEVEL, SAVED
from maptr.models.maptr import build_maptr
from maptr.quant.calibration import calibrate
from maptr.quant.quantizer import QuantConfig, quantize_model


def time_models(args: argparse.Namespace, models: dict[str, tuple[str | Path, str]]) -> dict[str, np.ndarray]:
    """Times ``models`` on the preset's example frame (:func:`alternating_latency`) and prints each one's figures."""
    cfg = load_model_config(load_params(args.params))
    img, lidar2img = example_inputs(build_maptr(cfg))
    feeds = {"img": img.numpy(), "lidar2img": lidar2img.numpy()}
    times = alternating_latency(models, feeds, args.threads, args.warmup, args.runs, args.rounds)
    print(f"{args.threads} thread(s), {args.runs} runs in {args.rounds} alternating rounds, load {os.getloadavg()}")
    for name, ms in times.items():
        print(f"  {name:<17} min {ms.min():6.1f}  p50 {np.median(ms):6.1f}  p90 {np.percentile(ms, 90):6.1f} ms")
    if {"float", "deployed"} <= set(times):
        summary = latency_summary(times, args.rounds)
        quartiles = ", ".join(f"p{q} {summary[f'round_ratio_p{q}']:.3f}" for q in (25, 50, 75))
        print(f"  deployed / float {summary['deployed_over_float']:.3f} (per-round ratio {quartiles})")
    return times


def latency(args: argparse.Namespace) -> None:
    models = {"float": (args.float_model, "all"), "deployed": (args.deployed, DEPLOYED_LEVEL)}
    if args.as_saved:
        models["deployed as saved"] = (args.deployed, SAVED)  # no load-time layouts: NCHW integer kernels
    times = time_models(args, models)
    print(f"  deployed / float of the minima: {times['deployed'].min() / times['float'].min():.2f}")


def latency_bound(args: argparse.Namespace) -> None:
    from maptr.deploy.checker import run_onnx_runtime

    cfg = load_model_config(load_params(args.params))
    img, lidar2img = example_inputs(build_maptr(cfg))
    feeds = {"img": img.numpy(), "lidar2img": lidar2img.numpy()}
    convs, totals = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, level in (("float", args.float_model, "all"), ("deployed", args.deployed, DEPLOYED_LEVEL)):
            kernels, _ = run_onnx_runtime(path, Path(tmp) / f"{name}.onnx", feeds, level, args.threads, args.runs)
            # (op type, ms) of each convolution in graph order: both graphs keep the backbone's order
            convs[name] = [(k.op_type, k.microseconds / 1e3) for k in kernels if k.op_type in ("Conv", "QLinearConv")]
            totals[name] = sum(k.microseconds for k in kernels) / 1e3
            conv_ms = sum(ms for _, ms in convs[name])
            n_int = sum(op == "QLinearConv" for op, _ in convs[name])
            print(f"{name:<9} profiled {totals[name]:5.1f} ms: {len(convs[name])} convolutions {conv_ms:5.1f} ms "
                  f"({n_int} integer), the rest {totals[name] - conv_ms:5.1f} ms")  # fmt: skip
    if len(convs["float"]) != len(convs["deployed"]):
        raise SystemExit(f"the graphs have {len(convs['float'])} and {len(convs['deployed'])} convolutions")
    paired = zip(convs["float"], convs["deployed"], strict=True)
    pairs = [(f_ms, d_ms) for (_, f_ms), (op, d_ms) in paired if op == "QLinearConv"]
    speedup = sum(f for f, _ in pairs) / sum(d for _, d in pairs)
    float_convs = sum(ms for _, ms in convs["float"])
    bound = (float_convs / speedup + totals["float"] - float_convs) / totals["float"]
    print(f"the {len(pairs)} integer convolutions run {speedup:.2f}x faster than the same float ones; with every "
          f"convolution integer and Q/DQ free, deployed / float >= {bound:.2f} ({args.threads} thread(s), "
          f"{args.runs} profiled runs)")  # fmt: skip


def camera_paths(args: argparse.Namespace) -> None:
    from maptr.deploy.ort_compile import optimize_and_save
    from maptr.models.spatial_cross_attention import use_dense_camera_attention
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint

    cfg = load_model_config(load_params(args.params))
    models: dict[str, tuple[str | Path, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, checkpoint in (("float", args.float_checkpoint), ("deployed", args.qat_checkpoint)):
            for path_name in ("visible", "dense"):
                model = build_model_from_checkpoint(cfg, load_checkpoint(checkpoint))
                if path_name == "dense":
                    use_dense_camera_attention(model)
                onnx_path = Path(tmp) / f"{kind}_{path_name}.onnx"
                export_onnx(model, onnx_path)
                if kind == "deployed":
                    deployed = optimize_and_save(onnx_path, Path(tmp) / f"deploy_{path_name}.onnx").path
                    models[f"deployed {path_name}"] = (deployed, DEPLOYED_LEVEL)
                else:
                    models[f"float {path_name}"] = (onnx_path, "all")
        time_models(args, models)  # inside the temporary folder: the files live there


def r50_export(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    params["model"]["preset"] = "r50"
    cfg = load_model_config(params)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = build_maptr(cfg).eval()
        inputs = example_inputs(model)
        result = export_onnx(model, Path(tmp) / "r50_float.onnx", inputs)
        check_onnx_file(result.path)
        size = result.path.stat().st_size / 2**20
        print(f"r50 float: exported in {result.seconds:.0f} s, {result.num_nodes} nodes, {size:.0f} MB, checked")
        float_path = result.path
        quantize_model(model, QuantConfig())
        begin = time.perf_counter()
        calibrate(model, [{"img": inputs[0], "lidar2img": inputs[1]}])
        print(f"r50 quantized and calibrated on one frame in {time.perf_counter() - begin:.0f} s")
        result = export_onnx(model, Path(tmp) / "r50_qdq.onnx", inputs)
        check_onnx_file(result.path)
        size = result.path.stat().st_size / 2**20
        print(f"r50 Q/DQ: exported in {result.seconds:.0f} s, {result.num_nodes} nodes, {size:.0f} MB, checked; "
              f"{time.perf_counter() - start:.0f} s so far")  # fmt: skip
        if args.r50_runs > 0:
            from maptr.deploy.ort_compile import optimize_and_save

            deployed = optimize_and_save(result.path, Path(tmp) / "r50_deploy.onnx").path
            feeds = {"img": inputs[0].numpy(), "lidar2img": inputs[1].numpy()}
            models = {"float": (float_path, "all"), "deployed": (deployed, DEPLOYED_LEVEL)}
            times = alternating_latency(models, feeds, args.threads, warmup=1, runs=args.r50_runs, rounds=1)
            p50 = {name: float(np.median(ms)) for name, ms in times.items()}
            print(f"r50 latency, {args.threads} thread(s), {args.r50_runs} runs each, load {os.getloadavg()}: float "
                  f"{p50['float']:.0f} ms, deployed {p50['deployed']:.0f} ms p50 (deployed / float "
                  f"{p50['deployed'] / p50['float']:.2f}); {time.perf_counter() - start:.0f} s in all")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--float", dest="float_model", default="models/maptr_float.onnx")
    p.add_argument("--deployed", default="models/maptr_deploy.onnx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--rounds", type=int, default=25, help="alternating rounds, one ORT session alive at a time")
    p.add_argument("--r50", action="store_true", help="time the untrained r50 export instead")
    p.add_argument("--r50-runs", type=int, default=5, help="with --r50: timed runs per model (0: export only)")
    p.add_argument("--camera-paths", action="store_true", help="visible-pairs vs dense camera attention, exported")
    p.add_argument("--bound", action="store_true", help="profiled convolution share and the latency bound")
    p.add_argument("--as-saved", action="store_true", help="also time the deployed file loaded without ORT's "
                   "load-time layouts (what every deployed session used before 2026-12-05)")  # fmt: skip
    p.add_argument("--float-checkpoint", default="models/float-checkpoint-best.pt")
    p.add_argument("--qat-checkpoint", default="models/qat-checkpoint-best.pt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.r50:
        r50_export(args)
    elif args.camera_paths:
        camera_paths(args)
    elif args.bound:
        latency_bound(args)
    else:
        latency(args)


if __name__ == "__main__":
    main()
