"""Where one float-train step goes: loading, forward, criterion, backward, clipping, AdamW, and the loop's
bookkeeping (MLflow metric logging, resume checkpoints), over real shuffled batches of the packed set.

    python benchmarks/bench_train_loop.py --steps 30 --batch 2
    python benchmarks/bench_train_loop.py --camera-paths     # visible-pairs vs dense spatial cross-attention
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from maptr.config import TrainConfig, load_model_config, load_params, load_section
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate
from maptr.models.maptr import build_maptr
from maptr.models.spatial_cross_attention import SpatialCrossAttention
from maptr.training.checkpoint import save_checkpoint
from maptr.training.criterion import build_criterion
from maptr.training.trainer import build_optimizer

PHASES = ("load", "forward", "criterion", "backward", "clip", "adamw")


def _training_setup(params: dict, packed: str, batch: int):
    """Seeded tiny model in train mode, its criterion and AdamW, and a shuffled loader of the packed set."""
    cfg = load_section(params, "float", TrainConfig)
    model_cfg = load_model_config(params)
    torch.manual_seed(0)
    dataset = PackedMapDataset(packed, "train", DatasetOptions.from_model(model_cfg, False, 0))
    model, criterion = build_maptr(model_cfg), build_criterion(model_cfg)
    model.train()
    optimizer = build_optimizer(model, cfg)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=0)
    return cfg, model, criterion, optimizer, loader


def time_steps(params: dict, packed: str, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """Mean milliseconds per step of each phase over ``steps`` steps after ``warmup``."""
    cfg, model, criterion, optimizer, loader = _training_setup(params, packed, batch)
    batches = iter(loader)
    totals = dict.fromkeys(PHASES, 0.0)
    for i in range(warmup + steps):
        marks = [time.perf_counter()]
        b = next(batches)
        marks.append(time.perf_counter())
        out = model(b["img"], b["lidar2img"])
        marks.append(time.perf_counter())
        total = criterion.total_loss(criterion(out, b))
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if i >= warmup:
            for name, t0, t1 in zip(PHASES, marks[:-1], marks[1:], strict=True):
                totals[name] += t1 - t0
    ms = {name: 1000 * t / steps for name, t in totals.items()}
    # A resume checkpoint as the Trainer writes it: model + AdamW state + RNG.
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_checkpoint(os.path.join(tmp, "last.pt"), {"model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()})  # fmt: skip
        ms["checkpoint_once"] = 1000 * (time.perf_counter() - start)
        ms["log_metrics_once"] = time_mlflow_log(tmp)
    return ms


def time_mlflow_log(folder: str, calls: int = 20) -> float:
    """Milliseconds of one ``log_metrics`` call of 16 training metrics into a fresh sqlite store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    mlflow.set_experiment("bench")
    with mlflow.start_run():
        metrics = {f"train/loss_{i}": float(i) for i in range(16)}
        start = time.perf_counter()
        for step in range(calls):
            mlflow.log_metrics(metrics, step=step)
        return 1000 * (time.perf_counter() - start) / calls


def compare_camera_paths(params: dict, packed: str, batch: int, batches: int = 10, rounds: int = 4) -> dict:
    """ms per training step with the spatial cross-attention's visible-pairs path vs its dense path.

    The same ``batches`` real batches, the two paths alternating in one process for ``rounds`` rounds, so
    that machine load hits both alike. Returns {"visible": [ms per round], "dense": [...]}.
    """
    _, model, criterion, optimizer, loader = _training_setup(params, packed, batch)
    cached = [b for _, b in zip(range(batches), loader, strict=False)]
    results: dict[str, list[float]] = {"visible": [], "dense": []}
    for _ in range(rounds):
        for path in results:
            for module in model.modules():
                if isinstance(module, SpatialCrossAttention):
                    module.gather_visible = path == "visible"
            start = time.perf_counter()
            for b in cached:
                total = criterion.total_loss(criterion(model(b["img"], b["lidar2img"]), b))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
            results[path].append(1000 * (time.perf_counter() - start) / len(cached))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--packed", default="data/packed")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--camera-paths", action="store_true", help="time visible-pairs vs dense camera attention")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    if args.camera_paths:
        for path, rounds in compare_camera_paths(params, args.packed, args.batch).items():
            print(f"{path:<8} ms/step per round: {', '.join(f'{ms:.0f}' for ms in rounds)}")
        return
    ms = time_steps(params, args.packed, args.batch, args.steps)
    step = sum(ms[name] for name in PHASES)
    cfg = load_section(params, "float", TrainConfig)
    per_step = ms["log_metrics_once"] / cfg.log_every_steps + ms["checkpoint_once"] / cfg.ckpt_every_steps
    print(f"batch {args.batch}, {args.threads} threads, mean of {args.steps} steps: {step:.0f} ms/step "
          f"({args.batch * 1000 / step:.2f} samples/s)")  # fmt: skip
    for name in PHASES:
        print(f"  {name:<10} {ms[name]:7.1f} ms  {100 * ms[name] / step:5.1f} %")
    print(
        f"  bookkeeping: log_metrics {ms['log_metrics_once']:.1f} ms every {cfg.log_every_steps} steps, "
        f"checkpoint {ms['checkpoint_once']:.0f} ms every {cfg.ckpt_every_steps} steps = {per_step:.1f} ms/step"
    )


if __name__ == "__main__":
    main()
