"""Stage `validate` (the guide's validation_hbir --stage align_bpu): the deployed model on ONNX Runtime.

    python pipeline/validate.py --params params.yaml

Reads sections `validate` and `model`. Runs models/maptr_deploy.onnx with ONNX Runtime over the WHOLE val
split and scores it with the same post-processing and chamfer mAP as every other stage
(maptr.evaluation.inference.evaluate_model) -> metrics/deployed.json (the keys of metrics/float.json).
The QAT model (models/qat-checkpoint-best.pt) runs in PyTorch on the same samples, and the agreement
of the two goes under `agreement`: max / mean |difference| of points and scores, the fraction of
identical classes among the top-k queries, and mAP(deployed) - mAP(QAT). Logged to MLflow.
"""

from __future__ import annotations

import json

from maptr import cli
from maptr.training.run_group import open_model_stage, stage_main


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--deployed", default="models/maptr_deploy.onnx", help="the compiled model")
    p.add_argument("--qat-checkpoint", default="models/qat-checkpoint-best.pt", help="reference in PyTorch")
    p.add_argument("--packed", default="data/packed", help="packed dataset")
    p.add_argument("--metrics", default="metrics/deployed.json")
    p.add_argument("--limit", type=int, default=None, help="first N val samples only (not for the stage)")
    return p


@stage_main
def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import time

    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import ValidateConfig
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.deploy.ort_runner import DEPLOYED_LEVEL, OrtPredictor
    from maptr.deploy.registry import publish_ladder
    from maptr.evaluation.agreement import RecordingPredictor, output_agreement
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint
    from maptr.training.lineage import log_dataset, log_val_metrics

    _, cfg, model_cfg, run = open_model_stage("validate", args.params, ValidateConfig)
    log_dataset(run, args.packed, "validation")
    torch.set_num_threads(max(cfg.threads, 1))
    ckpt = load_checkpoint(args.qat_checkpoint, expect_preset=model_cfg.preset)
    if "quant" not in ckpt:
        raise cli.UserError(f"{args.qat_checkpoint}: not a quantized (QAT) checkpoint")
    qat = build_model_from_checkpoint(model_cfg, ckpt)
    val_set = PackedMapDataset(args.packed, "val", DatasetOptions.from_model(model_cfg))
    post = build_postprocess(model_cfg)

    start = time.perf_counter()
    deployed = RecordingPredictor(OrtPredictor.from_path(args.deployed, max(cfg.threads, 1), DEPLOYED_LEVEL))
    metrics, _ = evaluate_model(deployed, val_set, post, batch_size=cfg.batch_size, limit=args.limit)
    deployed_seconds = time.perf_counter() - start
    reference = RecordingPredictor(torch_predictor(qat, torch.device("cpu")))
    qat_metrics, _ = evaluate_model(reference, val_set, post, batch_size=cfg.batch_size, limit=args.limit)
    agreement = output_agreement(*deployed.outputs(), *reference.outputs(), model_cfg.pc_range, cfg.top_k)
    agreement.update(qat_mAP=qat_metrics["mAP"], mAP_delta=metrics["mAP"] - qat_metrics["mAP"])
    document = {k: v for k, v in metrics.items() if k.startswith(("mAP", "AP_"))}
    # The ORT time goes to MLflow only: a DVC-tracked file holds no wall-clock figure.
    document.update(samples=agreement["samples"], agreement=agreement)
    write_text_atomic(args.metrics, json.dumps(document, indent=2))
    print(
        f"deployed {args.deployed} on ONNX Runtime: val mAP {metrics['mAP']:.4f} over {agreement['samples']} "
        f"samples ({deployed_seconds:.0f} s); QAT in PyTorch {qat_metrics['mAP']:.4f}, delta "
        f"{agreement['mAP_delta']:+.4f}\n  max |diff| scores {agreement['scores_max_abs_diff']:.2e} "
        f"(mean {agreement['scores_mean_abs_diff']:.2e}), pts {agreement['pts_max_abs_diff_m']:.3f} m "
        f"(mean {agreement['pts_mean_abs_diff_m']:.4f} m); top-{cfg.top_k} classes identical "
        f"{100 * agreement['topk_class_agreement']:.2f}%"
    )

    log_val_metrics(run, document, model=args.deployed, source=args.qat_checkpoint)
    run.log_metrics({**{f"agreement/{k}": v for k, v in agreement.items()}, "seconds_ort": deployed_seconds})
    run.log_artifact(args.metrics)
    publish_ladder(run)  # the ladder to the group's run and the registered deployed / float versions


if __name__ == "__main__":
    cli.run(main)
