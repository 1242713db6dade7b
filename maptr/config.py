"""Typed view of ``params.yaml``: one dataclass per section, filled and type-checked from the file.

Every stage script reads its own section with :func:`load_section`; a wrong type, an unknown or missing key
or an unknown preset raises :class:`ParamsError` naming the file, the key and the fix, so a typo in
``params.yaml`` never silently falls back to a default: params.yaml is the one source of every knob, and
the dataclasses below have no defaults (code that needs a config, tests included, reads it from a params
file).

The file is read with YAML 1.2 rules, as DVC reads and writes params (:mod:`maptr.yaml12`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from yaml import YAMLError

from maptr.classes import CLASS_NAMES
from maptr.yaml12 import parse_yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """A params file that cannot be turned into a config: names the file, the key and the fix."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    seed: int
    version: str
    train_scenes: int
    val_scenes: int
    samples_per_scene: int
    image_width: int
    image_height: int
    jpeg_quality: int


@dataclass
class PackConfig:
    dataroot: str
    version: str  # v1.0-trainval | v1.0-mini | auto: the one v1.0-* folder under dataroot
    pc_range: list[float]


@dataclass
class TrainConfig:
    """A training run (the guide's float_trainer); section ``float`` (and the base of ``qat``)."""

    # The command DVC runs the stage's script with (dvc.yaml: `${float.launcher} pipeline/float_train.py ...`):
    # `python`, or `torchrun --nproc_per_node=8` for a GPU run that DVC records in dvc.lock like any other.
    launcher: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    backbone_lr_mult: float
    weight_decay: float
    warmup_steps: int
    warmup_ratio: float
    min_lr_ratio: float
    grad_clip: float
    num_workers: int
    augment: bool
    sync_bn: bool
    bf16: bool | str  # true | false | auto: bf16 autocast of the forward (maptr/training/device.py)
    threads: int  # torch intra-op threads per process; 0 = torch's default
    val_batch_size: int
    val_every_epochs: int  # validate after every N-th epoch and after the last one
    ckpt_every_steps: int  # resume checkpoint inside an epoch
    log_every_steps: int
    cache_mb: int  # MiB per split of decoded, resized items kept in memory (0: off; main process only)


@dataclass
class SensitivityConfig:
    """Stage ``sensitivity`` (the guide's quant_analysis): rank operators by quantization damage."""

    calibration_batches: int  # training batches through the observers (8-bit scales to rank with)
    num_batches: int  # validation batches the output error is measured on
    batch_size: int
    with_weights: bool  # also measure each conv / linear with only its int8 weights quantized
    seed: int
    threads: int  # torch threads (0 = torch's default)


@dataclass
class CalibrateConfig:
    """Stage ``calibrate``: observers over ``steps`` batches, frozen scales, val mAP."""

    steps: int  # calibration batches (from the training split, no augmentation)
    batch_size: int
    observer: str  # 8-bit activation ranges: mse | percentile | minmax (int16: min/max)
    percentile: float
    int16_topk: int  # operators with int16 inputs, for the preset int16_topk_preset (the guide: 30, r50)
    int16_topk_preset: str  # other presets get the same fraction of their quantized operators
    # Module-path prefixes never given int16 inputs, however they rank: ONNX Runtime's CPU provider has no
    # int16 convolution, so int16 around the image side turns its integer convolutions back to float
    # (the camera-embedding add reads the neck's last convolution, which would then write int16).
    int16_exclude: list[str]
    weight_reduce_range: bool  # 7-bit int8 weights: exact ONNX Runtime kernels on CPUs without VNNI
    seed: int
    threads: int  # torch threads (0 = torch's default)
    val_batch_size: int


@dataclass
class QATConfig(TrainConfig):
    """Stage ``qat``: a short fine-tune of the calibrated model with fixed activation scales."""

    samples_per_epoch: int  # training samples per epoch (a different seeded slice each epoch); 0 = all


@dataclass
class ExportConfig:
    """Stage ``export``: the QAT model (Q/DQ) and the float model to ONNX."""

    opset: int  # int16 QuantizeLinear / DequantizeLinear exist from opset 21 on
    seed: int  # of the random example images the graph is traced with (the graph does not depend on it)
    threads: int  # torch threads while tracing and for the reference forward


@dataclass
class CompileConfig:
    """Stage ``compile``: ONNX Runtime's graph optimizations saved into the deployed model, and its latency."""

    optimization_level: str  # saved into the model: basic | extended | all (all is CPU-specific)
    threads: int  # ORT intra-op threads of the latency measurement (and of the deployed model)
    thread_sweep: list[int]  # also timed at these counts (report table)
    warmup: int  # untimed runs of each fresh session before its timed runs
    runs: int  # timed runs of each model, spread over the rounds
    rounds: int  # alternating rounds (order alternating too), one ORT session alive at a time
    profile_runs: int  # profiled runs (per-operator times of the op table)


@dataclass
class ValidateConfig:
    """Stage ``validate``: deployed model on ONNX Runtime over the val split vs the QAT model in PyTorch."""

    batch_size: int  # loader batch (ORT runs the batch-1 graph once per sample)
    threads: int  # torch and ORT intra-op threads
    top_k: int  # queries compared for class agreement (by the QAT model's best score)


@dataclass
class CriterionConfig:
    """Loss and matching weights (the guide's MapTRCriterion / MapTRAssigner)."""

    cls_weight: float
    pts_weight: float
    dir_weight: float
    bev_seg_weight: float
    bev_seg_pos_weight: float
    pv_seg_weight: float
    pv_seg_pos_weight: float
    one2many_weight: float
    focal_alpha: float
    focal_gamma: float
    match_cls_cost: float
    match_pts_cost: float
    class_weights: list[float]  # per class in maptr.classes.CLASS_NAMES order: a GT element of class c
    # counts class_weights[c] times in the instance losses (classification, points, direction)


@dataclass
class ModelConfig:
    """Architecture of one preset (``model.presets.<name>`` in params.yaml)."""

    backbone: str  # resnet18 | resnet34 | resnet50 (torchvision)
    feature_stride: int  # stride of the single FPN level the BEV encoder samples
    backbone_max_stride: int  # deepest ResNet stage used: 32 = all four, 16 drops layer4
    embed_dims: int
    num_heads: int
    ffn_dims: int
    image_size: list[int]  # network input [W, H]
    bev_h: int  # BEV rows, along y (forward)
    bev_w: int  # BEV columns, along x (right)
    num_points_in_pillar: int
    encoder_layers: int
    encoder_sca_points: int
    encoder_tsa_points: int
    decoder_layers: int
    decoder_points: int
    num_vec_one2one: int
    num_vec_one2many: int
    k_one2many: int
    num_pts_per_vec: int
    dropout: float
    bev_seg: bool
    pv_seg: bool
    max_num: int
    post_center_range: list[float]
    # Filled from other sections / top-level model keys, not from the preset block:
    preset: str
    pretrained: str
    pc_range: list[float]
    num_classes: int
    criterion: CriterionConfig


# --------------------------------------------------------------------------------------------------
# Loading and type checking
# --------------------------------------------------------------------------------------------------
def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file; a missing or malformed file raises :class:`ParamsError`."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root or pass --params)")
    try:
        data = parse_yaml(path.read_text())
    except YAMLError as exc:
        first = " ".join(str(exc).split())  # one line: the message names the line and column
        raise ParamsError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at top level, got {type(data).__name__}")
    data["__file__"] = str(path)
    return data


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to type ``tp`` (int -> float widening only) or raise ParamsError."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_value(value, option, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[0])
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    raise ParamsError(f"{where}: unsupported type {tp}")  # a programming error, reported the same way


def from_dict(cls: type[T], data: Any, where: str, derived: dict[str, Any] | None = None) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys, missing keys and wrong types are errors naming
    ``where``. ``derived``: values of fields the caller takes from elsewhere, never read from this mapping."""
    derived = derived or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(derived)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    missing = sorted(names - set(data))
    if missing:
        raise ParamsError(f"{where}: missing key(s) {missing}; set them in params.yaml (no knob has a default "
                          "in the code)")  # fmt: skip
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return check_ranges(cls(**kwargs, **derived), where)


def load_section(params: dict[str, Any], name: str, cls: type[T]) -> T:
    """The typed config of section ``name`` of a loaded params dict."""
    where = f"{params.get('__file__', 'params.yaml')}: {name}"
    if name not in params:
        raise ParamsError(f"{where}: section missing (add a `{name}:` section to params.yaml)")
    return from_dict(cls, params[name], where)


def load_model_config(params: dict[str, Any]) -> ModelConfig:
    """The model preset chosen by ``model.preset``, with ``pack.pc_range``, ``model.pretrained``,
    ``model.criterion`` and the class count (``maptr.classes``)."""
    file = params.get("__file__", "params.yaml")
    model = params.get("model")
    if not isinstance(model, dict):
        raise ParamsError(f"{file}: model: section missing or not a mapping")
    presets = model.get("presets")
    if not isinstance(presets, dict) or not presets:
        raise ParamsError(f"{file}: model.presets: expected a mapping of named presets (nano, tiny, r50)")
    preset = model.get("preset")
    if preset not in presets:
        raise ParamsError(f"{file}: model.preset: unknown preset {preset!r}; choose one of {sorted(presets)}")
    extra = sorted(set(model) - {"preset", "presets", "pretrained", "criterion"})
    if extra:
        raise ParamsError(f"{file}: model: unknown key(s) {extra}; per-preset knobs go under model.presets")
    for key in ("pretrained", "criterion"):
        if key not in model:
            raise ParamsError(f"{file}: model.{key}: missing; set it in params.yaml (see the repository's file)")
    pack = load_section(params, "pack", PackConfig)
    pretrained = _check_value(model["pretrained"], str, f"{file}: model.pretrained")
    criterion = from_dict(CriterionConfig, model["criterion"], f"{file}: model.criterion")
    if len(criterion.class_weights) != len(CLASS_NAMES):
        raise ParamsError(f"{file}: model.criterion.class_weights: one weight per class {list(CLASS_NAMES)}, "
                          f"got {criterion.class_weights}")  # fmt: skip
    # Every preset is checked, not only the selected one: a typo in `tiny` should fail now, not the
    # day someone runs `dvc exp run -S model.preset=tiny`.
    built = {}
    for name, block in presets.items():
        where = f"{file}: model.presets.{name}"
        derived = {"preset": name, "pretrained": pretrained, "pc_range": list(pack.pc_range),
                   "num_classes": len(CLASS_NAMES),
                   "criterion": criterion}  # fmt: skip
        built[name] = from_dict(ModelConfig, block, where, derived=derived)
        _validate_model(built[name], where)
    return built[preset]


def _validate_model(cfg: ModelConfig, where: str) -> None:
    if cfg.backbone not in ("resnet18", "resnet34", "resnet50"):
        raise ParamsError(f"{where}.backbone: {cfg.backbone!r} is not one of resnet18, resnet34, resnet50")
    if cfg.feature_stride not in (4, 8, 16, 32):
        raise ParamsError(f"{where}.feature_stride: must be 4, 8, 16 or 32, got {cfg.feature_stride}")
    if cfg.backbone_max_stride not in (8, 16, 32) or cfg.backbone_max_stride < cfg.feature_stride:
        raise ParamsError(
            f"{where}.backbone_max_stride: must be 8, 16 or 32 and >= feature_stride, got {cfg.backbone_max_stride}"
        )
    if cfg.embed_dims % cfg.num_heads:
        raise ParamsError(f"{where}: embed_dims {cfg.embed_dims} must be divisible by num_heads {cfg.num_heads}")
    if len(cfg.image_size) != 2 or any(s % 32 for s in cfg.image_size):
        raise ParamsError(f"{where}.image_size: expected [W, H], both multiples of 32, got {cfg.image_size}")
    if len(cfg.pc_range) != 6:
        raise ParamsError(f"{where}: pack.pc_range must have 6 numbers [x0, y0, z0, x1, y1, z1]")
    if (cfg.num_vec_one2many > 0) != (cfg.k_one2many > 0):
        # queries without a k never get a loss (and stall DDP); a k without queries does nothing
        raise ParamsError(
            f"{where}: num_vec_one2many ({cfg.num_vec_one2many}) and k_one2many ({cfg.k_one2many}) must be both 0 "
            "(no one2many group) or both > 0"
        )


# --------------------------------------------------------------------------------------------------
# Ranges: a value of the right type can still be meaningless (0 epochs, a probability of 2). Checked for
# every section when it is read, so each stage refuses it before any work, with the key and the range.
# --------------------------------------------------------------------------------------------------
Rule = tuple[typing.Callable[[Any], bool], str]


def _ge(low: float) -> Rule:
    return (lambda v: v >= low), f">= {low}"


def _gt(low: float) -> Rule:
    return (lambda v: v > low), f"> {low}"


def _within(low: float, high: float) -> Rule:
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


def _one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


_COUNT, _NONNEG, _POSITIVE, _PROB = _ge(1), _ge(0), _gt(0), _within(0, 1)
_RANGES: dict[type, dict[str, Rule]] = {
    SynthConfig: {"seed": _NONNEG, "train_scenes": _COUNT, "val_scenes": _COUNT, "samples_per_scene": _COUNT,
                  "image_width": _ge(32), "image_height": _ge(32), "jpeg_quality": _within(1, 100)},
    TrainConfig: {"seed": _NONNEG, "epochs": _COUNT, "batch_size": _COUNT, "lr": _POSITIVE,
                  "backbone_lr_mult": _NONNEG, "weight_decay": _NONNEG, "warmup_steps": _NONNEG,
                  "warmup_ratio": _PROB, "min_lr_ratio": _PROB, "grad_clip": _NONNEG,
                  "num_workers": _NONNEG, "threads": _NONNEG, "val_batch_size": _COUNT, "val_every_epochs": _COUNT,
                  "ckpt_every_steps": _NONNEG,
                  "log_every_steps": _COUNT, "cache_mb": _NONNEG,
                  "bf16": ((lambda v: v in (True, False, "auto")), "true, false or auto")},
    QATConfig: {"samples_per_epoch": _NONNEG},
    SensitivityConfig: {"calibration_batches": _COUNT, "num_batches": _COUNT, "batch_size": _COUNT,
                        "seed": _NONNEG, "threads": _NONNEG},
    CalibrateConfig: {"steps": _COUNT, "batch_size": _COUNT, "observer": _one_of("mse", "percentile", "minmax"),
                      "percentile": _within(50, 100), "int16_topk": _NONNEG, "seed": _NONNEG, "threads": _NONNEG,
                      "val_batch_size": _COUNT},
    ExportConfig: {"opset": _ge(21), "seed": _NONNEG, "threads": _NONNEG},
    # the levels ONNX Runtime can save (maptr.deploy.checker.LEVELS; not imported: config stays light)
    CompileConfig: {"optimization_level": _one_of("basic", "extended", "all"), "threads": _COUNT,
                    "thread_sweep": _COUNT, "warmup": _NONNEG, "runs": _COUNT, "rounds": _COUNT,
                    "profile_runs": _NONNEG},
    ValidateConfig: {"batch_size": _COUNT, "threads": _NONNEG, "top_k": _COUNT},
    CriterionConfig: {**{f.name: _NONNEG for f in dataclasses.fields(CriterionConfig)}, "focal_alpha": _PROB,
                      "class_weights": _POSITIVE},
    ModelConfig: {**{name: _COUNT for name in (
        "embed_dims", "num_heads", "ffn_dims", "bev_h", "bev_w", "num_points_in_pillar", "encoder_layers",
        "encoder_sca_points", "encoder_tsa_points", "decoder_layers", "decoder_points", "num_vec_one2one",
        "max_num", "image_size")},
        "num_vec_one2many": _NONNEG, "k_one2many": _NONNEG, "num_pts_per_vec": _ge(2), "dropout": _within(0, 0.99)},
}  # fmt: skip


def check_ranges(cfg: T, where: str) -> T:
    """Return ``cfg`` when every value lies in its range (a list: each item), else raise ParamsError
    naming ``where.key``, the range and the value."""
    rules: dict[str, Rule] = {}
    for klass in reversed(type(cfg).__mro__):  # QATConfig: TrainConfig's rules, then its own
        rules.update(_RANGES.get(klass, {}))
    for key, (ok, need) in rules.items():
        value = getattr(cfg, key)
        if not all(ok(v) for v in (value if isinstance(value, list) else [value])):
            each = "each item " if isinstance(value, list) else ""
            raise ParamsError(f"{where}.{key}: {each}must be {need}, got {value!r}")
    return cfg
