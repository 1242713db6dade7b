"""Fake-quant op, observers, modules, and the int8 + int16 export path to ONNX Q/DQ and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from maptr.quant import (
    ONNX_OPSET,
    QUANT_RANGES,
    FakeQuantize,
    FakeQuantMode,
    FixedRangeObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelAbsMaxObserver,
    QuantWrapper,
    WeightFakeQuantize,
    compute_fake_quant_qparams,
    fake_quant,
    onnx_translation_table,
    qparams_from_range,
    set_fake_quant_mode,
)


def _fq(values: list[float], scale: float, zero_point: int, dtype: torch.dtype) -> list[float]:
    x = torch.tensor(values)
    return fake_quant(x, torch.tensor(scale), torch.tensor(zero_point, dtype=dtype), None).tolist()


# ------------------------------------------------------------------------------------------------
# The op: known values, rounding half to even, clamping at the ends of each dtype
# ------------------------------------------------------------------------------------------------
def test_uint8_known_values():
    # scale 0.5, zero point 10: q = round(x / 0.5) + 10 clamped to [0, 255], y = (q - 10) * 0.5.
    values = [-6.0, -5.25, -4.75, 0.25, 0.75, 1.25, 122.5, 123.0, 200.0]
    # -6 -> q=-2 -> 0 -> -5 (clamped); -5.25 -> -10.5 rounds to -10 (even) -> q=0 -> -5;
    # -4.75 -> -9.5 rounds to -10 -> -5; 0.25 -> 0.5 -> 0; 0.75 -> 1.5 -> 2 -> 1; 1.25 -> 2.5 -> 2 -> 1;
    # 122.5 -> q=255 -> 122.5; 123 -> 256 -> 255 -> 122.5 (clamped); 200 -> 122.5 (clamped).
    expected = [-5.0, -5.0, -5.0, 0.0, 1.0, 1.0, 122.5, 122.5, 122.5]
    assert _fq(values, 0.5, 10, torch.uint8) == expected


def test_int8_known_values():
    # scale 0.25, zero point 0, range [-128, 127].
    values = [-40.0, -31.875, -0.375, -0.125, 0.125, 0.375, 31.75, 31.875, 40.0]
    # -31.875 / 0.25 = -127.5 rounds to -128 (even); -0.375 -> -1.5 -> -2; -0.125 -> -0.5 -> -0;
    # 0.125 -> 0.5 -> 0; 0.375 -> 1.5 -> 2; 31.875 -> 127.5 -> 128 -> 127 (clamped).
    expected = [-32.0, -32.0, -0.5, 0.0, 0.0, 0.5, 31.75, 31.75, 31.75]
    assert _fq(values, 0.25, 0, torch.int8) == expected


def test_int16_known_values():
    step = 2.0**-10
    values = [-40.0, -32.0 - step, -32.0, 2.5 * step, 3.5 * step, 32767 * step, 32.0]
    # 2.5 steps -> 2 (even), 3.5 steps -> 4; the ends are -32768 and 32767 steps.
    expected = [-32.0, -32.0, -32.0, 2 * step, 4 * step, 32767 * step, 32767 * step]
    assert _fq(values, step, 0, torch.int16) == expected
    # With a zero point the grid shifts: q = round(x / step) + 100 clamped to [-32768, 32767].
    assert _fq([32667 * step, 32668 * step], step, 100, torch.int16) == [32667 * step, 32667 * step]


def test_per_channel_along_axis():
    weight = torch.tensor([[1.2, -3.0, 0.3], [1.2, -3.0, 0.3]])  # (C=2, 3)
    scale = torch.tensor([0.5, 0.25])
    out = fake_quant(weight, scale, torch.zeros(2, dtype=torch.int8), 0)
    # channel 0: 2.4 -> 2, -6 -> -6, 0.6 -> 1; channel 1: 4.8 -> 5, -12 -> -12, 1.2 -> 1.
    assert out.tolist() == [[1.0, -3.0, 0.5], [1.25, -3.0, 0.25]]
    # axis 1 of a (3, 2) view gives the same per-channel numbers.
    out_t = fake_quant(weight.t().contiguous(), scale, torch.zeros(2, dtype=torch.int8), 1)
    assert torch.equal(out_t, out.t())


@pytest.mark.parametrize(
    ("scale", "zero_point", "axis", "message"),
    [
        (torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), None, "zero_point dtype"),
        (torch.tensor([0.1]), torch.tensor([0], dtype=torch.uint8), None, "0-D scale"),
        (torch.ones(3), torch.zeros(3, dtype=torch.int8), 1, "size 4"),
        (torch.tensor(0.1), torch.tensor([0, 0], dtype=torch.int8), None, "one shape"),
        (torch.tensor(1), torch.tensor(0, dtype=torch.int8), None, "floating-point"),
    ],
)
def test_bad_parameters_raise(scale, zero_point, axis, message):
    with pytest.raises(ValueError, match=message):
        fake_quant(torch.zeros(3, 4), scale, zero_point, axis)


# ------------------------------------------------------------------------------------------------
# Gradient: straight-through inside the range, zero outside
# ------------------------------------------------------------------------------------------------
def test_straight_through_gradient_masks_clamped_values():
    x = torch.tensor([-6.0, -5.0, -1.3, 0.0, 2.2, 127.0, 127.3, 200.0], requires_grad=True)
    upstream = torch.arange(1.0, 9.0)
    fake_quant(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int8), None).backward(upstream)
    # int8 [-128, 127] with scale 1: everything but 200 is inside (127.3 rounds to 127, inside).
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]
    x.grad = None
    fake_quant(x, torch.tensor(0.5), torch.tensor(10, dtype=torch.uint8), None).backward(upstream)
    # uint8, scale 0.5, zp 10: q = 2x + 10 in [0, 255] <=> x in [-5, 122.5]; -6 and the top three are out.
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16"])
def test_matches_torch_builtin_fake_quantize_values_and_gradients(dtype):
    quant_range = QUANT_RANGES[dtype]
    gen = torch.Generator().manual_seed(3)
    scale = 2.0**-4 if dtype != "int16" else 2.0**-11  # powers of two: x / s == x * (1 / s) exactly
    zero_point = 7 if dtype == "uint8" else 0
    x = (torch.randn(1000, generator=gen) * 10.0).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ours = fake_quant(x, torch.tensor(scale), torch.tensor(zero_point, dtype=quant_range.dtype), None)
    builtin = torch.fake_quantize_per_tensor_affine(x_ref, scale, zero_point, quant_range.qmin, quant_range.qmax)
    upstream = torch.randn(1000, generator=gen)
    ours.backward(upstream)
    builtin.backward(upstream)
    assert torch.equal(ours, builtin)
    assert torch.equal(x.grad, x_ref.grad)
    assert 0 < int((x.grad == 0).sum()) < 1000  # both sides of the mask are exercised


# ------------------------------------------------------------------------------------------------
# Observers
# ------------------------------------------------------------------------------------------------
def _data_with_outliers() -> torch.Tensor:
    # A million Gaussian values and three far outliers (3 per million). For the MSE criterion clipping
    # an outlier at distance D costs D^2 while the finer grid saves about N * R^2 / (3 * 254^2) on the
    # N other values (R = range), so clipping pays only for rare outliers, as in real activation maps
    # (millions of values per calibration batch); a few outliers among 20k values are worth keeping.
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1_000_000, generator=gen)
    values[:3] = torch.tensor([40.0, -30.0, 35.0])
    return values


def test_minmax_observer_tracks_extremes_and_contains_zero():
    observer = MinMaxObserver()
    observer.update(torch.tensor([0.5, 2.0]))
    observer.update(torch.tensor([1.0, 3.0, float("nan")]))
    lo, hi = observer.compute_range(255, symmetric=False)
    assert (lo.item(), hi.item()) == (0.0, 3.0)  # widened to contain 0, NaN ignored
    observer.update(torch.tensor([-4.0]))
    lo, hi = observer.compute_range(254, symmetric=True)
    assert (lo.item(), hi.item()) == (-4.0, 4.0)


def test_fixed_range_observer_ignores_the_data():
    observer = FixedRangeObserver(-1.0, 127 / 128)
    assert observer.has_data  # usable without calibration
    observer.update(torch.tensor([-50.0, 80.0]))
    lo, hi = observer.compute_range(255, symmetric=False)
    assert (lo.item(), hi.item()) == (-1.0, pytest.approx(127 / 128))
    lo, hi = observer.compute_range(254, symmetric=True)
    assert (lo.item(), hi.item()) == (-1.0, 1.0)
    for bad in ((0.5, 1.0), (-1.0, -0.5), (0.0, 0.0)):
        with pytest.raises(ValueError, match="fixed range"):
            FixedRangeObserver(*bad)


@pytest.mark.parametrize("make_observer", [lambda: PercentileObserver(99.9), lambda: MSEObserver()])
@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_and_mse_are_tighter_than_minmax_with_outliers(make_observer, symmetric):
    data = _data_with_outliers()
    minmax = MinMaxObserver()
    observer = make_observer()
    for batch in data.chunk(4):
        minmax.update(batch)
        observer.update(batch)
    num_steps = 254 if symmetric else 255
    lo_mm, hi_mm = minmax.compute_range(num_steps, symmetric)
    lo, hi = observer.compute_range(num_steps, symmetric)
    assert (hi - lo).item() < 0.5 * (hi_mm - lo_mm).item()
    # ... and still cover the bulk of a unit Gaussian.
    assert lo.item() < -2.5 and hi.item() > 2.5


def test_observers_are_deterministic():
    data = _data_with_outliers()
    ranges = []
    for _ in range(2):
        observers = [PercentileObserver(99.99), MSEObserver(), MinMaxObserver()]
        for batch in data.chunk(5):
            for observer in observers:
                observer.update(batch)
        ranges.append([(o.compute_range(255, False), o.compute_range(65534, True)) for o in observers])
    for first, second in zip(ranges[0], ranges[1], strict=True):
        for (lo_a, hi_a), (lo_b, hi_b) in zip(first, second, strict=True):
            assert lo_a.item() == lo_b.item() and hi_a.item() == hi_b.item()


def test_histogram_regrows_and_keeps_every_count():
    observer = PercentileObserver(100.0)
    observer.update(torch.linspace(0.0, 1.0, 1001))
    observer.update(torch.linspace(-2.0, 0.0, 500))  # range grows to [-2, 1]: old counts are rebinned
    assert observer.counts.sum() == pytest.approx(1501.0, abs=1e-6)
    lo, hi = observer.compute_range(255, symmetric=False)
    assert (lo.item(), hi.item()) == pytest.approx((-2.0, 1.0), abs=1e-6)


def test_percentile_of_a_uniform_distribution():
    observer = PercentileObserver(99.0)
    observer.update(torch.linspace(0.0, 1.0, 100001))
    lo, hi = observer.compute_range(255, symmetric=False)
    assert lo.item() == 0.0  # the 1st percentile (0.01) is widened to 0: a range always contains 0
    assert hi.item() == pytest.approx(0.99, abs=2e-3)
    lo, hi = observer.compute_range(254, symmetric=True)
    assert hi.item() == pytest.approx(0.99, abs=2e-3) and lo.item() == -hi.item()


def test_percentile_stops_at_the_edge_of_an_empty_stretch():
    # 9,999 values in [0, 1] and one at 10: the 99.99th percentile count (9,999) is reached at 1 and
    # the cumulative count stays flat up to 10; the quantile is the start of that flat stretch.
    observer = PercentileObserver(99.99)
    observer.update(torch.cat([torch.linspace(0.0, 1.0, 9999), torch.tensor([10.0])]))
    lo, hi = observer.compute_range(255, symmetric=False)
    assert lo.item() == 0.0 and hi.item() == pytest.approx(1.0, abs=10.0 / 2048)


def test_mse_keeps_the_full_range_of_clean_uniform_data_and_clips_more_with_fewer_steps():
    observer = MSEObserver()
    observer.update(torch.linspace(-1.0, 1.0, 50001))
    lo, hi = observer.compute_range(255, symmetric=False)
    assert hi.item() > 0.97 and lo.item() < -0.97  # no outliers: clipping never pays
    gaussian = MSEObserver()
    gaussian.update(torch.randn(50000, generator=torch.Generator().manual_seed(1)))
    bound_8bit = gaussian.compute_range(254, symmetric=True)[1].item()
    bound_16bit = gaussian.compute_range(65534, symmetric=True)[1].item()
    assert bound_8bit < bound_16bit  # coarser grids trade more clipping for resolution


def test_per_channel_absmax_observer():
    observer = PerChannelAbsMaxObserver(axis=0)
    observer.update(torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]]))
    lo, hi = observer.compute_range(254, symmetric=True)
    assert hi.tolist() == [2.0, 0.5, 0.0] and lo.tolist() == [-2.0, -0.5, 0.0]
    with pytest.raises(ValueError, match="symmetric"):
        observer.compute_range(255, symmetric=False)


def test_qparams_from_range():
    scale, zero_point = qparams_from_range(torch.tensor(-1.0), torch.tensor(4.1), QUANT_RANGES["uint8"])
    assert scale.item() == pytest.approx(5.1 / 255) and zero_point.item() == 50 and zero_point.dtype == torch.uint8
    scale, zero_point = qparams_from_range(torch.tensor([-1.0, 0.0]), torch.tensor([0.5, 0.0]), QUANT_RANGES["int16"])
    assert scale[0].item() == pytest.approx(1.0 / 32767) and scale[1].item() > 0  # all-zero channel: tiny scale
    assert zero_point.tolist() == [0, 0] and zero_point.dtype == torch.int16


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
def test_fake_quantize_modes_and_state_dict():
    fq = FakeQuantize("uint8")
    x = torch.linspace(-1.0, 3.0, 9)
    assert torch.equal(fq(x), x)  # OBSERVE passes through
    fq.mode = FakeQuantMode.QUANTIZE
    with pytest.raises(RuntimeError, match="compute_qparams"):
        fq(x)
    fq.compute_qparams()
    assert fq.scale.item() == pytest.approx(4.0 / 255) and fq.zero_point.item() == 64
    y = fq(x)
    q = y / fq.scale + fq.zero_point.float()
    assert torch.allclose(q, q.round(), atol=1e-4) and (y - x).abs().max() <= fq.scale / 2 + 1e-7
    fq.mode = FakeQuantMode.DISABLED
    assert torch.equal(fq(x), x)
    loaded = FakeQuantize("uint8")
    loaded.load_state_dict(fq.state_dict())
    loaded.mode = FakeQuantMode.QUANTIZE
    assert loaded.calibrated and torch.equal(loaded(x), y)


def test_fake_quantize_rejects_bad_configuration():
    with pytest.raises(ValueError, match="dtype"):
        FakeQuantize("int4")
    with pytest.raises(ValueError, match="together"):
        FakeQuantize("int8", channel_axis=0)
    with pytest.raises(ValueError, match="symmetrically"):
        WeightFakeQuantize(4, dtype="uint8")
    with pytest.raises(TypeError, match="QuantWrapper wraps"):
        QuantWrapper(nn.ReLU())


def test_compute_fake_quant_qparams_names_an_unreached_module():
    model = nn.Sequential(FakeQuantize("uint8"), FakeQuantize("int16"))
    model[0](torch.ones(3))
    with pytest.raises(RuntimeError, match="'1'"):
        compute_fake_quant_qparams(model)


@pytest.mark.parametrize("reduce_range", [True, False])
def test_quant_wrapper_shares_the_weight_and_quantizes_it_per_channel(reduce_range):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    wrapper = QuantWrapper(conv, weight_reduce_range=reduce_range)
    assert wrapper.module.weight is conv.weight  # no copy: the optimizer sees one parameter
    assert {name for name, _ in wrapper.named_parameters()} == {"module.weight", "module.bias"}
    set_fake_quant_mode(wrapper, FakeQuantMode.QUANTIZE)
    x = torch.randn(2, 3, 8, 8)
    out = wrapper(x)
    qmax = 64 if reduce_range else 127
    scale = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / qmax  # (C_out,)
    weight_q = torch.round(conv.weight.detach() / scale.view(-1, 1, 1, 1))
    assert weight_q.abs().max().item() == qmax
    expected = nn.functional.conv2d(x, weight_q * scale.view(-1, 1, 1, 1), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapper.weight_quant.scale, scale)
    out.sum().backward()  # straight-through: the float weight receives the gradient
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Export: uint8 + int8 + int16 Q/DQ, ONNX Runtime agreement, ORT's integer kernels
# ------------------------------------------------------------------------------------------------
class SmallNet(nn.Module):
    """conv-bn-relu, conv, add, conv, linear, matmul: every op kind the QDQ fusion cares about."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.linear = nn.Linear(8, 16)


class QuantSmallNet(nn.Module):
    """SmallNet with BN folded, int8 weights, uint8 activations, and conv3's output in int16."""

    def __init__(self, net: SmallNet) -> None:
        super().__init__()
        self.conv1 = QuantWrapper(fuse_conv_bn_eval(net.conv1, net.bn1), input_quant=FakeQuantize("uint8"))
        self.relu_quant = FakeQuantize("uint8")  # after the ReLU: zero point 0, ORT drops the Relu
        self.conv2 = QuantWrapper(net.conv2, output_quant=FakeQuantize("uint8"))
        self.add_quant = FakeQuantize("uint8")
        self.conv3 = QuantWrapper(net.conv3, output_quant=FakeQuantize("int16"))
        self.linear = QuantWrapper(net.linear, input_quant=FakeQuantize("uint8"), output_quant=FakeQuantize("uint8"))
        self.matmul_quant = FakeQuantize("uint8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) -> (H*W, H*W)."""
        a = self.relu_quant(torch.relu(self.conv1(x)))  # (1, 8, H, W)
        c = self.add_quant(a + self.conv2(a))  # (1, 8, H, W)
        d = self.conv3(c)  # (1, 8, H, W) on the int16 grid
        tokens = d.flatten(2).transpose(1, 2).reshape(-1, 8)  # (H*W, 8)
        e = self.linear(tokens)  # (H*W, 16)
        return self.matmul_quant(e @ e.transpose(0, 1))  # (H*W, H*W)


def _calibrated_small_net() -> tuple[QuantSmallNet, torch.Tensor]:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 2.0)
    model = QuantSmallNet(net.eval()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(1, 3, 8, 8, generator=gen))
    assert compute_fake_quant_qparams(model) == 8
    set_fake_quant_mode(model, FakeQuantMode.QUANTIZE)
    return model, torch.randn(1, 3, 8, 8, generator=gen)


@pytest.fixture(scope="module")
def exported_small_net(tmp_path_factory) -> tuple[Path, QuantSmallNet, torch.Tensor, np.ndarray]:
    model, x = _calibrated_small_net()
    with torch.no_grad():
        expected = model(x).numpy()  # an eager forward also refreshes the weight scales
    path = tmp_path_factory.mktemp("qdq") / "small_net_qdq.onnx"
    program = torch.onnx.export(
        model, (x,), dynamo=True, opset_version=ONNX_OPSET, custom_translation_table=onnx_translation_table()
    )
    program.save(str(path))
    return path, model, x, expected


def _zero_point_types(model: onnx.ModelProto) -> set[int]:
    initializers = {init.name: init.data_type for init in model.graph.initializer}
    return {
        initializers[node.input[2]]
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
    }


def test_export_has_uint8_int8_and_int16_qdq(exported_small_net):
    path, _, _, _ = exported_small_net
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [64, 64]
    assert model.opset_import[0].version == ONNX_OPSET
    op_types = [node.op_type for node in model.graph.node]
    assert op_types.count("QuantizeLinear") == op_types.count("DequantizeLinear") == 12  # 8 activations + 4 weights
    assert _zero_point_types(model) == {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT16}
    per_axis = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith("weight")]
    assert len(per_axis) == 4 and all(a.i == 0 for n in per_axis for a in n.attribute if a.name == "axis")


def test_export_refuses_unset_weight_scales_and_observing_fake_quants():
    wrapper = QuantWrapper(nn.Linear(4, 3)).eval()
    set_fake_quant_mode(wrapper, FakeQuantMode.QUANTIZE)
    with pytest.raises(RuntimeError, match="eager forward"):  # no eager forward yet: scales are unset
        torch.export.export(wrapper, (torch.randn(2, 4),))
    observing = nn.Sequential(FakeQuantize("uint8")).eval()
    with pytest.raises(RuntimeError, match="OBSERVE"):
        torch.export.export(observing, (torch.randn(2, 4),))


def _run_ort(path: Path, x: torch.Tensor, level: ort.GraphOptimizationLevel, optimized: Path | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(
    "level", [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED]
)
def test_onnx_runtime_matches_fake_quant_within_one_step(exported_small_net, level):
    path, model, x, expected = exported_small_net
    actual = _run_ort(path, x, level)
    step = model.matmul_quant.scale.item()
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= step * 1.001
    assert np.mean(actual == expected) > 0.95  # one-step differences are rare rounding-boundary cases


def test_onnx_runtime_fuses_uint8_int8_into_integer_kernels_and_keeps_int16_in_float(exported_small_net, tmp_path):
    path, _, x, _ = exported_small_net
    optimized = tmp_path / "optimized.onnx"
    _run_ort(path, x, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized)
    graph = onnx.load(str(optimized)).graph
    op_types = [node.op_type for node in graph.node]
    assert op_types.count("QLinearConv") == 2  # conv1 (+ its ReLU) and conv2
    assert {"QLinearAdd", "QGemm", "QLinearMatMul"} <= set(op_types)
    assert op_types.count("Conv") == 1  # conv3, whose output is int16: DQ -> Conv -> Q(int16)
    (conv,) = [node for node in graph.node if node.op_type == "Conv"]
    producers = {out: node for node in graph.node for out in node.output}
    consumers = [node for node in graph.node if conv.output[0] in node.input]
    assert producers[conv.input[0]].op_type == "DequantizeLinear"
    assert producers[conv.input[1]].op_type == "DequantizeLinear"  # int8 weight, dequantized to float
    assert [node.op_type for node in consumers] == ["QuantizeLinear"]
    initializer_types = {init.name: init.data_type for init in graph.initializer}
    assert initializer_types[consumers[0].input[2]] == onnx.TensorProto.INT16
