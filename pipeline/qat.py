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

    from maptr.config import QATConfig
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.qat import EpochSlices, check_fixed_activation_scales, exclude_quant_buffers_from_ddp
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint
    from maptr.training.criterion import build_criterion
    from maptr.training.stage import TrainingStage, run_fingerprint

    stage = TrainingStage("qat", "qat", QATConfig, args)
    cfg, model_cfg, ctx = stage.cfg, stage.model_cfg, stage.ctx
    ckpt = load_checkpoint(args.calibration_checkpoint, expect_preset=model_cfg.preset)
    if "quant" not in ckpt:
        raise cli.UserError(f"{args.calibration_checkpoint}: not a calibration checkpoint (no quantization config)")
    model = build_model_from_checkpoint(model_cfg, ckpt)
    check_fixed_activation_scales(model)
    exclude_quant_buffers_from_ddp(model)
    quant = ckpt["quant"]

    train_set, val_set = stage.datasets()
    if cfg.samples_per_epoch > 0:
        train_set = EpochSlices(train_set, cfg.samples_per_epoch, cfg.seed)
    validation = stage.validation(val_set, build_postprocess(model_cfg))

    # One JSON part for the params, then the files: another layout would make every resume checkpoint on disk
    # (and the fingerprint in the best one) look like another run's.
    run_id = run_fingerprint(
        [asdict(cfg), asdict(model_cfg), ctx.world_size],
        Path(args.calibration_checkpoint).read_bytes(),
        (Path(args.packed) / "metas" / "train.json").read_bytes(),
    )
    with stage.tracked(int16_operators=len(quant["int16_ops"])) as run:
        state = stage.train(
            run, model=model, criterion=build_criterion(model_cfg), train_set=train_set, validate=validation,
            fingerprint=run_id, extra_state=lambda: {"quant": quant},
        )  # fmt: skip
        check_fixed_activation_scales(model)  # nothing in training may have touched them
        if ctx.is_main:
            stage.write_metrics(run, state.history, source=args.calibration_checkpoint)
    stage.close()


if __name__ == "__main__":
    cli.run(main)
