"""Quantization-aware training: the calibrated model fine-tuned with fake quantization in the forward.

What moves and what does not (the guide's ``qat_8bit_weight_16bit_fixed_act``):

- activation scales and zero points are FIXED at their calibrated values: every activation
  ``FakeQuantize`` stays in QUANTIZE mode, where it neither observes nor has a gradient for its
  buffers, so no optimizer step or forward changes them (:func:`check_fixed_activation_scales`);
- weights train through the straight-through estimator, and their per-channel int8 scales follow
  them (``max |w_c| / 64`` recomputed every forward, see ``WeightFakeQuantize``), so a weight never clips;
- BatchNorm is folded (frozen statistics), as in the deployed model.

The training loop itself is :class:`~maptr.training.trainer.Trainer` (AdamW, schedule, DDP, resume), fed
by :class:`EpochSlices` so that a few short epochs still see different samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from maptr.quant.calibration import activation_quants
from maptr.quant.fake_quant import FakeQuantize, FakeQuantMode


class EpochSlices(Dataset):
    """``samples_per_epoch`` samples of a dataset per epoch: consecutive slices of one seeded permutation.

    Epoch e reads positions [e * n, (e + 1) * n) of the permutation (wrapping around), so short QAT epochs
    see different samples; the trainer's sampler then shuffles within the slice. ``set_epoch`` is
    forwarded to the wrapped dataset (its per-sample augmentation seeds).
    """

    def __init__(self, dataset: Dataset, samples_per_epoch: int, seed: int) -> None:
        if not 0 < samples_per_epoch <= len(dataset):
            raise ValueError(f"samples_per_epoch must be in [1, {len(dataset)}], got {samples_per_epoch}")
        self.dataset = dataset
        self.samples_per_epoch = samples_per_epoch
        self.order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        self.indices: list[int] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        start = epoch * self.samples_per_epoch
        total = len(self.order)
        self.indices = [self.order[(start + i) % total] for i in range(self.samples_per_epoch)]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def check_fixed_activation_scales(model: nn.Module) -> int:
    """Raises unless every activation fake-quant is calibrated and in QUANTIZE mode; returns how many.

    Those are the conditions under which a forward / backward / optimizer step cannot change them: the
    scale and zero point are buffers (no gradient), and only OBSERVE mode updates an observer.
    """
    count = 0
    for name, quant in activation_quants(model):
        if not quant.calibrated or quant.mode is not FakeQuantMode.QUANTIZE:
            raise RuntimeError(
                f"activation fake-quant {name!r} is {'not calibrated' if not quant.calibrated else quant.mode.value}: "
                "QAT starts from a calibrated model with every activation in QUANTIZE mode"
            )
        if quant.scale.requires_grad:
            raise RuntimeError(f"activation fake-quant {name!r} has a trainable scale: QAT keeps scales fixed")
        count += 1
    if count == 0:
        raise RuntimeError("the model has no activation fake-quant: QAT needs a calibrated quantized model")
    return count


def exclude_quant_buffers_from_ddp(model: nn.Module) -> int:
    """Tells DistributedDataParallel not to broadcast the fake-quant buffers; returns how many.

    DDP broadcasts every buffer from rank 0 before each forward, and gloo (the CPU backend) refuses
    int16 tensors ("Invalid scalar type"): the int16 zero points would stop QAT under torchrun. None of
    these buffers needs the broadcast: activation scales are fixed and loaded from the same checkpoint
    on every rank, and weight scales are recomputed from the weights, which DDP keeps identical.
    """
    names = [
        f"{module_name}.{buffer_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, FakeQuantize)
        for buffer_name, _ in module.named_buffers(recurse=False)
    ]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return len(names)
