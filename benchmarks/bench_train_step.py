"""One real training step of a preset: a packed batch, forward, criterion (with Hungarian matching),
backward and fused AdamW, as float-train runs it.

    python benchmarks/bench_train_step.py --batch 2 --threads 2
    python benchmarks/bench_train_step.py --set num_vec_one2many=50 --set k_one2many=2
"""

from __future__ import annotations

import argparse
import ast
import time

import torch

from maptr.config import load_model_config, load_params
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate
from maptr.models.maptr import build_maptr
from maptr.training.criterion import build_criterion


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--packed", default="data/packed")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--set", action="append", default=[], help="override a field of the chosen preset, key=value")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    preset = params["model"]["preset"]
    for item in args.set:
        key, value = item.split("=", 1)
        params["model"]["presets"][preset][key] = ast.literal_eval(value)
    cfg = load_model_config(params)
    ds = PackedMapDataset(args.packed, "train", DatasetOptions.from_model(cfg, augment=True))
    batch = collate([ds[i] for i in range(args.batch)])
    model, criterion = build_maptr(cfg), build_criterion(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        losses = criterion(model(batch["img"], batch["lidar2img"]), batch)
        optimizer.zero_grad()
        criterion.total_loss(losses).backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    best = min(times)
    print(f"preset {preset} {args.set or ''}: batch {args.batch}, {args.threads} threads: step {best * 1000:.0f} ms "
          f"(min of {args.iters}), {args.batch / best:.2f} samples/s")  # fmt: skip


if __name__ == "__main__":
    main()
