"""Time the Hungarian matcher (cost matrices + scipy assignment) and one full criterion call.

Shapes of the brief: one2one Q = 50 queries vs N = 20 GT with S = 38 equivalent orders of P = 20
points; one2many Q = 150 (tiny preset, k = 3) and Q = 300 (r50 preset, k = 6) vs the GT repeated k times.

    .venv/bin/python benchmarks/bench_matcher.py [--batch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from maptr.config import load_model_config, load_params
from maptr.data.vectors import equivalent_orders
from maptr.training.criterion import build_criterion
from maptr.training.matcher import HungarianMatcher

PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
P, C = 20, 3


def gt_sample(rng: np.random.Generator, num_gt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels (N,), orders (N, 38, P, 2) and validity (N, 38); a third of the elements are rings."""
    orders, valid = [], []
    for i in range(num_gt):
        pts = rng.uniform([-15, -30], [15, 30], size=(P, 2)).astype(np.float32)
        closed = i % 3 == 1
        if closed:
            pts[-1] = pts[0]
        o, v = equivalent_orders(pts, closed)
        orders.append(o)
        valid.append(v)
    labels = torch.from_numpy(rng.integers(0, C, size=num_gt))
    return labels, torch.from_numpy(np.stack(orders)), torch.from_numpy(np.stack(valid))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-gt", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    gts = [gt_sample(rng, args.num_gt) for _ in range(args.batch)]
    labels = [g[0] for g in gts]
    orders = [g[1] for g in gts]
    valid = [g[2] for g in gts]
    matcher = HungarianMatcher(PC_RANGE)
    print(f"batch={args.batch} N={args.num_gt} S={orders[0].shape[1]} P={P} threads={args.threads}")
    for name, num_q, k in (("one2one", 50, 1), ("one2many tiny", 150, 3), ("one2many r50", 300, 6)):
        logits = torch.randn(args.batch, num_q, C)
        pts = torch.rand(args.batch, num_q, P, 2)
        ms = median_ms(lambda: matcher(logits, pts, labels, orders, valid, num_repeats=k), args.repeats)  # noqa: B023
        line = f"{name:14s} Q={num_q:3d} N*k={args.num_gt * k:3d}: {ms:7.2f} ms/batch  {ms / args.batch:6.2f} ms/sample"
        if k > 1:  # the same matching with the GT copies materialized, for comparison
            rep = (
                [t.repeat(k) for t in labels],
                [t.repeat(k, 1, 1, 1) for t in orders],
                [t.repeat(k, 1) for t in valid],
            )
            ms_rep = median_ms(lambda: matcher(logits, pts, *rep), args.repeats)  # noqa: B023
            line += f"  (GT copied k times: {ms_rep:.2f} ms/batch)"
        print(line)

    # One training-step criterion call of the tiny preset (2 decoder layers, one2one + one2many, seg).
    params = load_params("params.yaml")
    params["model"]["preset"] = "tiny"
    cfg = load_model_config(params)
    cfg.num_pts_per_vec = P
    criterion = build_criterion(cfg)
    b = args.batch

    def group(num_q: int) -> dict:
        layer = {"pred_logits": torch.randn(b, num_q, C), "pred_pts": torch.rand(b, num_q, P, 2)}
        layer["aux_outputs"] = [
            {"pred_logits": torch.randn(b, num_q, C), "pred_pts": torch.rand(b, num_q, P, 2)}
            for _ in range(cfg.decoder_layers - 1)
        ]
        return layer

    outputs = group(cfg.num_vec_one2one)
    outputs["one2many"] = group(cfg.num_vec_one2many)
    outputs["bev_seg"] = torch.randn(b, 1, cfg.bev_h, cfg.bev_w)
    outputs["pv_seg"] = torch.randn(b, 6, 1, 4, 11)
    batch = {
        "gt_labels": labels,
        "gt_orders": orders,
        "gt_orders_valid": valid,
        "bev_seg": (torch.rand(b, 1, cfg.bev_h, cfg.bev_w) > 0.9).float(),
        "pv_seg": (torch.rand(b, 6, 1, 16, 44) > 0.9).float(),
    }
    ms = median_ms(lambda: criterion(outputs, batch), max(3, args.repeats // 4))
    layers = f"{cfg.decoder_layers} layers x (one2one + one2many k={cfg.k_one2many})"
    print(f"criterion tiny preset ({layers}): {ms:.1f} ms/batch")


if __name__ == "__main__":
    main()
