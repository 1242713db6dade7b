"""Fake quantization: the ``maptr::fake_quant`` op, its ONNX translation, and the modules that use it.

A quantized model is the float model with fake-quantization inserted: each quantized tensor goes
through ``dequantize(quantize(x))``, so training, calibration, QAT and the exported graph share one
forward. The op is a ``torch.library`` custom op rather than ``torch.fake_quantize_per_*_affine``
because those refuse to export a 16-bit range to ONNX; this one exports to
``QuantizeLinear -> DequantizeLinear`` (opset 21) with uint8, int8 or int16 zero points, which ONNX
Runtime fuses into integer kernels where it can (uint8 activations, int8 weights).

The quantized dtype is the dtype of the zero-point tensor, exactly as in ONNX QuantizeLinear:

====== =============== ==================================================================
dtype  integer range   used for
====== =============== ==================================================================
uint8  [0, 255]        activations, asymmetric (what ORT CPU fuses into QLinear* kernels)
int8   [-128, 127]     weights, symmetric per output channel: scale = max|w| / 64 (7-bit,
                       the default, see :class:`WeightFakeQuantize`) or / 127
int16  [-32768, 32767] sensitive activations, symmetric (scale = max|x| / 32767)
====== =============== ==================================================================

Semantics (ONNX's): ``q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)`` and
``y = (q - zero_point) * scale``, per tensor (0-D scale) or per channel along ``axis`` (1-D scale),
computed in float32 whatever the input dtype (the output takes the input's dtype).
The gradient is the straight-through estimator: ``dy/dx = 1`` where ``q`` was not clamped, else 0;
scale and zero point get no gradient (activation ranges stay fixed in QAT, weight ranges follow the
weight, see :class:`WeightFakeQuantize`).

Export: ``torch.onnx.export(model, args, dynamo=True, opset_version=ONNX_OPSET,
custom_translation_table=onnx_translation_table())``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from onnxscript import opset21 as onnx_op
from onnxscript.onnx_types import TensorType
from torch import Tensor, nn

from maptr.quant.observers import MinMaxObserver, PerChannelAbsMaxObserver, RangeObserver

ONNX_OPSET = 21  # int16 QuantizeLinear / DequantizeLinear exist from opset 21 on
MIN_SCALE = 1e-10  # floor of every scale: an all-zero tensor must not give a division by zero


@dataclass(frozen=True)
class QuantRange:
    """An integer grid: its bounds, the torch dtype of its zero point, and whether it is symmetric."""

    qmin: int
    qmax: int
    dtype: torch.dtype
    symmetric: bool

    @property
    def num_steps(self) -> int:
        """Steps between the ends of the clipping range: symmetric grids use [-qmax, qmax] only."""
        return 2 * self.qmax if self.symmetric else self.qmax - self.qmin


QUANT_RANGES: dict[str, QuantRange] = {
    "uint8": QuantRange(0, 255, torch.uint8, symmetric=False),
    "int8": QuantRange(-128, 127, torch.int8, symmetric=True),
    "int16": QuantRange(-32768, 32767, torch.int16, symmetric=True),
}
_RANGE_OF_ZERO_POINT_DTYPE = {quant_range.dtype: quant_range for quant_range in QUANT_RANGES.values()}


def _check_qparams(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> QuantRange:
    """Validates shapes and dtypes the way ONNX QuantizeLinear would; returns the integer grid."""
    if zero_point.dtype not in _RANGE_OF_ZERO_POINT_DTYPE:
        raise ValueError(f"zero_point dtype must be uint8, int8 or int16 (the quantized type), got {zero_point.dtype}")
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a floating-point tensor, got {scale.dtype}")
    if scale.shape != zero_point.shape:
        raise ValueError(f"scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} must have one shape")
    if axis is None:
        if scale.dim() != 0:
            raise ValueError(f"per-tensor quantization takes a 0-D scale, got shape {tuple(scale.shape)}")
    else:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} out of range for a {x.dim()}-D input")
        if scale.dim() != 1 or scale.shape[0] != x.shape[axis]:
            raise ValueError(
                f"per-axis scale must be 1-D of size {x.shape[axis]} (axis {axis}), got {tuple(scale.shape)}"
            )
    return _RANGE_OF_ZERO_POINT_DTYPE[zero_point.dtype]


def _unclamped_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``round(x / scale) + zero_point`` in float32, and scale / zero point broadcast to ``x``'s rank."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1  # per-channel parameters line up with dimension ``axis`` of x
    scale_b = scale.float().reshape(shape)  # (1, .., C, .., 1) or (1, .., 1)
    zero_point_b = zero_point.float().reshape(shape)  # same
    # torch.round rounds half to even, like ONNX QuantizeLinear; divide (not multiply by 1 / scale) as
    # ONNX does, so both sides land on the same integer at the rounding boundaries.
    return torch.round(x.float() / scale_b) + zero_point_b, scale_b, zero_point_b


@torch.library.custom_op("maptr::fake_quant", mutates_args=())
def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
    """Quantize to the zero point's integer dtype, clamp, dequantize (ONNX Q -> DQ in one op).

    Args:
        x: (...) float tensor to fake-quantize.
        scale: () per tensor, or (x.shape[axis],) per channel; floating point, > 0.
        zero_point: same shape as ``scale``; dtype uint8, int8 or int16 selects the integer grid.
        axis: None for per-tensor, else the channel dimension of ``x`` the parameters run along.
    Returns:
        (...) same shape and dtype as ``x``, every value on the grid ``(q - zero_point) * scale``.
    """
    quant_range = _check_qparams(x, scale, zero_point, axis)
    quantized, scale_b, zero_point_b = _unclamped_quantize(x, scale, zero_point, axis)
    clamped = quantized.clamp(quant_range.qmin, quant_range.qmax)
    return ((clamped - zero_point_b) * scale_b).to(x.dtype)


@fake_quant.register_fake
def _fake_quant_meta(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
    # Shapes only (torch.export / dynamo trace through this); the checks catch bad parameters at export.
    _check_qparams(x, scale, zero_point, axis)
    return torch.empty_like(x)


def _fake_quant_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, scale, zero_point, axis = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.axis = axis


def _fake_quant_backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
    # Straight-through estimator: rounding counts as identity, clamping cuts the gradient, as in
    # torch.fake_quantize_per_tensor_affine (the mask is taken on the rounded, unclamped value).
    x, scale, zero_point = ctx.saved_tensors
    quant_range = _RANGE_OF_ZERO_POINT_DTYPE[zero_point.dtype]
    quantized, _, _ = _unclamped_quantize(x, scale, zero_point, ctx.axis)
    inside = (quantized >= quant_range.qmin) & (quantized <= quant_range.qmax)
    return grad_output * inside.to(grad_output.dtype), None, None, None


fake_quant.register_autograd(_fake_quant_backward, setup_context=_fake_quant_setup_context)


def _fake_quant_to_onnx(
    x: TensorType, scale: TensorType, zero_point: TensorType, axis: int | None = None
) -> TensorType:
    """ONNX translation of ``maptr::fake_quant``: QuantizeLinear -> DequantizeLinear (opset 21).

    The zero point arrives as an initializer of its own dtype (uint8 / int8 / int16), which is what
    selects the quantized type in ONNX; per-channel parameters get the ``axis`` attribute.
    """
    if axis is None:
        quantized = onnx_op.QuantizeLinear(x, scale, zero_point)
        return onnx_op.DequantizeLinear(quantized, scale, zero_point)
    quantized = onnx_op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return onnx_op.DequantizeLinear(quantized, scale, zero_point, axis=axis)


def onnx_translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True, opset_version=ONNX_OPSET)``."""
    return {torch.ops.maptr.fake_quant.default: _fake_quant_to_onnx}


def qparams_from_range(lo: Tensor, hi: Tensor, quant_range: QuantRange) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the clipping range [lo, hi] onto the integer grid.

    Args:
        lo, hi: () or (C,) range ends (an asymmetric range is widened to contain 0).
        quant_range: the integer grid.
    Returns:
        scale (float32) and zero_point (``quant_range.dtype``), both shaped like ``lo``. Symmetric grids
        get ``scale = max(|lo|, |hi|) / qmax`` and a zero point of 0; asymmetric ones
        ``scale = (hi - lo) / (qmax - qmin)`` and the zero point that puts ``lo`` on ``qmin``.
    """
    lo, hi = lo.float(), hi.float()
    if quant_range.symmetric:
        bound = torch.maximum(lo.abs(), hi.abs())
        scale = (bound / quant_range.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=quant_range.dtype)
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    scale = ((hi - lo) / (quant_range.qmax - quant_range.qmin)).clamp_min(MIN_SCALE)
    zero_point = (quant_range.qmin - torch.round(lo / scale)).clamp(quant_range.qmin, quant_range.qmax)
    return scale, zero_point.to(quant_range.dtype)


class FakeQuantMode(enum.Enum):
    OBSERVE = "observe"  # feed the observer, pass the input through unchanged
    QUANTIZE = "quantize"  # fake-quantize with the stored (frozen) scale and zero point
    DISABLED = "disabled"  # identity


class FakeQuantize(nn.Module):
    """Fake-quantizes one tensor (usually an activation) with a stored scale and zero point.

    Workflow: ``OBSERVE`` while calibration batches run, :meth:`compute_qparams` to turn the observer's
    range into scale / zero point, then ``QUANTIZE`` (calibration eval, QAT, export). The scale and zero
    point are buffers (saved in the state dict, exported as ONNX initializers); the observer's statistics
    are not saved.

    Args:
        dtype: "uint8" (asymmetric), "int8" or "int16" (symmetric); see :data:`QUANT_RANGES`.
        observer: range estimator; MinMax per tensor / per-channel abs-max by default.
        channel_axis: None for per-tensor, else the dimension the per-channel parameters run along.
        num_channels: size of that dimension (the buffers need it up front to load a state dict).
    """

    def __init__(
        self,
        dtype: str = "uint8",
        observer: RangeObserver | None = None,
        channel_axis: int | None = None,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        if dtype not in QUANT_RANGES:
            raise ValueError(f"dtype must be one of {sorted(QUANT_RANGES)}, got {dtype!r}")
        if (channel_axis is None) != (num_channels is None):
            raise ValueError("channel_axis and num_channels go together (per channel) or are both None")
        if num_channels is not None and num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.dtype = dtype
        self.quant_range = QUANT_RANGES[dtype]
        self.channel_axis = channel_axis
        if observer is None:
            observer = MinMaxObserver() if channel_axis is None else PerChannelAbsMaxObserver(channel_axis)
        self.observer = observer
        self.mode = FakeQuantMode.OBSERVE
        self.calibrated = False  # True once scale / zero point come from data (saved as extra state)
        shape = () if num_channels is None else (num_channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=self.quant_range.dtype))

    def get_extra_state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state["calibrated"])

    @torch.no_grad()
    def compute_qparams(self) -> None:
        """Sets scale and zero point from the observer's range (raises if it has seen nothing)."""
        lo, hi = self.observer.compute_range(self.quant_range.num_steps, self.quant_range.symmetric)
        scale, zero_point = qparams_from_range(lo, hi, self.quant_range)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated = True

    def forward(self, x: Tensor) -> Tensor:
        """(...) -> (...): unchanged (OBSERVE, DISABLED) or fake-quantized (QUANTIZE)."""
        if self.mode is FakeQuantMode.DISABLED:
            return x
        if self.mode is FakeQuantMode.OBSERVE:
            if torch.compiler.is_exporting():
                raise RuntimeError("a FakeQuantize in OBSERVE mode cannot be exported: use QUANTIZE or DISABLED")
            self.observer.update(x)
            return x
        if not self.calibrated:
            raise RuntimeError("FakeQuantize in QUANTIZE mode before compute_qparams(): calibrate it first")
        return fake_quant(x, self.scale, self.zero_point, self.channel_axis)

    def extra_repr(self) -> str:
        axis = "per tensor" if self.channel_axis is None else f"per channel (axis {self.channel_axis})"
        return f"{self.dtype}, {axis}, mode={self.mode.value}, observer={type(self.observer).__name__}"


class WeightFakeQuantize(FakeQuantize):
    """Symmetric per-output-channel fake-quant of a weight whose range follows the weight itself.

    In eager mode every forward (OBSERVE or QUANTIZE) recomputes scale = max|w_c| / qmax per output
    channel from the current weight, without gradient: a weight never clips, and during QAT the grid
    follows the weights as they move (fixed weight scales would clip the weights that grow, and the
    straight-through estimator would then freeze them). While ``torch.export`` traces, the stored
    buffers are used, so they become ONNX initializers: the weights and their scales come from the
    same (last eager) forward. Run one eager forward after loading weights, before exporting.

    ``reduce_range`` (int8 only) puts the weights on 7 bits, [-64, 64] (scale = max|w_c| / 64). ONNX
    Runtime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add pairs of
    products in saturating int16 (``vpmaddubsw``): 2 * 255 * 127 overflows, 2 * 255 * 64 does not. On
    this project's AVX2 machine full-range int8 weights gave QLinearConv outputs off by up to 50
    quantization steps; 7-bit weights match the fake-quant model within one step.
    """

    def __init__(
        self, num_channels: int, dtype: str = "int8", channel_axis: int = 0, reduce_range: bool = True
    ) -> None:
        if dtype not in QUANT_RANGES or not QUANT_RANGES[dtype].symmetric:
            raise ValueError(f"weights are quantized symmetrically: dtype must be int8 or int16, got {dtype!r}")
        super().__init__(dtype, PerChannelAbsMaxObserver(channel_axis), channel_axis, num_channels)
        self.reduce_range = reduce_range and dtype == "int8"
        if self.reduce_range:
            # Only the scale changes: the integers then stay in [-64, 64], inside int8, so the op's
            # clamp (the dtype's) and ONNX QuantizeLinear's saturation never act on them.
            self.quant_range = QuantRange(-64, 64, torch.int8, symmetric=True)

    def forward(self, weight: Tensor) -> Tensor:
        """(C_out, ...) -> (C_out, ...)."""
        if self.mode is FakeQuantMode.DISABLED:
            return weight
        if not torch.compiler.is_exporting():
            self.observer.reset()
            self.observer.update(weight)
            self.compute_qparams()
        elif not self.calibrated:
            raise RuntimeError("weight scales are unset: run one eager forward (after loading weights) before export")
        if self.mode is FakeQuantMode.OBSERVE:
            return weight
        return fake_quant(weight, self.scale, self.zero_point, self.channel_axis)


_WEIGHTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class QuantWrapper(nn.Module):
    """A float conv / linear run with its weight fake-quantized, plus optional input / output fake-quant.

    The wrapped module keeps its own parameters (no copy: optimizers and state dicts see the same
    tensors under ``module.``); the forward substitutes the fake-quantized weight for one call through
    ``torch.func.functional_call``, so padding, stride, groups etc. stay the module's own. The bias is
    left in float: ONNX Runtime quantizes it to int32 itself when it fuses the conv / gemm.

    Args:
        module: nn.Conv1d / Conv2d / Conv3d / Linear (output channels on weight axis 0).
        weight_dtype: "int8" (default) or "int16", symmetric per output channel.
        weight_reduce_range: 7-bit int8 weights (see :class:`WeightFakeQuantize`); needed for exact
            ONNX Runtime integer kernels on CPUs without VNNI, costs one bit of weight resolution.
        input_quant: fake-quant of the input, or None when the producer already quantizes it.
        output_quant: fake-quant of the output, or None when a later op (e.g. after a ReLU) does.
    """

    def __init__(
        self,
        module: nn.Module,
        weight_dtype: str = "int8",
        input_quant: FakeQuantize | None = None,
        output_quant: FakeQuantize | None = None,
        weight_reduce_range: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(module, _WEIGHTED_MODULES):
            names = ", ".join(cls.__name__ for cls in _WEIGHTED_MODULES)
            raise TypeError(f"QuantWrapper wraps {names}; got {type(module).__name__}")
        self.module = module
        self.weight_quant = WeightFakeQuantize(module.weight.shape[0], weight_dtype, reduce_range=weight_reduce_range)
        self.input_quant = input_quant
        self.output_quant = output_quant

    def forward(self, x: Tensor) -> Tensor:
        """Same shapes as the wrapped module, e.g. (N, C_in, H, W) -> (N, C_out, H', W') for Conv2d."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        weight = self.weight_quant(self.module.weight)  # (C_out, ...) on the int8 grid
        out = torch.func.functional_call(self.module, {"weight": weight}, (x,))
        if self.output_quant is not None:
            out = self.output_quant(out)
        return out


def set_fake_quant_mode(model: nn.Module, mode: FakeQuantMode) -> int:
    """Puts every FakeQuantize in ``model`` (weights included) into ``mode``; returns how many."""
    modules = [module for module in model.modules() if isinstance(module, FakeQuantize)]
    for module in modules:
        module.mode = mode
    return len(modules)


def compute_fake_quant_qparams(model: nn.Module) -> int:
    """After calibration, sets scale / zero point of every activation FakeQuantize; returns how many.

    Raises naming the module when one has observed nothing (an activation calibration never reached).
    Weight fake-quants need no calibration: they follow their weight.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize) and not isinstance(module, WeightFakeQuantize):
            if not module.observer.has_data:
                raise RuntimeError(f"fake-quant {name!r} observed no data: calibration never reached it")
            module.compute_qparams()
            count += 1
    return count
