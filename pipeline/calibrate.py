"""Stage `calibrate` (the guide's Calibrator): float checkpoint -> fake-quant model with frozen scales -> val mAP.

Reads sections `calibrate` and `model`, and the sensitivity ranking (reports/sensitivity.json): the top-k
operators get int16 inputs (k = calibrate.int16_topk for the preset int16_topk_preset, the same fraction
of the operators for others), all other activations uint8, all weights int8 per channel. Runs
`steps` training batches (no augmentation) through the observers, freezes the scales, evaluates the
validation mAP, and writes models/calibration-checkpoint-best.pt (weights, scales and the quantization
config) and metrics/calibration.json (the keys of metrics/float.json). Everything also goes to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

from maptr import cli
from maptr.training.run_group import open_model_stage, stage_main


def build_parser():
    p = cli.parser(__doc__)
    cli.add_quantization_inputs(p)
    p.add_argument("--sensitivity", default="reports/sensitivity.json", help="ranking from the sensitivity stage")
    p.add_argument("--out", default="models/calibration-checkpoint-best.pt", help="calibrated checkpoint")
    p.add_argument("--metrics", default="metrics/calibration.json", help="val metrics of the calibrated model")
    p.add_argument("--observer", default=None, help="override calibrate.observer (for comparisons)")
    return p


@stage_main
def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import time

    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import CalibrateConfig
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.models.maptr import build_maptr
    from maptr.quant.calibration import calibrate, calibration_loader
    from maptr.quant.quantizer import QuantConfig, quantize_model
    from maptr.training.checkpoint import load_checkpoint, save_checkpoint
    from maptr.training.lineage import log_dataset, log_val_metrics

    params, cfg, model_cfg, run = open_model_stage("calibrate", args.params, CalibrateConfig, observer=args.observer)
    log_dataset(run, args.packed, "calibration")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()

    int16_ops = sensitive_operators(args.sensitivity, params, cfg, model_cfg.preset)
    quant_cfg = QuantConfig.from_calibrate(cfg, int16_ops)
    model = build_maptr(model_cfg)
    model.load_state_dict(load_checkpoint(args.float_checkpoint, expect_preset=model_cfg.preset)["model"])
    quantize_model(model, quant_cfg)
    options = DatasetOptions.from_model(model_cfg)
    train_set = PackedMapDataset(args.packed, "train", options)
    val_set = PackedMapDataset(args.packed, "val", options)
    num_quants = calibrate(model, calibration_loader(train_set, cfg.steps, cfg.batch_size, cfg.seed))
    calibration_seconds = time.perf_counter() - start
    metrics, _ = evaluate_model(
        torch_predictor(model, torch.device("cpu")),
        val_set,
        build_postprocess(model_cfg),
        batch_size=cfg.val_batch_size,
    )
    metrics = {k: v for k, v in metrics.items() if k.startswith(("mAP", "AP_"))}
    seconds = time.perf_counter() - start
    save_checkpoint(args.out, {"model": model.state_dict(), "stage": "calibration", "preset": model_cfg.preset,
                               "quant": quant_cfg.to_dict(), "metrics": metrics})  # fmt: skip
    document = {**metrics, "int16_operators": len(int16_ops), "activation_quants": num_quants,
                "observer": cfg.observer, "calibration_samples": cfg.steps * cfg.batch_size}  # fmt: skip
    write_text_atomic(args.metrics, json.dumps(document, indent=2))
    print(
        f"calibration ({cfg.observer}, {len(int16_ops)} int16 operators, {cfg.steps} x {cfg.batch_size} samples): "
        f"val mAP {metrics['mAP']:.4f} ({calibration_seconds:.0f} s calibration, {seconds:.0f} s in all)"
    )

    log_val_metrics(run, metrics, model=args.out, source=args.float_checkpoint)
    run.log_metrics({"seconds": seconds, "int16_operators": len(int16_ops)})
    run.set_tags({"int16_operators": ", ".join(int16_ops)[:5000]})
    run.log_artifact(args.metrics)
    run.log_artifact(args.out, artifact_path="checkpoints")


def sensitive_operators(path: str, params: dict, cfg, preset: str) -> list[str]:
    """The top-k of the sensitivity ranking (``cfg``: the CalibrateConfig); a missing or foreign report is a
    user error."""
    from maptr.quant.sensitivity import int16_topk_for_params, top_operators

    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise cli.UserError(f"{path}: sensitivity report not found; run the sensitivity stage first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise cli.UserError(
            f"{path}: not valid JSON (truncated or corrupt: {exc}); re-run the sensitivity stage"
        ) from None
    if not isinstance(report, dict) or "operators" not in report:
        raise cli.UserError(f"{path}: not a sensitivity report (no operators table); re-run the sensitivity stage")
    if report.get("preset") != preset:
        raise cli.UserError(
            f"{path} ranks preset {report.get('preset')!r}, params select {preset!r}; re-run sensitivity"
        )
    k = int16_topk_for_params(params, cfg.int16_topk, cfg.int16_topk_preset)
    return top_operators(report, k, cfg.int16_exclude)


if __name__ == "__main__":
    cli.run(main)
