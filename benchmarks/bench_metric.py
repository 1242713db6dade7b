"""Time the chamfer-distance mAP on a synthetic validation set, against a per-pair loop.

1,000 samples, ~20 GT vectors and 50 predictions each (P = 20 points, 3 classes), 3 thresholds.
Predictions are noisy copies of GT (so the matching is realistic: many TPs, some FPs) plus random lines.

The per-pair loop is the protocol as MapTR's code runs it: per sample and class, every line resampled
with shapely, buffered (2 m, flat caps, mitre joins), an STRtree of the prediction buffers queried by
each GT buffer, one scipy ``cdist`` per intersecting pair, then the greedy TP/FP assignment. Both give
the same APs (checked here); ``maptr.evaluation`` decides most pairs from one distance matrix per group
and buffers only the few it cannot decide.

    .venv/bin/python benchmarks/bench_metric.py [--samples 1000] [--threads 1] [--loop-samples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from maptr.evaluation import evaluate
from maptr.evaluation.chamfer_ap import average_precision

THRESHOLDS = (0.5, 1.0, 1.5)
CLASSES = ("divider", "ped_crossing", "boundary")


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


def _resample(points: np.ndarray, num: int = 100) -> np.ndarray:
    from shapely.geometry import LineString

    line = LineString(points)
    return np.array([line.interpolate(d).coords[0] for d in np.linspace(0, line.length, num)])


def loop_evaluate(preds: list[dict], gts: list[dict]) -> dict[str, float]:
    """The per-pair loop (see the module docstring); returns the same keys as ``evaluate``."""
    from scipy.spatial.distance import cdist
    from shapely.geometry import LineString
    from shapely.strtree import STRtree

    def grow(points: np.ndarray):
        return LineString(points).buffer(2.0, cap_style="flat", join_style="mitre")

    metrics: dict[str, float] = {}
    class_aps = []
    for cls, name in enumerate(CLASSES):
        per_sample = []  # (scores, nearest distance, nearest GT index, number of GT) per sample
        for p, g in zip(preds, gts, strict=True):
            mine = [
                (s, _resample(v))
                for v, lab, s in zip(p["vectors"], p["labels"], p["scores"], strict=True)
                if lab == cls
            ]
            theirs = [_resample(v) for v, lab in zip(g["vectors"], g["labels"], strict=True) if lab == cls]
            scores = np.array([m[0] for m in mine], dtype=np.float64)
            dist = np.full((len(mine), len(theirs)), np.inf)
            if mine and theirs:
                pred_buffers = [grow(m[1]) for m in mine]
                tree = STRtree(pred_buffers)
                for j, gt_pts in enumerate(theirs):
                    gt_buffer = grow(gt_pts)
                    for i in tree.query(gt_buffer):
                        if pred_buffers[i].intersects(gt_buffer):
                            d = cdist(mine[i][1], gt_pts)
                            dist[i, j] = (d.min(1).mean() + d.min(0).mean()) / 2
            nearest = dist.min(axis=1) if theirs else np.full(len(mine), np.inf)
            nearest_id = dist.argmin(axis=1) if theirs else np.zeros(len(mine), dtype=np.int64)
            per_sample.append((scores, nearest, nearest_id, len(theirs)))
        num_gt = sum(s[3] for s in per_sample)
        aps = []
        for thr in THRESHOLDS:
            flags, all_scores = [], []
            for scores, nearest, nearest_id, n in per_sample:
                covered = np.zeros(n, dtype=bool)
                tp = np.zeros(len(scores), dtype=bool)
                for i in np.argsort(-scores, kind="stable"):
                    if nearest[i] <= thr and not covered[nearest_id[i]]:
                        covered[nearest_id[i]] = tp[i] = True
                flags.append(tp)
                all_scores.append(scores)
            order = np.argsort(-np.concatenate(all_scores), kind="stable")
            tp = np.concatenate(flags)[order].astype(np.float64)
            tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1 - tp)
            eps = np.finfo(np.float32).eps
            ap = average_precision(tp_cum / max(num_gt, eps), tp_cum / np.maximum(tp_cum + fp_cum, eps))
            metrics[f"AP_{name}_{thr}"] = ap
            aps.append(ap)
        class_aps.append(float(np.mean(aps)))
        metrics[f"AP_{name}"] = class_aps[-1]
    return {"mAP": float(np.mean(class_aps)), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-samples", type=int, default=0, help="also time the per-pair loop on this many samples")
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
    if args.loop_samples:
        n = args.loop_samples
        start = time.perf_counter()
        loop = loop_evaluate(preds[:n], gts[:n])
        loop_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = evaluate(preds[:n], gts[:n])
        fast_s = time.perf_counter() - start
        worst = max(abs(loop[k] - fast[k]) for k in fast)
        print(f"per-pair loop on {n} samples: {loop_s:.1f} s vs evaluate {fast_s:.2f} s: {loop_s / fast_s:.0f}x faster")
        print(f"largest AP difference loop vs evaluate: {worst:.2e}")


if __name__ == "__main__":
    main()
