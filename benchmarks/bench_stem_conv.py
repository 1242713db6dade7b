"""The stem convolution on ONNX Runtime: uint8 QLinearConv vs float Conv, and a space-to-depth rewrite.

    python benchmarks/bench_stem_conv.py --threads 2
    python benchmarks/bench_stem_conv.py --threads 1 --runs 300

MapTR's ResNet stem is a 7x7 stride-2 convolution on 3 channels (6 cameras of the nano preset's 192x64
input here). Its integer kernel is the slowest relative to float in the deployed model: each output
has only K = 7 * 7 * 3 = 147 products, so the per-output work (im2col, requantization) weighs more than
in the 3x3 convolutions on 64 channels. The script times three single-node graphs at ORT level `all`
(channels-last integer layout, as deployed sessions load them), on random data, median of ``--runs``:

- ``QLinearConv`` 7x7/2 on uint8 (zero point 128, the image grid) with int8 per-channel weights;
- the same as space-to-depth: pad 3, ``SpaceToDepth`` 2 (12 channels), ``QLinearConv`` 4x4/1 with the
  kernel zero-padded to 8x8 and rearranged; it gives bit-identical outputs (checked);
- the float ``Conv`` 7x7/2, and the same space-to-depth rewrite in float (compile applies it to the
  integer model only: in float it is slower).

The compile stage rewrites the deployed model's stem this way (``maptr/deploy/stem_space_to_depth.py``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from maptr.deploy.stem_space_to_depth import space_to_depth_weight

SHAPE = (6, 3, 64, 192)  # nano: 6 cameras, 192x64
OUT_CHANNELS = 64


def _model(nodes: list[onnx.NodeProto], elem_type: int, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "stem", [helper.make_tensor_value_info("x", elem_type, SHAPE)],
        [helper.make_tensor_value_info("y", elem_type, None)], initializer=initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _time(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, runs: int) -> tuple[float, np.ndarray]:
    """Median ms of ``runs`` runs after 10 warm-up runs, and the output."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(10):
        out = session.run(None, feeds)[0]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    w = rng.integers(-127, 128, (OUT_CHANNELS, 3, 7, 7), dtype=np.int8)
    quant = [
        numpy_helper.from_array(np.array(1 / 128, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(np.full(OUT_CHANNELS, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(OUT_CHANNELS, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
    ]
    qargs = ["x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]

    direct = _model(
        [helper.make_node("QLinearConv", ["x", *qargs], ["y"], kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4)],
        TensorProto.UINT8, [*quant, numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    direct_ms, direct_out = _time(direct, {"x": x}, args.threads, args.runs)

    # Space-to-depth: out[y, x] = sum_{ky, kx} w[ky, kx] * padded[2y + ky, 2x + kx] with ky = 2a + b, so the
    # 7x7/2 kernel (zero-padded to 8x8) is a 4x4/1 kernel over the 2x2 blocks (DCR channel order).
    w4 = space_to_depth_weight(w)  # (64, 12, 4, 4), compile's rearrangement
    pads = numpy_helper.from_array(np.array([0, 0, 3, 3, 0, 0, 3, 3], np.int64), "pads")
    s2d = _model(
        [helper.make_node("Pad", ["x", "pads", "x_zero"], ["padded"]),  # pads with the zero point: real 0
         helper.make_node("SpaceToDepth", ["padded"], ["blocks"], blocksize=2),
         helper.make_node("QLinearConv", ["blocks", *qargs], ["y"], kernel_shape=[4, 4])],
        TensorProto.UINT8, [*quant, pads, numpy_helper.from_array(w4, "w")],
    )  # fmt: skip
    s2d_ms, s2d_out = _time(s2d, {"x": x}, args.threads, args.runs)
    if not np.array_equal(direct_out, s2d_out):
        raise SystemExit("space-to-depth output differs from the direct convolution")

    xf = rng.standard_normal(SHAPE).astype(np.float32)
    conv = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4)],
        TensorProto.FLOAT, [numpy_helper.from_array(w.astype(np.float32), "w")],
    )  # fmt: skip
    float_ms, float_out = _time(conv, {"x": xf}, args.threads, args.runs)
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    float_s2d = _model(
        [helper.make_node("Pad", ["x", "pads", "zero"], ["padded"]),
         helper.make_node("SpaceToDepth", ["padded"], ["blocks"], blocksize=2),
         helper.make_node("Conv", ["blocks", "w"], ["y"], kernel_shape=[4, 4])],
        TensorProto.FLOAT, [pads, zero, numpy_helper.from_array(w4.astype(np.float32), "w")],
    )  # fmt: skip
    float_s2d_ms, float_s2d_out = _time(float_s2d, {"x": xf}, args.threads, args.runs)
    np.testing.assert_allclose(float_s2d_out, float_out, rtol=1e-4, atol=1e-2)

    print(f"stem 7x7/2, 3 -> {OUT_CHANNELS} channels, input {SHAPE}, {args.threads} thread(s), median of {args.runs}:")
    print(f"  uint8 QLinearConv       {direct_ms:6.3f} ms  ({float_ms / direct_ms:.2f}x float)")
    print(f"  space-to-depth uint8    {s2d_ms:6.3f} ms  ({float_ms / s2d_ms:.2f}x float; outputs identical)")
    print(f"  float Conv              {float_ms:6.3f} ms")
    print(f"  space-to-depth float    {float_s2d_ms:6.3f} ms")


if __name__ == "__main__":
    main()
