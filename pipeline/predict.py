"""The guide's `predict`: validation mAP of a stage's checkpoint on the packed val split.

python pipeline/predict.py --stage float
python pipeline/predict.py --stage calibration      # or qat: the fake-quant model of that stage
python pipeline/predict.py --stage int_infer        # the deployed model (models/maptr_deploy.onnx) on ONNX Runtime
python pipeline/predict.py --stage float --checkpoint models/float-checkpoint-best.pt --limit 50
"""

from __future__ import annotations

import json
import time

from maptr import cli

STAGES = {
    "float": "models/float-checkpoint-best.pt",
    "calibration": "models/calibration-checkpoint-best.pt",
    "qat": "models/qat-checkpoint-best.pt",
    "int_infer": "models/maptr_deploy.onnx",  # ONNX Runtime, the validate stage's model
}


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--stage", choices=sorted(STAGES), default="float", help="which model to evaluate")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the stage's best; int_infer: .onnx)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (int_infer)")
    p.add_argument("--packed", default="data/packed", help="packed dataset")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import load_model_config, load_params
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.deploy.ort_runner import DEPLOYED_LEVEL, OrtPredictor
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint

    model_cfg = load_model_config(load_params(args.params))
    path = args.checkpoint or STAGES[args.stage]
    if args.stage == "int_infer":
        predictor = OrtPredictor.from_path(path, args.threads, DEPLOYED_LEVEL)
    else:
        # Float, or the fake-quant model rebuilt from the quantization config the checkpoint carries.
        model = build_model_from_checkpoint(model_cfg, load_checkpoint(path, expect_preset=model_cfg.preset))
        predictor = torch_predictor(model, torch.device("cpu"))
    dataset = PackedMapDataset(args.packed, args.split, DatasetOptions.from_model(model_cfg))
    start = time.perf_counter()
    metrics, _ = evaluate_model(
        predictor,
        dataset,
        build_postprocess(model_cfg),
        batch_size=args.batch_size,
        limit=args.limit,
    )
    seconds = time.perf_counter() - start
    print(f"{args.stage} {path} on {args.split} ({args.limit or len(dataset)} samples, {seconds:.1f} s)")
    for key in ("mAP", "AP_divider", "AP_ped_crossing", "AP_boundary"):
        print(f"  {key:<16} {metrics[key]:.4f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(metrics, indent=2))


if __name__ == "__main__":
    cli.run(main)
