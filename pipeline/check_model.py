"""The guide's `model_checker`: build the quantized model, export it, and show how ONNX Runtime runs each operator.

    python pipeline/check_model.py --preset tiny
    python pipeline/check_model.py --preset r50                 # untrained, batch 1 (~3-5 min on 2 cores)
    python pipeline/check_model.py --checkpoint models/calibration-checkpoint-best.pt
    python pipeline/check_model.py --checkpoint models/qat-checkpoint-best.pt --compiled   # as deployed

Without --checkpoint the model is the preset's untrained one, calibrated on one random batch (enough to
set every scale: the check is about the graph, not accuracy), with the int16 operators of the
sensitivity report when it was made for that preset (else all 8-bit, said in the output). Prints one
line per quantized operator (activation and weight dtype, the ORT kernel it became, integer or not)
and the float kernels by type, and writes the same as JSON. Fails with a message naming the module
when an operator cannot be exported.

By default ORT optimizes the raw export at ``--level``: which operators ORT's own Q/DQ fusions turn
into integer kernels. With ``--compiled`` the export first goes through the compile stage's rewrites
(``maptr.deploy.ort_compile.optimize_and_save``) and the file is loaded at ORT level ``all``, as every
deployed session loads it: the kernels the deployed model runs (more of them integer: the compile stage
gives float-output linears an integer bias and moves the stem onto the fast integer convolution).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from maptr import cli


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--preset", default=None, help="model preset (default: model.preset of the params file)")
    p.add_argument("--checkpoint", default=None, help="a calibration / QAT checkpoint to check instead")
    p.add_argument("--sensitivity", default="reports/sensitivity.json", help="ranking for the int16 operators")
    p.add_argument("--out", default=None, help="JSON report (default reports/check_model_<preset>.json)")
    p.add_argument("--onnx", default=None, help="keep the exported model here (default: a temporary file)")
    p.add_argument("--level", default="extended", help="ORT graph optimization level: basic | extended | all")
    p.add_argument("--compiled", action="store_true", help="check the compile stage's output for this export "
                   "(loaded at ORT level all, as deployed) instead of ORT's fusion of the raw export")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch and ORT threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import CalibrateConfig, load_model_config, load_params, load_section
    from maptr.deploy.checker import check_model, format_report
    from maptr.deploy.onnx_export import UnexportableOperatorError, example_inputs, export_onnx
    from maptr.deploy.ort_compile import optimize_and_save
    from maptr.deploy.ort_runner import DEPLOYED_LEVEL, LEVELS
    from maptr.models.maptr import build_maptr
    from maptr.quant.calibration import calibrate
    from maptr.quant.quantizer import QuantConfig, build_model_from_checkpoint, quantize_model, quantized_operators
    from maptr.training.checkpoint import load_checkpoint

    if args.level not in LEVELS:
        raise cli.UserError(f"--level: {args.level!r} is not one of {', '.join(LEVELS)}")
    params = load_params(args.params)
    if args.preset:
        params["model"]["preset"] = args.preset
    model_cfg = load_model_config(params)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    start = time.perf_counter()

    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint, expect_preset=model_cfg.preset)
        if "quant" not in ckpt:
            raise cli.UserError(f"{args.checkpoint} is a float checkpoint: check a calibration or QAT checkpoint")
        model = build_model_from_checkpoint(model_cfg, ckpt)
        img, lidar2img = example_inputs(model, args.seed)
        source = f"checkpoint {args.checkpoint}"
    else:
        int16_ops, source = _int16_from_report(args.sensitivity, params, model_cfg)
        torch.manual_seed(args.seed)
        quant_cfg = QuantConfig.from_calibrate(load_section(params, "calibrate", CalibrateConfig), int16_ops)
        model = quantize_model(build_maptr(model_cfg), quant_cfg)
        img, lidar2img = example_inputs(model, args.seed)
        calibrate(model, [{"img": img, "lidar2img": lidar2img}])
        source = f"untrained {model_cfg.preset} model, {source}"
    print(f"{model_cfg.preset}: {source}; built and calibrated in {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(args.onnx) if args.onnx else Path(tmp) / f"maptr_{model_cfg.preset}_qdq.onnx"
        try:
            exported = export_onnx(model, onnx_path, (img, lidar2img))
        except UnexportableOperatorError as exc:
            raise cli.UserError(str(exc)) from None
        print(f"exported {exported.num_nodes} ONNX nodes in {exported.seconds:.1f} s")
        check_start = time.perf_counter()
        run_path, level = None, args.level
        if args.compiled:
            run_path = optimize_and_save(onnx_path, Path(tmp) / f"maptr_{model_cfg.preset}_deploy.onnx", level).path
            level = DEPLOYED_LEVEL
            print(f"compiled as the compile stage does ({args.level}, then its rewrites): {run_path.name}")
        report = check_model(
            onnx_path, quantized_operators(model), (img, lidar2img), (exported.scores, exported.pts), level,
            threads, run_path,
        )  # fmt: skip
        print(f"ONNX Runtime optimized and ran it in {time.perf_counter() - check_start:.1f} s\n")
    print(format_report(report))
    out = args.out or f"reports/check_model_{model_cfg.preset}.json"
    document = {"preset": model_cfg.preset, "source": source, "threads": threads, **report.to_dict()}
    write_text_atomic(out, json.dumps(document, indent=2))
    print(f"\nwrote {out} ({time.perf_counter() - start:.0f} s in all)")


def _int16_from_report(path: str, params: dict, model_cfg) -> tuple[list[str], str]:
    """The top-k of a sensitivity report made for this preset, with calibrate's k rule; else none."""
    from maptr.config import CalibrateConfig, load_section
    from maptr.quant.sensitivity import int16_topk_for_params, top_operators

    report_path = Path(path)
    if not report_path.is_file():
        return [], f"no sensitivity report at {path}: all activations 8-bit"
    report = json.loads(report_path.read_text())
    if report.get("preset") != model_cfg.preset:
        return [], f"{path} ranks preset {report.get('preset')!r}: all activations 8-bit"
    cfg = load_section(params, "calibrate", CalibrateConfig)
    k = int16_topk_for_params(params, cfg.int16_topk, cfg.int16_topk_preset)
    return top_operators(report, k, cfg.int16_exclude), f"int16 inputs for the top {k} of {path}"


if __name__ == "__main__":
    cli.run(main)
