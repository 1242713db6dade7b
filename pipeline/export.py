"""Stage `export` (the guide's export_hbir): the QAT model to Q/DQ ONNX and the float model to ONNX.

    python pipeline/export.py --params params.yaml

Reads sections `export` and `model`. Writes models/maptr_qdq.onnx (QuantizeLinear / DequantizeLinear with
the QAT checkpoint's learned scales: uint8 activations, int8 per-channel weights, int16 inputs of the
sensitive operators; opset 21) and models/maptr_float.onnx (the float checkpoint: the speed baseline).
Both take `img` (1, 6, 3, H, W) and `lidar2img` (1, 6, 4, 4) at the preset's size and return `scores`
(1, Q, K) and `pts` (1, Q, P, 2) of the one2one queries. Each file passes onnx.checker (full check) and
strict shape inference, and ONNX Runtime (optimizations off: the graph as exported) is compared with
PyTorch on the trace inputs. Files are written atomically; models and figures go to MLflow (mlflow.onnx).
"""

from __future__ import annotations

import json
from pathlib import Path

from maptr import cli
from maptr.training.run_group import open_model_stage, stage_main


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--qat-checkpoint", default="models/qat-checkpoint-best.pt", help="quantized model to deploy")
    p.add_argument("--float-checkpoint", default="models/float-checkpoint-best.pt", help="float baseline")
    p.add_argument("--qdq-out", default="models/maptr_qdq.onnx")
    p.add_argument("--float-out", default="models/maptr_float.onnx")
    p.add_argument("--report", default="reports/export.json", help="figures of both exports")
    return p


def export_checkpoint(checkpoint: str, out: str, model_cfg, cfg, quantized: bool) -> tuple[dict, float]:
    """Export one checkpoint (``cfg``: the ExportConfig), check the file, compare ONNX Runtime with PyTorch;
    returns its figures and the export's seconds (kept apart: the figures go to a DVC-tracked report, whose
    bytes must not change between two runs of the same inputs)."""
    import numpy as np
    import onnx

    from maptr.deploy.onnx_export import (
        UnexportableOperatorError,
        check_onnx_file,
        example_inputs,
        export_onnx,
        qdq_dtype_counts,
    )
    from maptr.deploy.ort_runner import create_session, run_frame
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, expect_preset=model_cfg.preset)
    if quantized != ("quant" in ckpt):
        want = "a QAT / calibration" if quantized else "a float"
        raise cli.UserError(f"{checkpoint}: expected {want} checkpoint for {out}")
    model = build_model_from_checkpoint(model_cfg, ckpt)
    img, lidar2img = example_inputs(model, cfg.seed)
    try:
        exported = export_onnx(model, out, (img, lidar2img), opset=cfg.opset)
    except UnexportableOperatorError as exc:
        raise cli.UserError(str(exc)) from None
    shapes = check_onnx_file(out)
    # The graph as exported (no ORT fusion): DQ -> float op -> Q computes what the fake-quant op does.
    session = create_session(out, threads=max(cfg.threads, 1), level="disabled")
    scores, pts = run_frame(session, img.numpy(), lidar2img.numpy())
    figures = {
        "nodes": exported.num_nodes,
        "size_mb": Path(out).stat().st_size / 2**20,
        "output_shapes": shapes,
        "max_abs_diff_ort_vs_torch": {
            "scores": float(np.abs(scores - exported.scores.numpy()).max()),
            "pts": float(np.abs(pts - exported.pts.numpy()).max()),
        },
    }
    if quantized:
        figures["quantize_linear_by_dtype"] = qdq_dtype_counts(onnx.load(out))
    return figures, exported.seconds


@stage_main
def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import time

    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import ExportConfig
    from maptr.deploy.onnx_export import log_onnx_model
    from maptr.deploy.registry import FLOAT, registered_name

    _, cfg, model_cfg, run = open_model_stage("export", args.params, ExportConfig)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    report = {"preset": model_cfg.preset, "opset": cfg.opset}
    seconds = {}
    report["qdq"], seconds["qdq"] = export_checkpoint(args.qat_checkpoint, args.qdq_out, model_cfg, cfg, quantized=True)
    report["float"], seconds["float"] = export_checkpoint(
        args.float_checkpoint, args.float_out, model_cfg, cfg, quantized=False
    )
    write_text_atomic(args.report, json.dumps(report, indent=2))
    for name in ("qdq", "float"):
        r = report[name]
        print(
            f"{name}: {r['nodes']} nodes, {r['size_mb']:.1f} MB, exported in {seconds[name]:.1f} s; "
            f"max |ORT - torch| scores {r['max_abs_diff_ort_vs_torch']['scores']:.2e}, "
            f"pts {r['max_abs_diff_ort_vs_torch']['pts']:.2e}"
        )
    print(f"QuantizeLinear by type: {report['qdq']['quantize_linear_by_dtype']}; "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip

    for name in ("qdq", "float"):
        r = report[name]
        diffs = {f"{name}/max_abs_diff_{k}": v for k, v in r["max_abs_diff_ort_vs_torch"].items()}
        run.log_metrics({f"{name}/nodes": r["nodes"], f"{name}/size_mb": r["size_mb"],
                         f"{name}/export_seconds": seconds[name], **diffs})  # fmt: skip
    run.log_artifact(args.report)
    run.call("ONNX model (maptr_qdq)", lambda: log_onnx_model(args.qdq_out, "maptr_qdq"))
    registered = registered_name(model_cfg.preset, FLOAT)
    run.call("ONNX model (maptr_float)",
             lambda: log_onnx_model(args.float_out, "maptr_float", registered, args.float_checkpoint))  # fmt: skip


if __name__ == "__main__":
    cli.run(main)
