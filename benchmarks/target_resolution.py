"""How far the training target is from the ground truth the metric scores, per class.

The model regresses each map element as ``num_pts_per_vec`` points evenly spaced along it; the metric
compares predictions with the GT at its full resolution (both resampled to 100 points, chamfer distance,
thresholds 0.5 / 1.0 / 1.5 m). A perfect model of the N-point target is therefore still this far from the
GT: a floor under every chamfer distance, which matters for polygons (ped crossings: corners cut).

    .venv/bin/python benchmarks/target_resolution.py [--packed data/packed] [--split val] [--points 10 20]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packed", default="data/packed", help="pack stage output")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--points", type=int, nargs="+", default=[10, 20], help="points per vector to compare")
    args = p.parse_args()
    if min(args.points) < 2:
        p.error(f"--points: every count must be >= 2, got {args.points}")

    import torch

    from maptr.classes import CLASS_NAMES
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.data.vectors import resample_polyline
    from maptr.evaluation.chamfer_ap import chamfer_distance_matrix, resample_polylines

    ds = PackedMapDataset(args.packed, args.split, DatasetOptions())
    dist: dict[tuple[int, int], list[float]] = {}
    for i in range(len(ds)):
        gt = ds.ground_truth(i)
        for vector, label in zip(gt["vectors"], gt["labels"], strict=True):
            if len(vector) < 2:
                continue
            full = resample_polylines(torch.as_tensor(vector[None], dtype=torch.float32))  # (1, 100, 2)
            for n in args.points:
                target = torch.as_tensor(resample_polyline(vector, n)[None], dtype=torch.float32)  # (1, n, 2)
                d = chamfer_distance_matrix(resample_polylines(target), full)[0, 0]
                dist.setdefault((int(label), n), []).append(float(d))
    print(f"{args.packed} {args.split}: chamfer distance (m) of the N-point target to the full-resolution GT")
    print(f"  {'class':<14} {'N':>3} {'elements':>8} {'mean':>6} {'p90':>6} {'max':>6}")
    for (label, n), values in sorted(dist.items()):
        v = np.asarray(values)
        p90 = np.percentile(v, 90)
        print(f"  {CLASS_NAMES[label]:<14} {n:>3} {len(v):>8} {v.mean():6.3f} {p90:6.3f} {v.max():6.3f}")


if __name__ == "__main__":
    main()
