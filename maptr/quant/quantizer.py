"""Model-wide fake-quant insertion: which operators of MapTR are quantized, with which dtype, and what stays float.

A quantized model is the float :class:`~maptr.models.maptr.MapTR` with its modules wrapped in place, so
training, calibration, QAT and export run the same forward. The rule is uniform and needs no graph
analysis: every quantized operator fake-quantizes **each of its inputs** (one ``FakeQuantize`` per input,
uint8 per tensor by default) and, for convs and linears, its weight (int8 symmetric per output channel,
7-bit by default, see :class:`~maptr.quant.fake_quant.WeightFakeQuantize`). Outputs are not quantized by
their producer: the consumer's input quantization is that Q/DQ. So a fake-quant always sits after a
ReLU, a conv feeding a quantized op ends in ``Q`` (which ONNX Runtime fuses into ``QLinearConv``), and
the model's outputs (class logits, point deltas) stay float.

Quantized operators (the units of the sensitivity ranking, named by module path):

- every ``nn.Conv2d`` / ``nn.Linear`` of the inference path (backbone, FPN, attention projections,
  sampling offsets, attention-weight logits, FFNs, class and point branches);
- the :mod:`maptr.models.tensor_ops` modules that ONNX Runtime can run as integer kernels: the
  positional adds, the FPN merge, the camera-embedding add, ``q @ k^T`` and ``probabilities @ v``
  (:class:`MatMul`);
- the residual adds inside the ResNet blocks and the stem's max-pool (so that the stem conv ends in Q).

The other :mod:`~maptr.models.tensor_ops` modules stay float
(:data:`~maptr.quant.float_set.FLOAT_OPERATORS`): ONNX Runtime computes them in float whatever their
inputs are, so a fake-quant there would only add rounding error and a Q/DQ pair per input to the
deployed graph.

Two tensors get a grid that is known rather than estimated. The camera images (the input of
:data:`IMAGE_INPUT_OP`) are 8-bit pixels normalized by ``(pixel - 128) / 128``: their uint8 grid is the
pixel grid itself (scale 1 / 128, zero point 128), so the image input is quantized losslessly and needs
no int16. And the stem's max-pool output keeps the grid of its input (:func:`_tie_max_pool_grid`): the
maximum of values on a grid is on that grid, so its consumers need no grid of their own, and ONNX
Runtime runs the max-pool on uint8 (it does so only when the Q after it has the DQ's scale).

BatchNorm is folded into the preceding conv first (:func:`fold_batch_norms`): a deployed int model has
no BatchNorm, and QAT then trains the folded weights.

The operators whose inputs get int16 are named in :class:`QuantConfig` (``int16_ops``), which the
calibrate stage fills from the top of the sensitivity ranking; nothing here lists them by hand. What
stays float, and why, is listed in :mod:`maptr.quant.float_set`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from maptr.config import CalibrateConfig, ModelConfig
from maptr.data.transforms import normalized_pixel_range
from maptr.models.maptr import MapTR, build_maptr
from maptr.models.tensor_ops import Add, MatMul, Mul
from maptr.quant.fake_quant import FakeQuantize, FakeQuantMode, QuantWrapper, WeightFakeQuantize, fake_quant
from maptr.quant.float_set import is_float_module, is_float_operator
from maptr.quant.observers import (
    FixedRangeObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    RangeObserver,
)

IMAGE_INPUT_OP = "backbone.conv1"  # the first operator on the camera images: its input is the pixel grid
ACTIVATION_DTYPE = "uint8"  # what ONNX Runtime's CPU integer kernels take (docs/quantization.md)
SENSITIVE_DTYPE = "int16"
OBSERVERS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: saved in every quantized checkpoint so that the same structure can be rebuilt.

    Args:
        int16_ops: names of the operators whose inputs get int16 (the top of the sensitivity ranking).
        observer: range estimator of the 8-bit activations: "percentile", "mse" or "minmax" (int16
            inputs always use min/max: their grid is fine enough that clipping never pays).
        percentile: for the percentile observer.
        weight_reduce_range: 7-bit int8 weights (exact ONNX Runtime kernels on CPUs without VNNI).

    The stages build it from the ``calibrate`` section (:meth:`from_calibrate`); the defaults only serve
    uses where the observer does not matter (counting operators, building a structure to load into).
    """

    int16_ops: tuple[str, ...] = ()
    observer: str = "percentile"
    percentile: float = 99.99
    weight_reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        object.__setattr__(self, "int16_ops", tuple(sorted(set(self.int16_ops))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "int16_ops": list(self.int16_ops),
            "observer": self.observer,
            "percentile": self.percentile,
            "weight_reduce_range": self.weight_reduce_range,
        }

    @classmethod
    def from_calibrate(cls, cfg: CalibrateConfig, int16_ops: tuple[str, ...] | list[str] = ()) -> QuantConfig:
        """The quantization the ``calibrate`` section asks for, with ``int16_ops`` in int16."""
        return cls(int16_ops=tuple(int16_ops), observer=cfg.observer, percentile=cfg.percentile,
                   weight_reduce_range=cfg.weight_reduce_range)  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return cls(
            int16_ops=tuple(data["int16_ops"]),
            observer=str(data["observer"]),
            percentile=float(data["percentile"]),
            weight_reduce_range=bool(data["weight_reduce_range"]),
        )

    def make_observer(self, dtype: str) -> RangeObserver:
        if dtype == SENSITIVE_DTYPE or self.observer == "minmax":
            return MinMaxObserver()
        if self.observer == "percentile":
            return PercentileObserver(self.percentile)
        return MSEObserver()

    def activation_quant(self, dtype: str) -> FakeQuantize:
        return FakeQuantize(dtype, observer=self.make_observer(dtype))


class ReentrantWeightFakeQuantize(WeightFakeQuantize):
    """:class:`WeightFakeQuantize` that may run several times in one forward.

    In training the decoder's attention modules run once per query group (one2one, one2many). The
    parent recomputes its scale buffer in place on every call and hands that buffer to the fake-quant
    op, so the second call would overwrite the tensor autograd saved for the first ("modified by an
    inplace operation" in backward). Here the op gets a copy; the buffers still hold the latest scales
    (saved in the state dict, read while exporting), exactly as in the parent.
    """

    def forward(self, weight: Tensor) -> Tensor:
        """(C_out, ...) -> (C_out, ...)."""
        if self.mode is FakeQuantMode.DISABLED or torch.compiler.is_exporting():
            return super().forward(weight)
        self.observer.reset()
        self.observer.update(weight)
        self.compute_qparams()
        if self.mode is FakeQuantMode.OBSERVE:
            return weight
        return fake_quant(weight, self.scale.clone(), self.zero_point.clone(), self.channel_axis)


def _weight_wrapper(module: nn.Module, input_quant: FakeQuantize, reduce_range: bool) -> QuantWrapper:
    """QuantWrapper (int8 per-channel weights, this input fake-quant) with the re-entrant weight fake-quant."""
    wrapper = QuantWrapper(module, input_quant=input_quant, weight_reduce_range=reduce_range)
    wrapper.weight_quant = ReentrantWeightFakeQuantize(module.weight.shape[0], reduce_range=reduce_range)
    return wrapper


class QuantizedOp(nn.Module):
    """A parameter-free operator (Add, Mul, MatMul, MaxPool2d) with a fake-quant on each of its inputs.

    Args:
        op: the float operator module.
        input_quants: one FakeQuantize per positional input of ``op``.
    """

    def __init__(self, op: nn.Module, input_quants: list[FakeQuantize]) -> None:
        super().__init__()
        if not input_quants:
            raise ValueError("a quantized operator needs at least one input fake-quant")
        self.op = op
        self.input_quants = nn.ModuleList(input_quants)

    def fake_quants(self) -> list[FakeQuantize]:
        """The input fake-quants, in input order."""
        return list(self.input_quants)

    def forward(self, *inputs: Tensor) -> Tensor:
        """Same shapes as ``op``: each input is fake-quantized, then ``op`` runs in float."""
        if len(inputs) != len(self.input_quants):
            raise ValueError(f"{type(self.op).__name__} takes {len(self.input_quants)} inputs, got {len(inputs)}")
        return self.op(*(quant(x) for quant, x in zip(self.input_quants, inputs, strict=True)))


class QuantizedBasicBlock(nn.Module):
    """torchvision's BasicBlock with BatchNorm folded and its residual sum as a (quantizable) module."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
        self.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
        self.downsample = _fold_downsample(block.downsample)
        self.residual_add = Add()

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(self.residual_add(out, identity))


class QuantizedBottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet50) with BatchNorm folded and its residual sum as a module."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
        self.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
        self.conv3 = fuse_conv_bn_eval(block.conv3, block.bn3)
        self.downsample = _fold_downsample(block.downsample)
        self.residual_add = Add()

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, 4 * C, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(self.residual_add(self.conv3(out), identity))


def _fold_downsample(downsample: nn.Module | None) -> nn.Conv2d | None:
    if downsample is None:
        return None
    conv, norm = downsample  # torchvision: Sequential(conv1x1, BatchNorm2d)
    return fuse_conv_bn_eval(conv, norm)


def fold_batch_norms(model: MapTR) -> None:
    """Folds every BatchNorm of the inference path into its conv, in place (uses the running statistics).

    Backbone: stem conv + bn1, the ResNet blocks (replaced by :class:`QuantizedBasicBlock` /
    :class:`QuantizedBottleneck`); FPN: output conv + output norm. Afterwards the model has no
    BatchNorm outside the (float, training-only) segmentation heads.
    """
    model.eval()  # fuse_conv_bn_eval folds the running statistics, which eval mode uses
    backbone = model.backbone
    backbone.conv1 = fuse_conv_bn_eval(backbone.conv1, backbone.bn1)
    backbone.bn1 = nn.Identity()
    for stage in range(backbone.num_stages):
        layer = getattr(backbone, f"layer{stage + 1}")
        for index, block in enumerate(layer):
            if isinstance(block, BasicBlock):
                layer[index] = QuantizedBasicBlock(block)
            elif isinstance(block, Bottleneck):
                layer[index] = QuantizedBottleneck(block)
            else:
                raise TypeError(f"backbone.layer{stage + 1}.{index}: unknown ResNet block {type(block).__name__}")
    neck = model.neck
    neck.output_conv = fuse_conv_bn_eval(neck.output_conv, neck.output_norm)
    neck.output_norm = nn.Identity()


def _quantizable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module to wrap, in registration order."""
    for name, module in model.named_modules():
        if is_float_module(name) or is_float_operator(name):
            continue
        # MaxPool2d: quantizing its input makes the stem conv end in Q (an integer QLinearConv in ORT)
        if isinstance(module, (nn.Conv2d, nn.Linear, Add, Mul, MatMul, nn.MaxPool2d)):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)  # ModuleList / Sequential children are registered under "0", "1", ...


def quantize_model(model: MapTR, config: QuantConfig) -> MapTR:
    """Folds BatchNorm and wraps every quantizable operator in place; returns ``model``.

    Afterwards every fake-quant is in OBSERVE mode: run calibration data through the model, then
    :func:`~maptr.quant.calibration.freeze_calibration`. Raises ValueError when ``config.int16_ops`` names
    an operator the model does not have (a ranking of another preset, a stale report).
    """
    fold_batch_norms(model)
    targets = list(_quantizable_modules(model))
    unknown = sorted(set(config.int16_ops) - {name for name, _ in targets})
    if unknown:
        raise ValueError(
            f"int16_ops names {len(unknown)} operator(s) this model does not have, e.g. {unknown[:3]}: "
            "the sensitivity ranking is from another preset or model version; re-run the sensitivity stage"
        )
    for name, module in targets:
        dtype = SENSITIVE_DTYPE if name in config.int16_ops else ACTIVATION_DTYPE
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            input_quant = config.activation_quant(dtype)
            if name == IMAGE_INPUT_OP and dtype == ACTIVATION_DTYPE:
                input_quant = FakeQuantize(dtype, observer=FixedRangeObserver(*normalized_pixel_range()))
            wrapped: nn.Module = _weight_wrapper(module, input_quant, config.weight_reduce_range)
        else:
            num_inputs = 1 if isinstance(module, nn.MaxPool2d) else 2
            wrapped = QuantizedOp(module, [config.activation_quant(dtype) for _ in range(num_inputs)])
        _set_submodule(model, name, wrapped)
    _tie_max_pool_grid(model)
    return model


def _tie_max_pool_grid(model: MapTR) -> None:
    """Gives the readers of the stem max-pool's output the max-pool's own input fake-quant (one module).

    Max-pooling selects values, so its output is on its input's grid already. Re-quantizing it with a
    grid calibrated on its own would round every value a second time and, in ONNX Runtime, keep the
    max-pool in float between a DQ and a Q of different scales (~0.5 ms per frame on nano: DQ, float
    max-pool, Q). The readers are the first ResNet block's ``conv1`` and its identity path (the residual
    add's second input, or the downsample conv). Tied only where the reader's dtype is the max-pool's
    (an int16 reader from the sensitivity ranking keeps its own grid).
    """
    pool = model.backbone.maxpool
    block = model.backbone.layer1[0]
    if not isinstance(pool, QuantizedOp):
        return
    source = pool.input_quants[0]
    if isinstance(block.conv1, QuantWrapper) and block.conv1.input_quant.dtype == source.dtype:
        block.conv1.input_quant = source
    if block.downsample is not None:
        if isinstance(block.downsample, QuantWrapper) and block.downsample.input_quant.dtype == source.dtype:
            block.downsample.input_quant = source
    elif isinstance(block.residual_add, QuantizedOp) and block.residual_add.input_quants[1].dtype == source.dtype:
        block.residual_add.input_quants[1] = source


@dataclass
class OperatorInfo:
    """One quantized operator: its path, kind, activation dtype, and its fake-quant modules."""

    name: str
    kind: str  # Conv2d, Linear, Add, Mul, MatMul, MaxPool2d
    activation_dtype: str  # dtype of its inputs: uint8 or int16
    weight_dtype: str | None  # int8 for convs / linears, None for parameter-free operators
    input_quants: list[FakeQuantize] = field(repr=False)
    weight_quant: WeightFakeQuantize | None = field(default=None, repr=False)


def quantized_operators(model: nn.Module) -> list[OperatorInfo]:
    """Every quantized operator of a model built by :func:`quantize_model`, in registration order."""
    ops = []
    for name, module in model.named_modules():
        if isinstance(module, QuantWrapper):
            assert module.input_quant is not None  # the quantizer always quantizes the input
            ops.append(
                OperatorInfo(
                    name,
                    type(module.module).__name__,
                    module.input_quant.dtype,
                    module.weight_quant.dtype,
                    [module.input_quant],
                    module.weight_quant,
                )
            )
        elif isinstance(module, QuantizedOp):
            quants = module.fake_quants()
            ops.append(OperatorInfo(name, type(module.op).__name__, quants[0].dtype, None, quants))
    return ops


def count_quantized_operators(model_cfg: ModelConfig) -> int:
    """How many operators :func:`quantize_model` wraps for a preset (built on the meta device: instant)."""
    with torch.device("meta"):
        model = quantize_model(build_maptr(model_cfg), QuantConfig())
    return len(quantized_operators(model))


def set_operator_mode(op: OperatorInfo, activations: FakeQuantMode, weights: FakeQuantMode) -> None:
    """Puts one operator's input fake-quants and weight fake-quant into the given modes."""
    for quant in op.input_quants:
        quant.mode = activations
    if op.weight_quant is not None:
        op.weight_quant.mode = weights


def build_quantized_maptr(model_cfg: ModelConfig, config: QuantConfig, state_dict: dict[str, Any]) -> MapTR:
    """The quantized structure of ``config`` with the weights and frozen scales of a quantized checkpoint."""
    model = quantize_model(build_maptr(model_cfg), config)
    model.load_state_dict(state_dict)
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            module.mode = FakeQuantMode.QUANTIZE
    model.eval()
    return model


def build_model_from_checkpoint(model_cfg: ModelConfig, checkpoint: dict[str, Any]) -> MapTR:
    """Float or quantized MapTR, whichever the checkpoint holds (quantized ones carry a ``quant`` entry)."""
    if "quant" in checkpoint:
        return build_quantized_maptr(model_cfg, QuantConfig.from_dict(checkpoint["quant"]), checkpoint["model"])
    model = build_maptr(model_cfg)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model
