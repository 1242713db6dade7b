"""Forward and forward+backward time of a MapTRv2 preset on this CPU (batch 1, 6 cameras).

    python benchmarks/bench_model.py --preset tiny
    python benchmarks/bench_model.py --preset tiny --set image_size=[256,96] --set embed_dims=128
    python benchmarks/bench_model.py --preset r50 --iters 1 --warmup 0 --mode forward   # ~15 s
    python benchmarks/bench_model.py --preset r50 --iters 1 --warmup 0 --mode train     # ~45 s, 10 GB
    python benchmarks/bench_model.py \\
        --compare "layer4:backbone_max_stride=32" --compare "C128:embed_dims=128;ffn_dims=256"

Forward = eval mode under no_grad (the deployed path, one2one only). Forward+backward = train mode
(one2many and segmentation heads included) with the loss = sum of every output, which costs the same
backward as the real criterion without its Hungarian matching. Prints min and median over ``--iters``;
min is the figure least disturbed by other processes on a shared machine. ``--compare`` times the
preset and each variant's forward+backward interleaved round-robin in one process, so that a change of
machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import ast
import copy
import statistics
import time
from collections.abc import Callable

import torch

from maptr.config import ModelConfig, load_model_config, load_params
from maptr.models.maptr import NUM_CAMS, build_maptr


def _sum_outputs(outputs) -> torch.Tensor:
    """Sum of every tensor in a (nested) output dict: a loss that touches every output."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().sum()
    if isinstance(outputs, dict):
        return sum((_sum_outputs(v) for v in outputs.values()), torch.zeros(()))
    if isinstance(outputs, list):
        return sum((_sum_outputs(v) for v in outputs), torch.zeros(()))
    raise TypeError(type(outputs))


def _override(cfg: ModelConfig, items: list[str]) -> ModelConfig:
    cfg = copy.deepcopy(cfg)
    for item in items:
        key, value = item.split("=", 1)
        if not hasattr(cfg, key):
            raise SystemExit(f"unknown model field {key!r}")
        setattr(cfg, key, ast.literal_eval(value))
    return cfg


def _steps(cfg: ModelConfig) -> tuple[int, Callable[[], None], Callable[[], None]]:
    """(parameter count, eval forward, train forward+backward) of a freshly built model."""
    torch.manual_seed(0)
    model = build_maptr(cfg)
    width, height = cfg.image_size
    img = torch.randn(1, NUM_CAMS, 3, height, width)
    # The cost does not depend on the camera geometry (static shapes, multiplicative masks).
    lidar2img = torch.eye(4).repeat(1, NUM_CAMS, 1, 1)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(img, lidar2img)

    def forward_backward() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        _sum_outputs(model(img, lidar2img)).backward()

    return sum(p.numel() for p in model.parameters()), forward, forward_backward


def _time(fn: Callable[[], None], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _ms(times: list[float]) -> str:
    return f"min {min(times) * 1e3:8.1f} ms  median {statistics.median(times) * 1e3:8.1f} ms"


def compare(cfg: ModelConfig, variants: list[str], rounds: int) -> None:
    """Interleaved forward+backward of the preset and of each ``name:field=value;field=value`` variant."""
    runs = {"preset as configured": _steps(cfg)}
    for spec in variants:
        name, _, fields = spec.partition(":")
        runs[name] = _steps(_override(cfg, fields.split(";")))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _, _, step in runs.values():
        step()  # warm-up
    for _ in range(rounds):
        for name, (_, _, step) in runs.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(f"forward+backward (train), interleaved, {rounds} rounds")
    for name, (num_params, _, _) in runs.items():
        print(f"  {name:<28} {num_params / 1e6:6.2f} M params  {_ms(times[name])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed runs (rounds with --compare)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="override a preset field, key=value")
    parser.add_argument("--mode", choices=("both", "forward", "train"), default="both")
    parser.add_argument("--compare", action="append", default=[], help="variant name:key=value;key=value")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    params["model"]["preset"] = args.preset
    params["model"]["pretrained"] = ""
    cfg = _override(load_model_config(params), args.set)
    width, height = cfg.image_size
    overrides = f" overrides {args.set}" if args.set else ""
    print(f"preset {args.preset}{overrides}: batch 1 x {NUM_CAMS} x {width}x{height}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.compare:
        compare(cfg, args.compare, args.iters)
        return
    num_params, forward, forward_backward = _steps(cfg)
    print(f"{num_params / 1e6:.2f} M params")
    runs = []
    if args.mode in ("both", "forward"):
        runs.append(("forward (eval, no_grad)", forward))
    if args.mode in ("both", "train"):
        runs.append(("forward+backward (train)", forward_backward))
    for name, fn in runs:
        times = _time(fn, args.iters, args.warmup)
        print(f"{name:<26} {_ms(times)}  ({args.iters} iters, {args.warmup} warmup)")


if __name__ == "__main__":
    main()
