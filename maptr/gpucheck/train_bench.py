"""Training-step figures of a preset (r50 on the GPU) through float-train's trainer, on every rank of a
torchrun job: samples/s, the step split, peak memory per device, for float32 and bf16 autocast.

Each precision gets a fresh :class:`~maptr.training.trainer.Trainer` (the model and optimizer as
float-train builds them; DDP and SyncBatchNorm when the world size is > 1) and runs its own loader and
``_step`` (batch copy, forward under the trainer's autocast, float32 criterion with Hungarian matching,
backward, clipping, fused AdamW, scheduler). The loop around them is this module's: it times the wait for
each batch (``data``) and, through hooks (:class:`~maptr.training.device.StepPhases`), the phases of the
step, and stops at a step count or a time budget that all ranks agree on.

The data are ``r50.npz``'s 1600x900 samples read over and over with no item cache and with the guide's
augmentation, so every batch pays what a nuScenes batch pays: the 1/2-scale JPEG decode, the resize and
padding, the targets, colour jitter and GridMask.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from maptr.data.dataset import DatasetOptions
from maptr.data.portable import PortableMapDataset
from maptr.distributed import DistContext, gather_to_main
from maptr.gpucheck.common import RepeatedDataset, preset_config, scratch_trainer, seconds_stats, train_config
from maptr.models.maptr import build_maptr
from maptr.training.criterion import build_criterion
from maptr.training.device import PHASES, StepPhases, peak_memory_mib, reset_peak_memory, synchronize


def _sync_bn(ctx: DistContext) -> bool:
    """SyncBatchNorm with more than one GPU (torch's SyncBatchNorm has no CPU kernel: gloo runs plain BN)."""
    return ctx.world_size > 1 and ctx.device.type == "cuda"


def _all_agree_to_stop(stop: bool, ctx: DistContext) -> bool:
    """True on every rank when any rank wants to stop (ranks must run the same number of DDP steps)."""
    if not ctx.distributed:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _run_precision(
    params: dict[str, Any],
    samples: PortableMapDataset,
    ctx: DistContext,
    *,
    preset: str,
    precision: str,
    batch_size: int,
    warmup: int,
    steps: int,
    num_workers: int,
    augment: bool,
    deadline: float,
) -> dict[str, Any]:
    """Warm-up then timed steps of one precision on this rank; the per-rank figures."""
    model_cfg = preset_config(params, preset)
    length = (warmup + steps + 1) * batch_size * ctx.world_size  # one epoch covers every step
    cfg = train_config(
        params,
        epochs=1,
        batch_size=batch_size,
        num_workers=num_workers,
        augment=augment,
        sync_bn=_sync_bn(ctx),
        bf16=precision == "bf16",
        cache_mb=0,
    )
    torch.manual_seed(cfg.seed)
    model, criterion = build_maptr(model_cfg), build_criterion(model_cfg)
    train_set, no_validation = RepeatedDataset(samples, length), lambda m: {"mAP": 0.0}
    with scratch_trainer("bench", model, criterion, train_set, no_validation, cfg, ctx, preset) as trainer:
        autocast = str(trainer.autocast_dtype).replace("torch.", "") if trainer.autocast_dtype else "none"
        trainer.model.train()
        phases = StepPhases(trainer.ddp or trainer.model, trainer.criterion, trainer.optimizer, ctx.device)
        loader = iter(trainer._loader(0))
        data_s: list[float] = []
        losses: list[float] = []
        timed_wall = 0.0
        done = 0
        try:
            for i in range(warmup + steps):
                if i == warmup:
                    synchronize(ctx.device)
                    reset_peak_memory(ctx.device)
                    phases.steps.clear()
                    timed_start = time.perf_counter()
                t0 = time.perf_counter()
                batch = next(loader)
                waited = time.perf_counter() - t0
                phases.begin()
                logs = trainer._step(batch)
                phases.end()
                losses.append(logs["loss"])
                if i >= warmup:
                    data_s.append(waited)
                    done += 1
                    timed_wall = time.perf_counter() - timed_start
                if _all_agree_to_stop(time.perf_counter() > deadline, ctx):
                    break
        finally:
            phases.remove()
            del loader
        memory = peak_memory_mib(ctx.device)
        split = {name: seconds_stats([s[name] for s in phases.steps]) for name in (*PHASES, "total")}
        del trainer
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "precision": precision,
        "autocast": autocast,
        "timed_steps": done,
        "warmup_steps": warmup,
        "samples_per_s_rank": done * batch_size / timed_wall if done else float("nan"),
        "timed_wall_s": timed_wall,
        "data": seconds_stats(data_s),
        "split": split,
        "peak_memory_mib": memory,
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": losses[-1] if losses else float("nan"),
    }


def train_bench(
    params: dict[str, Any],
    data: str | Path,
    ctx: DistContext,
    *,
    preset: str,
    batch_size: int,
    warmup: int,
    steps: int,
    num_workers: int,
    time_budget_s: float,
    augment: bool = True,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
) -> dict[str, Any] | None:
    """Every precision's figures, gathered on rank 0 (None on other ranks).

    Args:
        params: loaded params.yaml; data: ``r50.npz``; ctx: this rank (torchrun).
        preset: model preset; batch_size: samples per step per rank.
        warmup / steps: untimed then timed steps per precision (fewer when the time budget ends first).
        num_workers: loader processes per rank; time_budget_s: for all precisions together, split evenly.
        augment: the guide's colour jitter + GridMask in the loader.
    Returns:
        {world_size, sync_bn, batch_size_per_rank, precisions: {name: {samples_per_s (all ranks), step
        split (ms), data wait (ms), peak memory per rank (MiB), losses, batch_size: per rank as run (halved
        after an out-of-memory error on a single GPU, listed in out_of_memory_at_batch)}}}.
    """
    model_cfg = preset_config(params, preset)
    samples = PortableMapDataset(data, DatasetOptions.from_model(model_cfg, augment=augment, seed=0, cache_mb=0))
    start = time.perf_counter()
    out: dict[str, Any] = {
        "world_size": ctx.world_size,
        "sync_bn": _sync_bn(ctx),
        "preset": preset,
        "batch_size_per_rank": batch_size,
        "num_workers": num_workers,
        "augment": augment,
        "image_size": list(model_cfg.image_size),
        "stored_image_size": list(samples.image_size),
        "precisions": {},
    }
    for k, precision in enumerate(precisions):
        share = (time_budget_s - (time.perf_counter() - start)) / (len(precisions) - k)
        deadline = time.perf_counter() + share
        batch, out_of_memory = batch_size, []
        while True:
            try:
                rank_result = _run_precision(
                    params,
                    samples,
                    ctx,
                    preset=preset,
                    precision=precision,
                    batch_size=batch,
                    warmup=warmup,
                    steps=steps,
                    num_workers=num_workers,
                    augment=augment,
                    deadline=deadline,
                )
                break
            except torch.OutOfMemoryError:
                # One rank alone can retry (several would desynchronise DDP): halve the batch, say so.
                if ctx.distributed or batch == 1:
                    raise
                out_of_memory.append(batch)
            gc.collect()  # the failed step's tensors, now that the exception is gone
            torch.cuda.empty_cache()
            batch //= 2
        rank_result.update(batch_size=batch, out_of_memory_at_batch=out_of_memory)
        gathered = gather_to_main([rank_result], ctx)
        if gathered is None:
            continue
        main = gathered[0]
        main["samples_per_s"] = sum(r["samples_per_s_rank"] for r in gathered)
        main["peak_memory_mib_per_rank"] = [r["peak_memory_mib"] for r in gathered]
        main["step_median_ms_per_rank"] = [r["split"]["total"].get("median_ms") for r in gathered]
        out["precisions"][precision] = main
    return out if ctx.is_main else None
