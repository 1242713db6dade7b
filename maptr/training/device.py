"""Device handling shared by the trainer and the GPU check: autocast, output precision, synchronised
phase timing of training steps, peak memory and a description of the device.

The pipeline's rule for bf16 is ``float.bf16``: ``true`` autocasts the forward to bfloat16 on any device,
``false`` never, ``auto`` where the device computes bfloat16 natively (a CUDA GPU that supports it, a CPU
with AVX512-BF16 or AMX-BF16; elsewhere CPU autocast emulates bf16 and is slower than float32). The
model's forward runs under autocast, of which the model lets only its image side (backbone and neck) run
in bf16 (:mod:`maptr.models.precision`); the criterion always sees float32 outputs
(:func:`float_outputs`), so losses, matching costs and the focal terms are computed in float32 whatever
the forward's precision.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (``CPU_BF16_FLAGS`` in /proc/cpuinfo; False where
    that file does not exist)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def autocast_dtype(device: torch.device, bf16: bool | str) -> torch.dtype | None:
    """The forward's autocast dtype for ``float.bf16`` (true | false | auto, see the module docstring):
    torch.bfloat16, or None for float32."""
    if bf16 == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
        else:
            bf16 = device.type == "cpu" and cpu_has_native_bf16()
    return torch.bfloat16 if bf16 is True else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device``'s type to ``dtype``; a no-op for ``dtype=None`` (float32)."""
    with torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        yield


def float_outputs(value: Any) -> Any:
    """Every floating-point tensor of a nested dict / list / tuple as float32 (others unchanged).

    A float32 tensor is returned as it is (no copy), so fp32 training pays nothing.
    """
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: float_outputs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(float_outputs(v) for v in value)
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> dict[str, float] | None:
    """Peak memory since the last :func:`reset_peak_memory`: allocated by tensors and reserved by the
    caching allocator, MiB. None on a CPU (no per-device figure)."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(device) / 2**20,
        "reserved": torch.cuda.max_memory_reserved(device) / 2**20,
    }


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name, memory and the precision settings that change fp32 speed (TF32), for reports."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            device_count=torch.cuda.device_count(),
        )
    else:
        info.update(name="cpu", threads=torch.get_num_threads())
    return info


PHASES = ("to_device", "forward", "loss", "backward", "optimizer", "other")


class StepPhases:
    """Synchronised wall-clock phases of training steps, from hooks on the model, the criterion and the
    optimizer, so that the step itself (``Trainer._step``) runs unchanged.

    Phases of one step (seconds): ``to_device`` (step start to the forward: batch copy), ``forward``
    (the model, under autocast when on), ``loss`` (outputs to float32 and the criterion, Hungarian
    matching included),
    ``backward`` (criterion end to the optimizer: the isfinite check, backward with DDP's all-reduce,
    gradient clipping), ``optimizer`` (AdamW step), ``other`` (scheduler and log scalars); they add up
    to ``total``. Each mark synchronises the device, which adds a few microseconds per mark on CUDA.

    Args:
        net: the module whose forward is the model's forward (the DDP wrapper when there is one).
        criterion: the criterion module; optimizer: the optimizer.
        device: the device to synchronise.
    """

    def __init__(
        self, net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> None:
        self.device = device
        self.marks: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._handles = [
            net.register_forward_pre_hook(lambda *_: self._mark("forward_start")),
            net.register_forward_hook(lambda *_: self._mark("forward_end")),
            criterion.register_forward_hook(lambda *_: self._mark("loss_end")),
            optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer_start")),
            optimizer.register_step_post_hook(lambda *_: self._mark("optimizer_end")),
        ]

    def _mark(self, name: str) -> None:
        synchronize(self.device)
        self.marks.setdefault(name, time.perf_counter())

    def begin(self) -> None:
        """Call right before the step."""
        self.marks = {}
        self._mark("step_start")

    def end(self) -> dict[str, float]:
        """Call right after the step; returns and keeps its phases (seconds) and ``total``."""
        self._mark("step_end")
        m = self.marks
        missing = {"forward_start", "forward_end", "loss_end", "optimizer_start", "optimizer_end"} - set(m)
        if missing:
            raise RuntimeError(f"step phases: the step did not pass {sorted(missing)} (hooks on another module?)")
        phases = {
            "to_device": m["forward_start"] - m["step_start"],
            "forward": m["forward_end"] - m["forward_start"],
            "loss": m["loss_end"] - m["forward_end"],
            "backward": m["optimizer_start"] - m["loss_end"],
            "optimizer": m["optimizer_end"] - m["optimizer_start"],
            "other": m["step_end"] - m["optimizer_end"],
            "total": m["step_end"] - m["step_start"],
        }
        self.steps.append(phases)
        return phases

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
