"""Real training steps of one or more presets: packed batches, forward, criterion (with Hungarian
matching), backward and fused AdamW, as float-train runs them.

    python benchmarks/bench_train_step.py                            # the params' preset, ~15 s
    python benchmarks/bench_train_step.py --presets tiny nano        # interleaved A/B, ~1 min
    python benchmarks/bench_train_step.py --set num_vec_one2many=50 --set k_one2many=2
    python benchmarks/bench_train_step.py --precisions fp32 bf16   # bf16 autocast on the CPU, interleaved
    python benchmarks/bench_train_step.py --precisions fp32 compiled   # torch.compile (inductor), interleaved
    python benchmarks/bench_train_step.py --variant backbone_max_stride=16 --variant decoder_layers=3
                                                     # the preset as it is vs with each change, interleaved

With several presets, each round times every preset on the same batches in turn (round-robin), so a
change of the machine's speed hits them alike; the table gives each round's mean step time and the
mean over rounds (the first round is a warm-up and not counted).
"""

from __future__ import annotations

import argparse
import ast
import copy
import time

import torch

from maptr.config import load_model_config, load_params
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate
from maptr.models.maptr import build_maptr
from maptr.training.criterion import build_criterion
from maptr.training.device import float_outputs


def build_setup(params: dict, preset: str, overrides: list[str], packed: str, batch: int, batches: int,
                precision: str = "fp32"):  # fmt: skip
    """(step function, batches) of ``preset`` with ``key=value`` overrides of its fields; ``precision``
    bf16 runs the forward under CPU bf16 autocast (the criterion in float32, as the trainer does); ``compiled``
    runs the float32 forward through ``torch.compile`` (inductor; the backward is compiled with it)."""
    params = copy.deepcopy(params)
    params["model"]["preset"] = preset
    for item in overrides:
        key, value = item.split("=", 1)
        params["model"]["presets"][preset][key] = ast.literal_eval(value)
    cfg = load_model_config(params)
    ds = PackedMapDataset(packed, "train", DatasetOptions.from_model(cfg, augment=False))
    data = [collate([ds[i] for i in range(j * batch, (j + 1) * batch)]) for j in range(batches)]
    torch.manual_seed(0)
    model, criterion = build_maptr(cfg).train(), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    dtype = torch.bfloat16 if precision == "bf16" else None
    forward = torch.compile(model) if precision == "compiled" else model

    def step(b: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            outputs = forward(b["img"], b["lidar2img"])
        losses = criterion(float_outputs(outputs), b)
        optimizer.zero_grad()
        criterion.total_loss(losses).backward()
        optimizer.step()

    return step, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--packed", default="data/packed")
    p.add_argument("--presets", nargs="+", default=None, help="presets to time (default: model.preset)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=8, help="different batches per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds; the first is a warm-up")
    p.add_argument("--set", action="append", default=[], help="override a field of every preset, key=value")
    p.add_argument("--variant", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="also time each preset with these fields changed (repeatable: one variant each), "
                        "interleaved with the unchanged preset")  # fmt: skip
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "compiled"],
                   help="fp32, bf16 autocast of the forward, torch.compile'd fp32 (each preset timed in each; "
                        "the warm-up round holds the compile time)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    presets = args.presets or [params["model"]["preset"]]
    for change in (c for variant in args.variant for c in variant):
        if "=" not in change:
            p.error(f"--variant {change!r}: expected key=value, e.g. --variant decoder_layers=3")
    variants = [[], *args.variant]
    setups = {
        f"{name}/{precision}" + "".join(f" {c}" for c in variant): build_setup(
            params, name, [*args.set, *variant], args.packed, args.batch, args.batches, precision
        )
        for name in presets
        for precision in args.precisions
        for variant in variants
    }
    rounds: dict[str, list[float]] = {name: [] for name in setups}
    warmup: dict[str, float] = {}
    for r in range(args.rounds):
        for name, (step, data) in setups.items():
            start = time.perf_counter()
            for b in data:
                step(b)
            if r > 0:
                rounds[name].append((time.perf_counter() - start) / len(data))
            else:
                warmup[name] = time.perf_counter() - start  # includes torch.compile's compile time
    print(f"batch {args.batch}, {args.threads} threads, {args.batches} batches x {args.rounds - 1} timed rounds"
          f"{' ' + str(args.set) if args.set else ''}")  # fmt: skip
    for name, times in rounds.items():
        mean = sum(times) / len(times)
        per_round = " ".join(f"{t * 1000:.0f}" for t in times)
        print(f"  {name:<14} step {mean * 1000:.0f} ms ({args.batch / mean:.2f} samples/s); rounds: {per_round} ms; "
              f"warm-up round {warmup[name]:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
