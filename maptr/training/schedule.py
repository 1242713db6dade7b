"""The guide's learning-rate schedule: linear warmup by step, then cosine annealing to a floor.

``CosineAnnealingLrUpdater(warmup_len=500, warmup_by="step", warmup_lr_ratio=1/3, stop_lr=1e-3 * lr)``:
the factor starts at ``warmup_ratio`` and rises linearly to 1 over ``warmup_steps``, then follows a cosine
from 1 down to ``min_lr_ratio`` at ``total_steps``. Parameter groups keep their own base lr (the
backbone's is 0.1x), so the factor multiplies each group's base lr.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict holds the position for --resume."""
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio,
            min_lr_ratio=min_lr_ratio,
        ),
    )
