"""Batch-1 inference speed of a preset (r50 on the GPU: six 800x480 images per frame) in PyTorch, float32
and bf16 autocast, for the float model and the fake-quant (QAT) model.

The frame is sample 0 of ``r50.npz`` through the dataset's own decode and resize, so the spatial
cross-attention samples the (BEV cell, camera) pairs that a real rig sees. A frame's latency is one
``model(img, lidar2img)`` in eval mode under ``torch.inference_mode`` up to the one2one outputs, the
device synchronised before and after; FPS = 1000 / median latency in ms (post-processing, a few top-k
operations, is not included).

The fake-quant model is the QAT stage's structure (:func:`~maptr.quant.quantizer.quantize_model`: BatchNorm
folded, every quantized operator's inputs and weights fake-quantized) calibrated on two samples with
min/max observers and checked with :func:`~maptr.quant.qat.check_fixed_activation_scales`, QAT's entry
condition. Its weights are the freshly initialised ones: speed does not depend on their values. It has no
int16 operators (the sensitivity ranking is per preset); in PyTorch an int16 fake-quant costs what a
uint8 one does.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from maptr.data.dataset import DatasetOptions, collate
from maptr.data.portable import PortableMapDataset
from maptr.gpucheck.common import preset_config, seconds_stats
from maptr.models.maptr import build_maptr
from maptr.quant.calibration import calibrate
from maptr.quant.qat import check_fixed_activation_scales
from maptr.quant.quantizer import QuantConfig, quantize_model
from maptr.training.device import autocast, peak_memory_mib, reset_peak_memory, synchronize

REFERENCES = (  # published figures the report puts beside this one (other hardware, other software)
    {"what": "MapTRv2 R50 (paper)", "fps": 14.1, "device": "NVIDIA RTX 3090"},
    {"what": "MapTRv2 R50, Horizon's deployment", "fps": 26.68, "device": "Horizon J6E"},
)


@torch.inference_mode()
def _time_frames(
    model: torch.nn.Module,
    img: torch.Tensor,
    lidar2img: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    warmup: int,
    runs: int,
    deadline: float,
) -> list[float]:
    """Latencies (s) of ``runs`` frames after ``warmup`` untimed ones; fewer when ``deadline`` passes."""
    latencies: list[float] = []
    with autocast(device, dtype):
        for i in range(warmup + runs):
            synchronize(device)
            t0 = time.perf_counter()
            out = model(img, lidar2img)
            synchronize(device)
            if i >= warmup:
                latencies.append(time.perf_counter() - t0)
            if not torch.isfinite(out["pred_pts"]).all():
                raise FloatingPointError(f"non-finite points from the model under autocast {dtype}")
            if time.perf_counter() > deadline and latencies:
                break
    return latencies


def infer_bench(
    params: dict[str, Any],
    data: str | Path,
    device: torch.device,
    *,
    preset: str,
    warmup: int,
    runs: int,
    time_budget_s: float,
    allow_cpu_bf16: bool = False,
) -> dict[str, Any]:
    """FPS of {float, fake-quant QAT} x {fp32, bf16} at batch 1.

    Args:
        params: loaded params.yaml; data: ``r50.npz``; device: where to run.
        preset: model preset; warmup / runs: untimed and timed frames per configuration.
        time_budget_s: for all four configurations together (each gets its share; at least one timed frame).
        allow_cpu_bf16: time bf16 autocast on a CPU too (the smoke run); otherwise bf16 is CUDA-only.
    Returns:
        {frame: input shapes, models: {float | fake-quant QAT: {fp32 | bf16: {fps, latency stats, peak MiB}}},
        references}.
    """
    start = time.perf_counter()
    model_cfg = preset_config(params, preset)
    samples = PortableMapDataset(data, DatasetOptions.from_model(model_cfg))
    frame = collate([samples[0]])
    img, lidar2img = frame["img"].to(device), frame["lidar2img"].to(device)  # (1, Ncam, 3, H, W), (1, Ncam, 4, 4)
    torch.manual_seed(0)
    float_model = build_maptr(model_cfg).eval()
    fq_model = quantize_model(copy.deepcopy(float_model), QuantConfig(observer="minmax"))
    fq_model.to(device)
    calibrate(fq_model, [collate([samples[i % len(samples)]]) for i in range(2)], device)
    fixed = check_fixed_activation_scales(fq_model)
    models = {"float": float_model.to(device), "fake-quant QAT": fq_model}
    precisions = {"fp32": None}
    if device.type == "cuda" or allow_cpu_bf16:
        precisions["bf16"] = torch.bfloat16
    result: dict[str, Any] = {
        "preset": preset,
        "frame": {"img": list(img.shape), "lidar2img": list(lidar2img.shape)},
        "fake_quant": {
            "activation_quants": fixed,
            "observer": "minmax",
            "calibration_samples": 2,
            "int16_operators": 0,
        },
        "models": {},
        "references": list(REFERENCES),
    }
    configs = [(name, precision) for name in models for precision in precisions]
    for k, (name, precision) in enumerate(configs):
        share = (time_budget_s - (time.perf_counter() - start)) / (len(configs) - k)
        reset_peak_memory(device)
        latencies = _time_frames(
            models[name],
            img,
            lidar2img,
            device,
            precisions[precision],
            warmup,
            runs,
            deadline=time.perf_counter() + max(share, 0.0),
        )
        stats = seconds_stats(latencies)
        result["models"].setdefault(name, {})[precision] = {
            "fps": 1000.0 / stats["median_ms"],
            "latency": stats,
            "peak_memory_mib": peak_memory_mib(device),
        }
    return result
