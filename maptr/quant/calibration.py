"""Calibration: run a fixed set of batches through the observers, then freeze the activation scales.

Deterministic by construction: the batches are a seeded selection of the training split without
augmentation, the observers are deterministic (see :mod:`maptr.quant.observers`), and the model runs in
eval mode under ``no_grad``; the same float checkpoint and the same batches give bit-identical scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from maptr.data.dataset import collate
from maptr.quant.fake_quant import (
    FakeQuantize,
    FakeQuantMode,
    WeightFakeQuantize,
    compute_fake_quant_qparams,
    set_fake_quant_mode,
)


def calibration_loader(dataset: Dataset, num_batches: int, batch_size: int, seed: int) -> DataLoader:
    """The first ``num_batches`` batches of a seeded permutation of ``dataset`` (no shuffling per epoch).

    Raises ValueError when the dataset is smaller than ``num_batches * batch_size``.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches}, {batch_size}")
    needed = num_batches * batch_size
    if needed > len(dataset):
        raise ValueError(f"calibration needs {needed} samples, the dataset has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:needed]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False, collate_fn=collate)


@torch.no_grad()
def observe(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | None = None) -> int:
    """Feeds ``batches`` (dicts with ``img`` and ``lidar2img``) through every observer; returns the count.

    Every fake-quant is put in OBSERVE mode first (activations pass through unchanged, so each observer
    sees the float model's values); the model runs in eval mode, the path that is deployed.
    """
    device = device or torch.device("cpu")
    set_fake_quant_mode(model, FakeQuantMode.OBSERVE)
    model.eval()
    count = 0
    for batch in batches:
        model(batch["img"].to(device), batch["lidar2img"].to(device))
        count += 1
    if count == 0:
        raise ValueError("calibration got no batches")
    return count


def freeze_calibration(model: nn.Module) -> int:
    """Turns every observer's range into scale / zero point and switches to QUANTIZE; returns how many."""
    count = compute_fake_quant_qparams(model)
    set_fake_quant_mode(model, FakeQuantMode.QUANTIZE)
    return count


def calibrate(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | None = None) -> int:
    """:func:`observe` then :func:`freeze_calibration`; returns the number of activation fake-quants set."""
    observe(model, batches, device)
    return freeze_calibration(model)


def activation_quants(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """(name, module) of every activation fake-quant (weight fake-quants follow their weights)."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize) and not isinstance(module, WeightFakeQuantize):
            yield name, module


def activation_scales(model: nn.Module) -> dict[str, tuple[float, int]]:
    """{name: (scale, zero_point)} of every activation fake-quant: what QAT keeps fixed."""
    return {name: (float(q.scale), int(q.zero_point)) for name, q in activation_quants(model)}
