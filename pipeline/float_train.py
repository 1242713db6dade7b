"""Stage `float-train`: train the float MapTRv2 model, validating (chamfer mAP) after every epoch.

Reads sections `float` (the training strategy) and `model` (the preset). Runs alone or under torchrun:

    GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc_per_node=2 pipeline/float_train.py --params params.yaml

Writes the best checkpoint by val mAP, metrics/float.json, the per-epoch curve, a learning-curve PNG,
PR curves and a BEV picture, all also logged to MLflow. `--resume` continues an interrupted run from the
resume checkpoint (kept outside DVC's outputs so that it survives DVC re-running the stage).
"""

from __future__ import annotations

from pathlib import Path

from maptr import cli


def build_parser():
    p = cli.parser(__doc__)
    cli.add_training_arguments(p, "float")
    p.add_argument("--reports", default="reports/float", help="folder for PNG reports")
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    from dataclasses import asdict

    from maptr.config import TrainConfig
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.models.maptr import build_maptr
    from maptr.training.criterion import build_criterion
    from maptr.training.stage import TrainingStage, run_fingerprint

    stage = TrainingStage("float-train", "float", TrainConfig, args)
    cfg, model_cfg, ctx = stage.cfg, stage.model_cfg, stage.ctx
    train_set, val_set = stage.datasets()
    model = build_maptr(model_cfg)
    criterion = build_criterion(model_cfg)
    validation = stage.validation(val_set, build_postprocess(model_cfg))

    meta_bytes = (Path(args.packed) / "metas" / "train.json").read_bytes()
    run_id = run_fingerprint(asdict(cfg), asdict(model_cfg), meta_bytes, ctx.world_size)
    with stage.tracked() as run:
        state = stage.train(
            run, model=model, criterion=criterion, train_set=train_set, validate=validation, fingerprint=run_id
        )
        if ctx.is_main:
            metrics = stage.write_metrics(run, state.history)
            write_reports(args, state.history, metrics, stage, validation, run)
    stage.close()


def write_reports(args, history, metrics: dict, stage, validation, run) -> None:
    """The learning curve, PR curves and a BEV picture of the best epoch, also to MLflow.

    ``validation`` holds the val predictions of the best epoch seen by this process; a resumed run whose
    best epoch came before the interruption re-scores the best checkpoint instead.
    """
    from maptr import viz
    from maptr.evaluation.chamfer_ap import precision_recall_curves
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.models.maptr import build_maptr
    from maptr.training.checkpoint import load_checkpoint

    model_cfg, val_set, post = stage.model_cfg, validation.val_set, validation.post
    reports = Path(args.reports)
    viz.learning_curve(history, reports / "learning_curve.png", title=f"float-train ({model_cfg.preset})")
    preds = validation.best_predictions
    if preds is None or validation.best_map != metrics["mAP"]:
        model = build_maptr(model_cfg)
        model.load_state_dict(load_checkpoint(args.best)["model"])
        model.eval()
        _, preds = evaluate_model(torch_predictor(model, stage.ctx.device), val_set, post, batch_size=4)
    gts = [val_set.ground_truth(p["index"]) for p in preds]
    viz.pr_curves(precision_recall_curves(preds, gts), reports / "pr_curves.png", title="float model, val")
    viz.bev_comparison(gts[0], preds[0], model_cfg.pc_range, reports / "bev_val0.png", title="val sample 0")
    for path in sorted(reports.glob("*.png")):
        run.log_artifact(path)


if __name__ == "__main__":
    cli.run(main)
