"""Stage `compile` (the guide's compile_perf_hbir): the deployable model for ONNX Runtime on CPU, and its figures.

    python pipeline/compile.py --params params.yaml

Reads section `compile`. models/maptr_qdq.onnx goes through the compile passes of
maptr/deploy/ort_compile.py (its docstring numbers them): graph rewrites, then ONNX Runtime's optimizer at
`compile.optimization_level` (Q/DQ groups fused into integer kernels), then rewrites of ORT's graph. The
result is saved as models/maptr_deploy.onnx (portable across x86 CPUs), then loaded back as every deployed
session loads it (ORT level `all`: the CPU's own layouts added) and checked to give the outputs of the
in-memory compilation; each pass's count goes to the report's `passes`. Then the deployed model and
models/maptr_float.onnx (ORT's default optimizations, its best) are timed in `compile.rounds` alternating
rounds with `compile.threads` threads, one ORT session alive at a time: latency p50 / p90 over
`compile.runs` runs (`compile.warmup` untimed runs per session), size, operator types, integer vs float
kernels and profiled time per operator type -> reports/compile.json and reports/compile.md. All of it to MLflow.
"""

from __future__ import annotations

import json
import os

from maptr import cli
from maptr.training.run_group import open_stage_run, stage_main

# The saved file runs the in-memory compilation's graph with the same kernels: equal up to float rounding.
# A weight that ORT re-quantized at load time moved the scores by 1e-2.
SAVED_MODEL_TOLERANCE = 1e-5


def frame_inputs(path: str, seed: int = 0) -> dict:
    """Random normalized 8-bit images and a pinhole rig at the model's input shape (read from the file), as
    numpy arrays by input name."""
    from maptr.deploy.onnx_export import pinhole_rig, random_pixel_images
    from maptr.deploy.ort_runner import SAVED, create_session

    shape = create_session(path, threads=1, level=SAVED).get_inputs()[0].shape  # [1, Ncam, 3, H, W]
    img = random_pixel_images(shape, seed)  # (1, Ncam, 3, H, W)
    return {"img": img.numpy(), "lidar2img": pinhole_rig((shape[4], shape[3]), shape[1]).numpy()}


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--qdq", default="models/maptr_qdq.onnx", help="exported Q/DQ model")
    p.add_argument("--float", dest="float_model", default="models/maptr_float.onnx", help="float ONNX baseline")
    p.add_argument("--out", default="models/maptr_deploy.onnx", help="deployable (optimized) model")
    p.add_argument("--report", default="reports/compile.json")
    p.add_argument("--table", default="reports/compile.md", help="the readable table of the report")
    return p


@stage_main
def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import time
    from dataclasses import asdict

    import onnxruntime as ort
    import torch

    from maptr.atomic import atomic_file, write_text_atomic
    from maptr.config import CompileConfig, load_params, load_section
    from maptr.deploy.compile_report import (
        alternating_latency,
        compile_markdown,
        latency_summary,
        model_figures,
        profile_ops,
    )
    from maptr.deploy.onnx_export import log_onnx_model
    from maptr.deploy.ort_compile import optimize_and_save, outputs_match
    from maptr.deploy.ort_runner import DEPLOYED_LEVEL, check_onnx_readable
    from maptr.deploy.registry import DEPLOYED, registered_name

    params = load_params(args.params)
    cfg = load_section(params, "compile", CompileConfig)  # ranges and the level checked in maptr.config
    run = open_stage_run("compile", {"compile": asdict(cfg)}, args.params)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for path in (args.qdq, args.float_model):
        check_onnx_readable(path)
    feeds = frame_inputs(args.qdq)
    # Compiled and checked under a temporary name: a killed or failed compile leaves no deployable-looking file.
    with atomic_file(args.out) as tmp:
        compiled = optimize_and_save(args.qdq, tmp, cfg.optimization_level)
        check = outputs_match(args.qdq, tmp, feeds, cfg.optimization_level)
        if max(check.reproduces.values()) > SAVED_MODEL_TOLERANCE:
            raise RuntimeError(
                f"{args.out} did not reproduce the compiled model's outputs (max diff {check.reproduces}) and was "
                "not kept; see maptr.deploy.ort_compile.outputs_match"
            )
    compile_seconds = time.perf_counter() - start

    models = {"float": (args.float_model, "all"), "deployed": (args.out, DEPLOYED_LEVEL)}
    latency = alternating_latency(models, feeds, cfg.threads, cfg.warmup, cfg.runs, cfg.rounds)
    tables = {
        "float": profile_ops(args.float_model, feeds, cfg.threads, cfg.profile_runs, "all"),
        "deployed": profile_ops(args.out, feeds, cfg.threads, cfg.profile_runs, DEPLOYED_LEVEL),
    }
    report = {name: model_figures(latency[name], models[name][0], tables[name]) for name in ("float", "deployed")}
    report["speedup_p50"] = report["float"]["latency_ms_p50"] / report["deployed"]["latency_ms_p50"]
    # The same comparison at other thread counts: integer kernels and the float rest scale differently.
    by_threads = {cfg.threads: latency}
    for threads in sorted(set(cfg.thread_sweep) - {cfg.threads}):
        by_threads[threads] = alternating_latency(models, feeds, threads, cfg.warmup, cfg.runs, cfg.rounds)
    report["by_threads"] = {
        str(threads): latency_summary(times, cfg.rounds) for threads, times in sorted(by_threads.items())
    }
    # The ratio robust to the machine's drift: each round's two models ran seconds apart.
    report["deployed_over_float_paired"] = report["by_threads"][str(cfg.threads)]["round_ratio_p50"]
    report.update(
        deployed_model=args.out, float_model=args.float_model, optimization_level=cfg.optimization_level,
        threads=cfg.threads, warmup=cfg.warmup, runs=cfg.runs, rounds=cfg.rounds, onnxruntime=ort.__version__,
        load_average=[round(x, 2) for x in os.getloadavg()], saved_model_check=check.reproduces,
        qgemm_rewrite_effect=check.qgemm_rewrite_effect,
        compile_seconds=compile_seconds, passes=compiled.passes(), deployed_load_level=DEPLOYED_LEVEL,
    )  # fmt: skip
    write_text_atomic(args.report, json.dumps(report, indent=2))
    write_text_atomic(args.table, compile_markdown(report))
    f, d = report["float"], report["deployed"]
    print(
        f"deployed {args.out}: p50 {d['latency_ms_p50']:.1f} ms (p90 {d['latency_ms_p90']:.1f}), "
        f"{d['ops']['integer_kernels']} integer / {d['ops']['float_kernels']} float kernels, {d['size_mb']:.1f} MB\n"
        f"float    {args.float_model}: p50 {f['latency_ms_p50']:.1f} ms (p90 {f['latency_ms_p90']:.1f}), "
        f"{f['size_mb']:.1f} MB\nspeed-up {report['speedup_p50']:.2f}x ({cfg.threads} threads, load "
        f"{report['load_average']}); deployed / float by threads: "
        + ", ".join(
            f"{t}: {row['deployed_over_float']:.2f} (paired by round {row['round_ratio_p50']:.2f})"
            for t, row in report["by_threads"].items()
        )
        + f"; {time.perf_counter() - start:.0f} s in all"
    )

    run.log_metrics({
        "float/latency_ms_p50": f["latency_ms_p50"], "float/latency_ms_p90": f["latency_ms_p90"],
        "deployed/latency_ms_p50": d["latency_ms_p50"], "deployed/latency_ms_p90": d["latency_ms_p90"],
        "deployed/size_mb": d["size_mb"], "deployed/integer_kernels": d["ops"]["integer_kernels"],
        "deployed/float_kernels": d["ops"]["float_kernels"], "speedup_p50": report["speedup_p50"],
        "deployed_over_float_paired": report["deployed_over_float_paired"],
    })  # fmt: skip
    for threads, row in report["by_threads"].items():
        run.log_metrics({f"threads_{threads}/{key}": value for key, value in row.items()})
    run.log_metrics({f"passes/{name}": entry["count"] for name, entry in report["passes"].items()})
    run.log_artifact(args.report)
    run.log_artifact(args.table)
    registered = registered_name(params["model"]["preset"], DEPLOYED)
    run.call("ONNX model (maptr_deploy)", lambda: log_onnx_model(args.out, "maptr_deploy", registered))


if __name__ == "__main__":
    cli.run(main)
