"""Does it learn on this device: nano trained through float-train's code path on the small learn set
until its train-set mAP passes a target, within a fixed step budget.

The code path is float-train's: :class:`~maptr.training.trainer.Trainer` (AdamW, warmup + cosine,
clipping, the bf16 / float32 rule, checkpoints into a temporary folder), the real model and criterion,
validation by :func:`~maptr.evaluation.inference.evaluate_model` (post-processing and the chamfer mAP).
Only the data differ: the samples of ``learn.npz``, cycled so that an epoch is ``eval_every`` steps,
and scored on themselves (train-set mAP: can the device fit what it is shown).
The run stops at the first validation that reaches the target, or when the step budget or the time
budget is spent.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from maptr.data.dataset import DatasetOptions
from maptr.data.portable import PortableMapDataset
from maptr.distributed import DistContext
from maptr.evaluation.inference import evaluate_model, torch_predictor
from maptr.evaluation.postprocess import build_postprocess
from maptr.gpucheck.common import RepeatedDataset, preset_config, scratch_trainer, train_config
from maptr.models.maptr import build_maptr
from maptr.training.criterion import build_criterion


class _Stop(Exception):
    """Raised by the validation callback to end ``Trainer.fit`` (target reached or time spent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def learn_check(
    params: dict[str, Any],
    data: str | Path,
    device: torch.device,
    *,
    preset: str = "nano",
    target: float = 0.3,
    max_steps: int = 1000,
    eval_every: int = 50,
    batch_size: int = 4,
    time_budget_s: float = 150.0,
    bf16: bool = False,
) -> dict[str, Any]:
    """Train ``preset`` on ``data`` (a portable set) until train-set mAP >= ``target``.

    Args:
        params: loaded params.yaml (``model.presets.<preset>``, the ``float`` section's strategy).
        data: ``learn.npz``.
        device: where to train (one device; the trainer's world size is 1).
        target: train-set mAP to reach; max_steps: optimizer steps at most (also the cosine's length).
        eval_every: steps between validations (one epoch of the repeated set).
        batch_size: samples per step.
        time_budget_s: no new epoch starts after this many seconds.
        bf16: autocast the forward to bfloat16 (float.bf16 = true: on any device, the CPU smoke included).
    Returns:
        passed, steps, seconds, steps_to_target (or None), curve [{step, seconds, mAP, AP_*...}], settings.
    """
    model_cfg = preset_config(params, preset)
    opts = DatasetOptions.from_model(model_cfg, augment=False, seed=0, cache_mb=1024)
    samples = PortableMapDataset(data, opts)  # decoded once (cache), then read by training and validation
    epochs = max(1, math.ceil(max_steps / eval_every))  # an epoch of the repeated set = eval_every steps
    cfg = train_config(
        params,
        epochs=epochs,
        batch_size=batch_size,
        num_workers=0,
        augment=False,
        sync_bn=False,
        bf16=bf16,
        threads=0,
        cache_mb=1024,
        warmup_steps=min(100, max_steps // 10),
    )
    torch.manual_seed(cfg.seed)
    model, criterion, post = build_maptr(model_cfg), build_criterion(model_cfg), build_postprocess(model_cfg)
    ctx = DistContext(device=device)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()

    def validate(m: torch.nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_model(torch_predictor(m, device), samples, post, batch_size=8)
        elapsed = time.perf_counter() - start
        curve.append({"step": trainer.state.global_step, "seconds": round(elapsed, 2), **metrics})
        if metrics["mAP"] >= target:
            raise _Stop("target reached")
        if elapsed > time_budget_s:
            raise _Stop(f"time budget of {time_budget_s:.0f} s spent")
        return metrics

    reason = "step budget spent"
    train_set = RepeatedDataset(samples, eval_every * batch_size)
    with scratch_trainer("learn", model, criterion, train_set, validate, cfg, ctx, preset) as trainer:
        try:
            trainer.fit()
        except _Stop as stop:
            reason = stop.reason
    best = max(curve, key=lambda c: c["mAP"]) if curve else {"mAP": float("nan")}
    reached = [c["step"] for c in curve if c["mAP"] >= target]
    return {
        "passed": bool(reached),
        "target": target,
        "stopped": reason,
        "steps": curve[-1]["step"] if curve else 0,
        "seconds": round(time.perf_counter() - start, 2),
        "steps_to_target": reached[0] if reached else None,
        "best_mAP": best["mAP"],
        "curve": curve,
        "settings": {
            "preset": preset,
            "samples": len(samples),
            "batch_size": batch_size,
            "max_steps": max_steps,
            "eval_every": eval_every,
            "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps,
            "epochs_planned": epochs,
            "bf16": bf16,
            "time_budget_s": time_budget_s,
        },
    }
