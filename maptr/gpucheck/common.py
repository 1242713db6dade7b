"""Helpers the GPU check's phases share: configs from params.yaml, a repeated dataset, seconds -> stats."""

from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any

from torch.utils.data import Dataset

from maptr.config import ModelConfig, TrainConfig, load_model_config, load_section


def preset_config(params: dict[str, Any], preset: str) -> ModelConfig:
    """``model.presets.<preset>`` of params.yaml (validated like the pipeline's selected preset)."""
    params = copy.deepcopy(params)
    params["model"]["preset"] = preset
    return load_model_config(params)


def train_config(params: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The ``float`` section (float-train's strategy) with the check's overrides."""
    return dataclasses.replace(load_section(params, "float", TrainConfig), **overrides)


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
