"""Helpers the GPU check's phases share: configs from params.yaml, a repeated dataset, a trainer that keeps
nothing, seconds -> stats."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from maptr.config import ModelConfig, TrainConfig, load_model_config, load_section
from maptr.distributed import DistContext
from maptr.training.tracking import StageRun
from maptr.training.trainer import Trainer


def preset_config(params: dict[str, Any], preset: str) -> ModelConfig:
    """``model.presets.<preset>`` of params.yaml (validated like the pipeline's selected preset)."""
    params = copy.deepcopy(params)
    params["model"]["preset"] = preset
    return load_model_config(params)


def train_config(params: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The ``float`` section (float-train's strategy) with the check's overrides; no resume checkpoint
    within an epoch and no per-step logging (the check keeps neither)."""
    cfg = load_section(params, "float", TrainConfig)
    return dataclasses.replace(cfg, ckpt_every_steps=0, log_every_steps=10**9, **overrides)


@contextlib.contextmanager
def scratch_trainer(
    stage: str,
    model: nn.Module,
    criterion: nn.Module,
    train_set: Dataset,
    validate: Callable[[nn.Module], dict[str, float]],
    cfg: TrainConfig,
    ctx: DistContext,
    preset: str,
) -> Iterator[Trainer]:
    """float-train's :class:`Trainer` with its checkpoints in a temporary folder and no tracking: the
    check measures and keeps nothing."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{stage}_") as tmp, StageRun(stage, {}, enabled=False) as run:
        trainer = Trainer(
            model=model, criterion=criterion, train_set=train_set, validate=validate, cfg=cfg, ctx=ctx,
            tracker=run, stage=stage, preset=preset, best_path=Path(tmp) / "best.pt", last_path=Path(tmp) / "last.pt",
        )  # fmt: skip
        yield trainer


class RepeatedDataset(Dataset):
    """``length`` items cycling over a dataset (item i is item ``i % len(dataset)``), so that a few samples
    make an epoch of as many steps as wanted. ``set_epoch`` is forwarded (the trainer calls it)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        if length < 1 or len(dataset) < 1:
            raise ValueError(f"need length >= 1 and a non-empty dataset, got {length} and {len(dataset)} samples")
        self.dataset = dataset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.dataset[index % len(self.dataset)]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def seconds_stats(values: list[float]) -> dict[str, float]:
    """Median / mean / min / max of timings in milliseconds (n: how many)."""
    if not values:
        return {"n": 0}
    ms = [v * 1000.0 for v in values]
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }
