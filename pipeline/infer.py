"""The guide's visual inference: predict the map of some samples and draw it over the six cameras and in BEV.

    python pipeline/infer.py --checkpoint models/float-checkpoint-best.pt --samples 0 17 42 --out reports/infer

Predictions are drawn on the original camera images (projected onto the ground through the sample's
calibration) beside the BEV prediction and the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maptr import cli, viz
from maptr.config import load_model_config, load_params
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate, decode_jpeg
from maptr.evaluation.postprocess import build_postprocess
from maptr.models.maptr import build_maptr
from maptr.training.checkpoint import load_checkpoint


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", default="models/float-checkpoint-best.pt", help="model checkpoint")
    p.add_argument("--packed", default="data/packed", help="packed dataset")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--samples", type=int, nargs="+", default=[0], help="sample indices in the split")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw predictions scoring at least this")
    p.add_argument("--out", default="reports/infer", help="folder for the PNGs")
    args = p.parse_args()

    model_cfg = load_model_config(load_params(args.params))
    model = build_maptr(model_cfg)
    model.load_state_dict(load_checkpoint(args.checkpoint, expect_preset=model_cfg.preset)["model"])
    model.eval()
    post = build_postprocess(model_cfg)
    dataset = PackedMapDataset(args.packed, args.split, DatasetOptions.from_model(model_cfg))
    for index in args.samples:
        if not 0 <= index < len(dataset):
            raise cli.UserError(f"--samples: {index} is outside the {args.split} split (0..{len(dataset) - 1})")
        batch = collate([dataset[index]])
        with torch.no_grad():
            out = model(batch["img"], batch["lidar2img"])
        pred = post(out["pred_logits"], out["pred_pts"])[0]
        rec = dataset.read_record(index)
        images = [decode_jpeg(j, f"{args.split} record {index}") for j in rec.jpegs]
        path = Path(args.out) / f"{args.split}_{index:04d}.png"
        viz.camera_overlay(
            images, rec.cams, rec.lidar2img, rec.lidar2ego, pred, model_cfg.pc_range, path,
            gt=dataset.ground_truth(index), score_threshold=args.score_threshold,
            title=f"{Path(args.checkpoint).name}: {args.split} sample {index} ({rec.token[:8]})",
        )  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
