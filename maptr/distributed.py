"""torchrun integration: process group from the environment, rank helpers, metric reduction.

The same script runs alone (world size 1, no process group) or under ``torchrun --nproc_per_node=N``
(optionally ``--nnodes``): gloo on CPU, nccl on GPU. Only rank 0 writes files and logs to MLflow.
Training and evaluation (a val pass sharded over ranks) both use it, so it sits beside them, in neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """Join the process group that torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_across_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average scalar metrics over ranks (losses logged by rank 0 then describe the whole batch)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def gather_to_main(items: list, ctx: DistContext) -> list | None:
    """Concatenate per-rank Python lists on rank 0 (None elsewhere)."""
    if not ctx.distributed:
        return items
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(items, gathered, dst=0)
    return [x for part in gathered for x in part] if ctx.is_main else None


def broadcast_from_main(obj, ctx: DistContext):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
