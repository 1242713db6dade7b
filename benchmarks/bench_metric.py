"""Time the chamfer-distance mAP on a synthetic validation set.

1,000 samples, ~20 GT vectors and 50 predictions each (P = 20 points, 3 classes), 3 thresholds.
Predictions are noisy copies of GT (so the matching is realistic: many TPs, some FPs) plus random lines.

    .venv/bin/python benchmarks/bench_metric.py [--samples 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from maptr.evaluation import evaluate


def random_polylines(rng: np.random.Generator, num: int, num_pts: int) -> np.ndarray:
    """(num, num_pts, 2) gently curving lines inside the perception range, in meters."""
    start = rng.uniform([-15, -30], [15, 30], size=(num, 1, 2))
    heading = rng.uniform(0, 2 * np.pi, size=(num, 1))
    turn = rng.normal(0, 0.05, size=(num, num_pts - 1)).cumsum(axis=1)
    angles = np.concatenate([heading, heading + turn], axis=1)[:, :-1]  # (num, num_pts-1)
    steps = rng.uniform(0.5, 2.0, size=(num, 1, 1)) * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return np.concatenate([start, start + steps.cumsum(axis=1)], axis=1)  # (num, num_pts, 2)


def make_dataset(num_samples: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(num_samples):
        num_gt = int(rng.integers(15, 26))
        gt_vec = random_polylines(rng, num_gt, 20)
        gt_lab = rng.integers(0, 3, size=num_gt)
        # 35 noisy copies of GT (offsets 0-1.5 m, some labels wrong) + 15 random lines = 50 predictions.
        src = rng.integers(0, num_gt, size=35)
        copies = gt_vec[src] + rng.normal(0, 0.5, size=(35, 1, 2)) + rng.normal(0, 0.1, size=(35, 20, 2))
        copy_lab = np.where(rng.random(35) < 0.9, gt_lab[src], rng.integers(0, 3, size=35))
        pred_vec = np.concatenate([copies, random_polylines(rng, 15, 20)]).astype(np.float32)
        pred_lab = np.concatenate([copy_lab, rng.integers(0, 3, size=15)])
        gts.append({"vectors": gt_vec.astype(np.float32), "labels": gt_lab})
        preds.append({"vectors": pred_vec, "labels": pred_lab, "scores": rng.random(50).astype(np.float32)})
    return preds, gts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preds, gts = make_dataset(args.samples)
    num_pred = sum(len(p["labels"]) for p in preds)
    num_gt = sum(len(g["labels"]) for g in gts)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = evaluate(preds, gts)
        times.append(time.perf_counter() - start)
    print(f"samples={args.samples} predictions={num_pred} gt={num_gt} classes=3 thresholds=3 threads={args.threads}")
    print(f"evaluate: median {np.median(times):.2f} s, min {min(times):.2f} s over {args.repeats} runs")
    print(
        "mAP={mAP:.4f} AP_divider={AP_divider:.4f} AP_ped_crossing={AP_ped_crossing:.4f} "
        "AP_boundary={AP_boundary:.4f}".format(**metrics)
    )


if __name__ == "__main__":
    main()
