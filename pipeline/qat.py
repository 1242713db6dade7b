"""Stage `qat` (the guide's qat_trainer): fine-tune the calibrated model with fake quantization.

Reads sections `qat` (a training strategy, like `float`, plus samples_per_epoch) and `model`. Starts from
models/calibration-checkpoint-best.pt: the same quantized structure (int16 operators included), activation
scales fixed, weights (and their per-channel scales) training. Runs alone or under torchrun:

    GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc_per_node=2 pipeline/qat.py --params params.yaml

Validates (val mAP) after every epoch, keeps the best checkpoint, writes metrics/qat.json and the
per-epoch curve, all also to MLflow. `--resume` continues an interrupted run (same params, same
calibration checkpoint) from the resume checkpoint, which is kept outside DVC's outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from maptr import cli


def build_parser():
    p = cli.parser(__doc__)
    cli.add_training_arguments(p, "qat")
    p.add_argument("--calibration-checkpoint", default="models/calibration-checkpoint-best.pt", help="start")
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    from dataclasses import asdict

    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import QATConfig, load_model_config, load_params, load_section
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.distributed import cleanup, init_distributed
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.qat import EpochSlices, check_fixed_activation_scales, exclude_quant_buffers_from_ddp
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint
    from maptr.training.criterion import build_criterion
    from maptr.training.lineage import log_dataset, log_val_metrics
    from maptr.training.tracking import StageRun, check_tracking
    from maptr.training.trainer import Trainer

    params = load_params(args.params)
    cfg = load_section(params, "qat", QATConfig)
    model_cfg = load_model_config(params)
    check_tracking()
    ctx = init_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    ckpt = load_checkpoint(args.calibration_checkpoint, expect_preset=model_cfg.preset)
    if "quant" not in ckpt:
        raise cli.UserError(f"{args.calibration_checkpoint}: not a calibration checkpoint (no quantization config)")
    model = build_model_from_checkpoint(model_cfg, ckpt)
    check_fixed_activation_scales(model)
    exclude_quant_buffers_from_ddp(model)
    quant = ckpt["quant"]

    train_set = PackedMapDataset(
        args.packed, "train", DatasetOptions.from_model(model_cfg, cfg.augment, cfg.seed, cfg.cache_mb)
    )
    if cfg.samples_per_epoch > 0:
        train_set = EpochSlices(train_set, cfg.samples_per_epoch, cfg.seed)
    val_set = PackedMapDataset(args.packed, "val", DatasetOptions.from_model(model_cfg, False, cfg.seed, cfg.cache_mb))
    post = build_postprocess(model_cfg)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_model(
            torch_predictor(m, ctx.device), val_set, post, batch_size=cfg.val_batch_size, num_workers=0, ctx=ctx
        )
        return metrics

    run_id = hashlib.sha256(
        json.dumps([asdict(cfg), asdict(model_cfg), ctx.world_size], sort_keys=True, default=str).encode()
        + Path(args.calibration_checkpoint).read_bytes()
        + (Path(args.packed) / "metas" / "train.json").read_bytes()
    ).hexdigest()[:16]
    stage_params = {"qat": asdict(cfg), "model": asdict(model_cfg), "int16_operators": len(quant["int16_ops"])}
    with StageRun("qat", stage_params, enabled=ctx.is_main, params_file=args.params, system_metrics=True) as run:
        log_dataset(run, args.packed, "training")
        trainer = Trainer(
            model=model, criterion=build_criterion(model_cfg), train_set=train_set, validate=validate, cfg=cfg,
            ctx=ctx, tracker=run, stage="qat", preset=model_cfg.preset, best_path=args.best, last_path=args.last,
            fingerprint=run_id, extra_state=lambda: {"quant": quant},
        )  # fmt: skip
        if args.resume:
            message = trainer.resume()
            if ctx.is_main:
                print(message)
        state = trainer.fit()
        check_fixed_activation_scales(model)  # nothing in training may have touched them
        if ctx.is_main:
            best = max(state.history, key=lambda h: h["mAP"])
            metrics = {k: best[k] for k in best if k.startswith(("mAP", "AP_"))}
            metrics.update(best_epoch=best["epoch"], epochs=len(state.history))
            write_text_atomic(args.metrics, json.dumps(metrics, indent=2))
            write_text_atomic(args.curve, json.dumps(state.history, indent=2))
            log_val_metrics(run, metrics, model=args.best, source=args.calibration_checkpoint)
            run.log_metrics({"best_epoch": best["epoch"], "epochs": len(state.history)})
            for path in (args.metrics, args.curve):
                run.log_artifact(path)
            run.log_artifact(args.best, artifact_path="checkpoints")
    cleanup(ctx)


if __name__ == "__main__":
    cli.run(main)
