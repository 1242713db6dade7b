"""ONNX Runtime latency of a ResNet18 exported in fp32 and as fake-quant Q/DQ (uint8 / int8 / int16).

The quantized variants are built with ``maptr.quant`` (BN folded, ``QuantWrapper`` convs and fc with
int8 per-channel weights, ``FakeQuantize`` uint8 activations), calibrated with min/max on random
inputs, exported through the ``maptr::fake_quant`` ONNX translation (opset 21), and run by ONNX
Runtime's CPU provider. For each variant the script prints the median latency, the op types of ORT's
optimized graph (what the integer fusion made of the Q/DQ), and how far ORT's output is from the
PyTorch fake-quant model in quantization steps of the output.

    .venv/bin/python benchmarks/bench_qdq_small.py --threads 2
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock

from maptr.quant import (
    ONNX_OPSET,
    FakeQuantize,
    FakeQuantMode,
    QuantWrapper,
    compute_fake_quant_qparams,
    onnx_translation_table,
    set_fake_quant_mode,
)


class QuantBasicBlock(nn.Module):
    """torchvision's BasicBlock with BN folded; its input arrives quantized, its output leaves quantized."""

    def __init__(self, block: BasicBlock, out_dtype: str, reduce_range: bool) -> None:
        super().__init__()
        self.conv1 = QuantWrapper(fuse_conv_bn_eval(block.conv1, block.bn1), weight_reduce_range=reduce_range)
        self.mid_quant = FakeQuantize("uint8")
        self.conv2 = QuantWrapper(
            fuse_conv_bn_eval(block.conv2, block.bn2),
            output_quant=FakeQuantize("uint8"),
            weight_reduce_range=reduce_range,
        )
        self.downsample = None
        if block.downsample is not None:
            conv, bn = block.downsample
            self.downsample = QuantWrapper(
                fuse_conv_bn_eval(conv, bn), output_quant=FakeQuantize("uint8"), weight_reduce_range=reduce_range
            )
        self.out_quant = FakeQuantize(out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / s, W / s)."""
        identity = x if self.downsample is None else self.downsample(x)
        mid = self.mid_quant(torch.relu(self.conv1(x)))
        # Add -> ReLU -> Q: ORT drops the ReLU into the zero point 0 of the Q and fuses a QLinearAdd.
        return self.out_quant(torch.relu(self.conv2(mid) + identity))


class QuantResNet18(nn.Module):
    """ResNet18 with uint8 activations and int8 weights; the activations named in ``int16`` get int16."""

    def __init__(self, net: torchvision.models.ResNet, int16: set[str], reduce_range: bool) -> None:
        super().__init__()

        def dtype(name: str) -> str:
            return "int16" if name in int16 else "uint8"

        self.stem = QuantWrapper(
            fuse_conv_bn_eval(net.conv1, net.bn1), input_quant=FakeQuantize("uint8"), weight_reduce_range=reduce_range
        )
        self.stem_quant = FakeQuantize(dtype("stem"))
        self.maxpool = net.maxpool
        self.pool_quant = FakeQuantize(dtype("maxpool"))
        blocks = [block for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer]
        self.blocks = nn.Sequential(
            *[QuantBasicBlock(block, dtype(f"block{i}"), reduce_range) for i, block in enumerate(blocks)]
        )
        self.avgpool_quant = FakeQuantize(dtype("avgpool"))
        self.fc = QuantWrapper(net.fc, output_quant=FakeQuantize("uint8"), weight_reduce_range=reduce_range)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, 1000) logits on the uint8 grid of the fc output."""
        x = self.stem_quant(torch.relu(self.stem(x)))  # (N, 64, H/2, W/2)
        x = self.pool_quant(self.maxpool(x))  # (N, 64, H/4, W/4)
        x = self.blocks(x)  # (N, 512, H/32, W/32)
        x = self.avgpool_quant(x.mean(dim=(2, 3)))  # (N, 512); ORT keeps ReduceMean in float
        return self.fc(x)


def build_quantized(reduce_range: bool, int16: set[str], calibration: list[Tensor]) -> QuantResNet18:
    torch.manual_seed(0)
    model = QuantResNet18(torchvision.models.resnet18(weights=None).eval(), int16, reduce_range).eval()
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    compute_fake_quant_qparams(model)
    set_fake_quant_mode(model, FakeQuantMode.QUANTIZE)
    return model


def ort_session(path: Path, threads: int, level: ort.GraphOptimizationLevel, optimized: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # the "optimized model is hardware specific" warning of ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_and_check(
    name: str, model: nn.Module, x: Tensor, step: float | None, threads: int, tmp: Path
) -> ort.InferenceSession:
    """Exports ``model``, prints ORT's optimized op types and its agreement with torch; returns the
    ENABLE_ALL session to time."""
    path = tmp / f"{name}.onnx"
    start = time.perf_counter()
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        custom_translation_table=onnx_translation_table(),
        verbose=False,
    )
    program.save(str(path))
    export_s = time.perf_counter() - start
    with torch.no_grad():
        expected = model(x).numpy()
    extended = ort_session(path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp / f"{name}_ext.onnx")
    error = np.abs(extended.run(None, {"x": x.numpy()})[0] - expected).max()
    ops = collections.Counter(node.op_type for node in onnx.load(str(tmp / f"{name}_ext.onnx")).graph.node)
    agreement = f"max |ORT - torch| = {error / step:.2f} output steps" if step else f"max |ORT - torch| = {error:.2e}"
    print(f"\n== {name}: export {export_s:.1f} s, {path.stat().st_size / 1e6:.1f} MB; {agreement}")
    print("   ORT graph (EXTENDED): " + ", ".join(f"{op} {count}" for op, count in sorted(ops.items())))
    return ort_session(path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp / f"{name}_all.onnx")


def time_interleaved(sessions: dict[str, ort.InferenceSession], x: Tensor, runs: int) -> None:
    """Round-robin over the variants, so that load from other processes hits them all alike."""
    feed = {"x": x.numpy()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feed)  # warm-up: allocations, thread pool
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(1000.0 * (time.perf_counter() - start))
    fp32 = statistics.median(times["fp32"])
    print(f"\nlatency (ORT_ENABLE_ALL), {runs} interleaved runs each:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"   {name:24s} median {median:7.2f} ms  min {min(values):7.2f} ms  fp32 / this {fp32 / median:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (torch uses the same)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(1, 3, args.size, args.size, generator=gen) for _ in range(4)]
    x = torch.randn(1, 3, args.size, args.size, generator=gen)
    print(f"ResNet18 {args.size}x{args.size}, batch 1, ORT {ort.__version__} CPU, {args.threads} threads")
    int16 = {"stem", "maxpool", "block7", "avgpool"}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        torch.manual_seed(0)
        float_model = torchvision.models.resnet18(weights=None).eval()
        sessions = {"fp32": export_and_check("fp32", float_model, x, None, args.threads, tmp)}
        for name, reduce_range, int16_names in [
            ("qdq_u8_s8_7bit", True, set()),
            ("qdq_u8_s8_8bit", False, set()),
            ("qdq_u8_s8_7bit_int16x4", True, int16),
        ]:
            model = build_quantized(reduce_range, int16_names, calibration)
            step = model.fc.output_quant.scale.item()
            sessions[name] = export_and_check(name, model, x, step, args.threads, tmp)
        time_interleaved(sessions, x, args.runs)
    print(f"\nint16 activations in the last variant: {sorted(int16)} (block7 = layer4[1] output)")


if __name__ == "__main__":
    main()
