"""Stage `float-train`: train the float MapTRv2 model, validating (chamfer mAP) after every epoch.

Reads sections `float` (the training strategy) and `model` (the preset). Runs alone or under torchrun:

    GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc_per_node=2 pipeline/float_train.py --params params.yaml

Writes the best checkpoint by val mAP, metrics/float.json, the per-epoch curve, a learning-curve PNG,
PR curves and a BEV picture, all also logged to MLflow. `--resume` continues an interrupted run from the
resume checkpoint (kept outside DVC's outputs so that it survives DVC re-running the stage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from maptr import cli

METRIC_KEYS = ("mAP", "AP_divider", "AP_ped_crossing", "AP_boundary")


def fingerprint(*parts) -> str:
    """Identity of a run: its params and the packed data it reads (resume only continues the same run)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_parser():
    p = cli.parser(__doc__)
    cli.add_training_arguments(p, "float")
    p.add_argument("--reports", default="reports/float", help="folder for PNG reports")
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    from dataclasses import asdict

    import torch

    from maptr.config import TrainConfig, load_model_config, load_params, load_section
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.distributed import cleanup, init_distributed
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.models.maptr import build_maptr
    from maptr.training.criterion import build_criterion
    from maptr.training.lineage import log_dataset
    from maptr.training.tracking import StageRun, check_tracking
    from maptr.training.trainer import Trainer

    params = load_params(args.params)
    cfg = load_section(params, "float", TrainConfig)
    model_cfg = load_model_config(params)
    check_tracking()  # before any work: a server in trouble is an error now, not after training
    ctx = init_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    train_set = PackedMapDataset(
        args.packed, "train", DatasetOptions.from_model(model_cfg, cfg.augment, cfg.seed, cfg.cache_mb)
    )
    val_set = PackedMapDataset(args.packed, "val", DatasetOptions.from_model(model_cfg, False, cfg.seed, cfg.cache_mb))
    model = build_maptr(model_cfg)
    criterion = build_criterion(model_cfg)
    post = build_postprocess(model_cfg)

    # The predictions of the best epoch so far, so the reports need no second pass over val.
    best_preds: dict = {"mAP": float("-inf"), "preds": None}

    def validate(m: torch.nn.Module) -> dict[str, float]:
        metrics, preds = evaluate_model(
            torch_predictor(m, ctx.device), val_set, post, batch_size=cfg.val_batch_size, num_workers=0, ctx=ctx
        )
        if metrics["mAP"] > best_preds["mAP"]:
            best_preds.update(mAP=metrics["mAP"], preds=preds)
        return metrics

    meta_bytes = (Path(args.packed) / "metas" / "train.json").read_bytes()
    run_id = fingerprint(asdict(cfg), asdict(model_cfg), meta_bytes, ctx.world_size)
    stage_params = {"float": asdict(cfg), "model": asdict(model_cfg)}
    tracking = {"enabled": ctx.is_main, "params_file": args.params, "system_metrics": True}
    with StageRun("float-train", stage_params, **tracking) as run:
        log_dataset(run, args.packed, "training")
        trainer = Trainer(
            model=model, criterion=criterion, train_set=train_set, validate=validate, cfg=cfg, ctx=ctx,
            tracker=run, stage="float", preset=model_cfg.preset, best_path=args.best, last_path=args.last,
            fingerprint=run_id,
        )  # fmt: skip
        if args.resume:
            message = trainer.resume()
            if ctx.is_main:
                print(message)
        state = trainer.fit()
        if ctx.is_main:
            write_reports(args, state.history, model_cfg, val_set, post, ctx, run, best_preds)
    cleanup(ctx)


def write_reports(args, history, model_cfg, val_set, post, ctx, run, best_preds: dict) -> None:
    """Metrics of the best epoch, the curve, PNGs; everything also to MLflow.

    ``best_preds`` holds the val predictions of the best epoch seen by this process; a resumed run whose
    best epoch came before the interruption re-scores the best checkpoint instead.
    """
    from maptr import viz
    from maptr.atomic import write_text_atomic
    from maptr.evaluation.chamfer_ap import precision_recall_curves
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.models.maptr import build_maptr
    from maptr.training.checkpoint import load_checkpoint
    from maptr.training.lineage import log_val_metrics

    best = max(history, key=lambda h: h["mAP"])
    metrics = {k: best[k] for k in best if k.startswith(("mAP", "AP_"))}
    metrics.update(best_epoch=best["epoch"], epochs=len(history))
    write_text_atomic(args.metrics, json.dumps(metrics, indent=2))
    write_text_atomic(args.curve, json.dumps(history, indent=2))
    reports = Path(args.reports)
    viz.learning_curve(history, reports / "learning_curve.png", title=f"float-train ({model_cfg.preset})")
    preds = best_preds["preds"]
    if preds is None or best_preds["mAP"] != best["mAP"]:
        model = build_maptr(model_cfg)
        model.load_state_dict(load_checkpoint(args.best)["model"])
        model.eval()
        _, preds = evaluate_model(torch_predictor(model, ctx.device), val_set, post, batch_size=4)
    gts = [val_set.ground_truth(p["index"]) for p in preds]
    viz.pr_curves(precision_recall_curves(preds, gts), reports / "pr_curves.png", title="float model, val")
    viz.bev_comparison(gts[0], preds[0], model_cfg.pc_range, reports / "bev_val0.png", title="val sample 0")
    log_val_metrics(run, metrics, model=args.best)
    run.log_metrics({"best_epoch": best["epoch"], "epochs": len(history)})
    for path in (args.metrics, args.curve, *sorted(reports.glob("*.png"))):
        run.log_artifact(path)
    run.log_artifact(args.best, artifact_path="checkpoints")


if __name__ == "__main__":
    cli.run(main)
