"""Regenerate the README's pictures of the synthetic data from the pipeline's outputs.

python docs/make_figures.py            # after `dvc repro pack`
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from maptr import viz
from maptr.data.dataset import DatasetOptions, PackedMapDataset, decode_jpeg
from maptr.data.synthetic.preview import save_mosaics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", default="data/nuscenes")
    p.add_argument("--packed", default="data/packed")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    png = save_mosaics(args.dataroot, "v1.0-trainval", f"{args.out}/synth_cameras.png", num_samples=3)
    mosaic = cv2.imread(str(png))  # photos: a JPEG is a tenth of the PNG's size
    cv2.imwrite(f"{args.out}/synth_cameras.jpg", mosaic, [cv2.IMWRITE_JPEG_QUALITY, 85])
    png.unlink()
    ds = PackedMapDataset(args.packed, "val", DatasetOptions())
    for n, index in enumerate((0, len(ds) // 2)):
        rec, gt = ds.read_record(index), ds.ground_truth(index)
        images = [decode_jpeg(j, "readme") for j in rec.jpegs]
        shown = dict(vectors=gt["vectors"], labels=gt["labels"], scores=np.ones(len(gt["labels"])))
        viz.camera_overlay(
            images, rec.cams, rec.lidar2img, rec.lidar2ego, shown, ds.info["pc_range"], f"{args.out}/gt_overlay{n}.png",
            title=f"val sample {index}: packed ground truth projected into the rendered cameras",
            pred_title="ground truth (BEV)",
        )  # fmt: skip


if __name__ == "__main__":
    main()
