"""The guide's visual inference (infer / infer_hbir): predict the map and draw it over the six cameras and in BEV.

    python pipeline/infer.py --checkpoint models/float-checkpoint-best.pt --samples 0 17 42 --out reports/infer
    python pipeline/infer.py --onnx models/maptr_deploy.onnx --samples 0          # deployed, ONNX Runtime
    python pipeline/infer.py --onnx models/maptr_deploy.onnx \
        --images f.jpg fr.jpg fl.jpg b.jpg bl.jpg br.jpg --calib calib.json

Predictions are drawn on the original camera images (projected onto the ground through the sample's
calibration) beside the BEV prediction and, for packed samples, the ground truth. `--onnx` runs an
exported / deployed model on ONNX Runtime instead of a checkpoint in PyTorch, with the same
post-processing. `--images` takes one frame's six camera images (any size; resized and cropped to the
model's input as in training) in the order of the calib file, whose JSON holds `lidar2img` (6 x 4 x 4,
LiDAR -> pixels of those original images), optionally `lidar2ego` (4 x 4, default identity: the LiDAR
frame on the ground's reference) and `cams` (6 names).
"""

from __future__ import annotations

import json
from pathlib import Path

from maptr import cli

NUM_CAMS = 6


def read_frame(image_paths: list[str], calib_path: str) -> tuple[list, dict]:
    """Six RGB images (numpy) and their calibration {lidar2img (6, 4, 4), lidar2ego (4, 4), cams} from files."""
    import cv2
    import numpy as np

    if len(image_paths) != NUM_CAMS:
        raise cli.UserError(f"--images: expected {NUM_CAMS} camera images, got {len(image_paths)}")
    images = []
    for path in image_paths:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise cli.UserError(f"{path}: not a readable image")
        images.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    try:
        calib = json.loads(Path(calib_path).read_text())
        lidar2img = np.asarray(calib["lidar2img"], dtype=np.float64)  # (6, 4, 4)
        lidar2ego = np.asarray(calib.get("lidar2ego", np.eye(4)), dtype=np.float64)  # (4, 4)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise cli.UserError(f"{calib_path}: expected JSON with lidar2img (6 x 4 x 4) ({exc})") from None
    if lidar2img.shape != (NUM_CAMS, 4, 4) or lidar2ego.shape != (4, 4):
        raise cli.UserError(f"{calib_path}: lidar2img must be 6 x 4 x 4 and lidar2ego 4 x 4, got "
                            f"{lidar2img.shape} and {lidar2ego.shape}")  # fmt: skip
    cams = list(calib.get("cams", [f"CAM_{i}" for i in range(NUM_CAMS)]))
    return images, {"lidar2img": lidar2img, "lidar2ego": lidar2ego, "cams": cams}


def network_inputs(images: list, lidar2img, image_size: list[int]) -> tuple:
    """Original views -> img (1, 6, 3, H, W) normalized, lidar2img (1, 6, 4, 4) for those pixels (no augmentation)."""
    import torch

    from maptr.data.transforms import MultiViewImageTransform, fit_to_size

    fitted, mats = fit_to_size(images, lidar2img, image_size[0], image_size[1])
    img = MultiViewImageTransform(augment=False)(fitted, torch.Generator())  # (6, 3, H, W)
    return img[None], torch.from_numpy(mats)[None]


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", default="models/float-checkpoint-best.pt", help="model checkpoint (PyTorch)")
    p.add_argument("--onnx", default=None, help="run this ONNX model on ONNX Runtime instead (e.g. the deployed one)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (--onnx)")
    p.add_argument("--packed", default="data/packed", help="packed dataset")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--samples", type=int, nargs="+", default=[0], help="sample indices in the split")
    p.add_argument("--images", nargs="+", default=None, help="six camera images of one frame (with --calib)")
    p.add_argument("--calib", default=None, help="JSON calibration of --images")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw predictions scoring at least this")
    p.add_argument("--out", default="reports/infer", help="folder for the PNGs")
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import torch

    from maptr import viz
    from maptr.config import load_model_config, load_params
    from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate, decode_jpeg
    from maptr.deploy.ort_runner import DEPLOYED_LEVEL, OrtPredictor
    from maptr.evaluation.inference import Predictor, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint

    if (args.images is None) != (args.calib is None):
        raise cli.UserError("--images and --calib go together")

    model_cfg = load_model_config(load_params(args.params))
    if args.onnx:
        predictor: Predictor = OrtPredictor.from_path(args.onnx, args.threads, DEPLOYED_LEVEL)
        source = Path(args.onnx).name
    else:
        ckpt = load_checkpoint(args.checkpoint, expect_preset=model_cfg.preset)
        predictor = torch_predictor(build_model_from_checkpoint(model_cfg, ckpt), torch.device("cpu"))
        source = Path(args.checkpoint).name
    post = build_postprocess(model_cfg)

    if args.images is not None:
        images, calib = read_frame(args.images, args.calib)
        with torch.no_grad():
            pred = post(*predictor(*network_inputs(images, calib["lidar2img"], model_cfg.image_size)))[0]
        path = Path(args.out) / f"{Path(args.images[0]).stem}.png"
        viz.camera_overlay(
            images, calib["cams"], calib["lidar2img"], calib["lidar2ego"], pred, model_cfg.pc_range, path,
            score_threshold=args.score_threshold, title=f"{source}: {Path(args.calib).name}",
        )  # fmt: skip
        print(f"wrote {path}")
        return

    dataset = PackedMapDataset(args.packed, args.split, DatasetOptions.from_model(model_cfg))
    for index in args.samples:
        if not 0 <= index < len(dataset):
            raise cli.UserError(f"--samples: {index} is outside the {args.split} split (0..{len(dataset) - 1})")
        batch = collate([dataset[index]])
        with torch.no_grad():
            pred = post(*predictor(batch["img"], batch["lidar2img"]))[0]
        rec = dataset.read_record(index)
        images = [decode_jpeg(j, f"{args.split} record {index}") for j in rec.jpegs]
        path = Path(args.out) / f"{args.split}_{index:04d}.png"
        viz.camera_overlay(
            images, rec.cams, rec.lidar2img, rec.lidar2ego, pred, model_cfg.pc_range, path,
            gt=dataset.ground_truth(index), score_threshold=args.score_threshold,
            title=f"{source}: {args.split} sample {index} ({rec.token[:8]})",
        )  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
