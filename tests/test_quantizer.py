"""Model-wide quantization: BN folding, which operators get fake-quant (and which stay float), int16 from the
sensitivity ranking, checkpoints of quantized models, and the sensitivity analysis itself (micro preset)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from maptr.config import CalibrateConfig, ModelConfig, load_model_config, load_params, load_section
from maptr.data.transforms import PIXEL_OFFSET, PIXEL_SCALE
from maptr.deploy.onnx_export import example_inputs
from maptr.models.maptr import MapTR, build_maptr
from maptr.models.tensor_ops import Add, MatMul, Mul
from maptr.quant import FakeQuantize, FakeQuantMode, QuantWrapper, WeightFakeQuantize, set_fake_quant_mode
from maptr.quant.calibration import calibrate
from maptr.quant.float_set import FLOAT_MODULES, FLOAT_OPERATORS
from maptr.quant.quantizer import (
    QuantConfig,
    QuantizedOp,
    build_model_from_checkpoint,
    count_quantized_operators,
    quantize_model,
    quantized_operators,
)
from maptr.quant.sensitivity import (
    excluded,
    int16_topk,
    int16_topk_for_params,
    rank_operators,
    sensitivity_report,
    top_operators,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _float_model(cfg: ModelConfig, seed: int = 0) -> MapTR:
    """An untrained model whose BatchNorms have non-trivial statistics (so that folding is tested)."""
    torch.manual_seed(seed)
    model = build_maptr(cfg)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


def _inputs(model: MapTR, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` different random pixel frames (B, Ncam, 3, H, W) and their rigs (B, Ncam, 4, 4)."""
    frames = [example_inputs(model, seed + index) for index in range(batch)]
    return torch.cat([img for img, _ in frames]), torch.cat([lidar2img for _, lidar2img in frames])


def _calibrated(cfg: ModelConfig, config: QuantConfig | None = None) -> tuple[MapTR, tuple]:
    model = quantize_model(_float_model(cfg), config or QuantConfig())
    inputs = _inputs(model)
    calibrate(model, [{"img": inputs[0], "lidar2img": inputs[1]}])
    return model, inputs


def test_disabled_fake_quant_gives_the_float_model_with_folded_batch_norm(micro_cfg):
    float_model = _float_model(micro_cfg)
    img, lidar2img = _inputs(float_model)
    with torch.no_grad():
        expected = float_model(img, lidar2img)
    model = quantize_model(_float_model(micro_cfg), QuantConfig())
    set_fake_quant_mode(model, FakeQuantMode.DISABLED)
    with torch.no_grad():
        actual = model(img, lidar2img)
    torch.testing.assert_close(actual["pred_pts"], expected["pred_pts"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], rtol=1e-4, atol=1e-4)
    # Every BatchNorm is folded into its conv (the deployed model has none).
    assert any(isinstance(m, nn.BatchNorm2d) for m in float_model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_every_conv_linear_add_matmul_is_quantized_and_the_float_set_stays_float(micro_cfg):
    model = quantize_model(_float_model(micro_cfg), QuantConfig())
    float_prefixes = tuple(FLOAT_MODULES)
    float_suffixes = tuple("." + suffix for suffix in FLOAT_OPERATORS)
    for name, module in model.named_modules():
        inside_float = name.startswith(float_prefixes)
        if isinstance(module, (nn.Conv2d, nn.Linear, Add, Mul, MatMul)):
            parent_name = name.rpartition(".")[0]
            wrapped = isinstance(model.get_submodule(parent_name), (QuantWrapper, QuantizedOp))
            float_operator = name.endswith(float_suffixes)
            assert wrapped != (inside_float or float_operator), name  # wrapped exactly when not float
        if inside_float:
            assert not isinstance(module, (FakeQuantize, QuantWrapper, QuantizedOp)), name
    ops = quantized_operators(model)
    kinds = {op.kind for op in ops}
    assert {"Conv2d", "Linear", "Add", "MatMul", "MaxPool2d"} <= kinds
    names = {op.name for op in ops}
    assert "head.reference_points" not in names and not any(n.startswith("pv_seg_head") for n in names)
    # What ONNX Runtime computes in float stays float: the deformable attention's coordinates and
    # weighted sum, and the post-norm residual sums (fused into SkipLayerNormalization) ...
    for name in (
        "encoder.layers.0.self_attn.location_add",
        "encoder.layers.0.cross_attn.attention.location_add",
        "encoder.layers.0.cross_attn.attention.weight_product",
        "encoder.layers.0.residual_add1",
        "encoder.layers.0.ffn.residual_add",
        "head.decoder.layers.0.cross_attn.location_add",
        "head.decoder.layers.0.cross_attn.weight_product",
        "head.decoder.layers.0.residual_add3",
    ):
        assert name not in names and type(model.get_submodule(name)) in (Add, Mul), name
    # ... while the integer adds keep their fake-quants: ResNet residuals and positional adds.
    assert {"backbone.layer1.0.residual_add", "head.decoder.layers.0.instance_pos_add"} <= names
    assert sum(op.kind == "Add" for op in ops) >= 4
    for op in ops:
        assert op.activation_dtype == "uint8" and all(q.dtype == "uint8" for q in op.input_quants)
        if op.kind in ("Conv2d", "Linear"):
            assert op.weight_dtype == "int8" and isinstance(op.weight_quant, WeightFakeQuantize)
            assert op.weight_quant.channel_axis == 0  # per output channel
        else:
            assert op.weight_dtype is None
    assert len(ops) == count_quantized_operators(micro_cfg)  # the meta-device count agrees


def test_int16_exclude_skips_the_image_side_and_keeps_k():
    rows = [{"name": name, "rank": rank} for rank, name in enumerate(
        ["encoder.layers.0.cross_attn.attention.location_add", "backbone.maxpool", "backbone.layer1.0.conv1",
         "neck.lateral", "backbone_like.head", "head.cls_branches.1.0", "head.decoder.layers.0.residual_add1"],
        start=1)]  # fmt: skip
    report = {"operators": rows}
    assert top_operators(report, 3) == [r["name"] for r in rows[:3]]  # no exclusion: the plain top-k
    # backbone / neck and everything under them are skipped, k operators are still picked; a name that
    # only starts with the same letters ("backbone_like") is not under "backbone".
    assert top_operators(report, 3, ["backbone", "neck"]) == [
        "encoder.layers.0.cross_attn.attention.location_add",
        "backbone_like.head",
        "head.cls_branches.1.0",
    ]
    assert excluded("backbone", ["backbone"]) and not excluded("backbone_like.head", ["backbone"])
    repo_params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")  # no default in the code
    assert load_section(repo_params, "calibrate", CalibrateConfig).int16_exclude == [
        "backbone",
        "neck",
        "encoder.camera_embedding_add",
    ]


def test_int16_goes_to_the_top_of_the_ranking_and_nowhere_else(micro_cfg):
    names = [op.name for op in quantized_operators(quantize_model(_float_model(micro_cfg), QuantConfig()))]
    # A ranking in an arbitrary order (reversed model order): the top-k of the ranking must win, not
    # the first k operators of the model.
    rows = [{"name": name, "rank": rank} for rank, name in enumerate(reversed(names), start=1)]
    top = top_operators({"operators": rows}, 3)
    assert top == list(reversed(names))[:3]
    model = quantize_model(_float_model(micro_cfg), QuantConfig(int16_ops=tuple(top)))
    for op in quantized_operators(model):
        expected = "int16" if op.name in top else "uint8"
        assert op.activation_dtype == expected and all(q.dtype == expected for q in op.input_quants), op.name
        if op.weight_quant is not None:
            assert op.weight_quant.dtype == "int8"  # int16 is for activations; weights stay int8


def test_camera_images_are_quantized_on_the_pixel_grid_without_loss(micro_cfg):
    """The stem conv's input grid is the 8-bit pixel grid itself, whatever the calibration images were."""
    model, _ = _calibrated(micro_cfg)
    image_quant = model.backbone.conv1.input_quant
    assert image_quant.dtype == "uint8" and image_quant.zero_point.item() == 128
    assert image_quant.scale.item() == pytest.approx(1 / 128, rel=1e-6)
    pixels = (torch.arange(256, dtype=torch.float32) - PIXEL_OFFSET) / PIXEL_SCALE  # every 8-bit value, normalized
    assert torch.equal(image_quant(pixels), pixels)


def test_max_pool_readers_share_its_grid_unless_they_are_int16(micro_cfg):
    model = quantize_model(_float_model(micro_cfg), QuantConfig())
    pool_grid = model.backbone.maxpool.input_quants[0]
    block = model.backbone.layer1[0]  # no downsample: the identity path is the residual add's second input
    assert block.conv1.input_quant is pool_grid and block.residual_add.input_quants[1] is pool_grid
    model = quantize_model(_float_model(micro_cfg), QuantConfig(int16_ops=("backbone.layer1.0.conv1",)))
    pool_grid = model.backbone.maxpool.input_quants[0]
    block = model.backbone.layer1[0]
    assert block.conv1.input_quant is not pool_grid and block.conv1.input_quant.dtype == "int16"
    assert block.residual_add.input_quants[1] is pool_grid


def test_int16_names_unknown_to_the_model_are_refused(micro_cfg):
    with pytest.raises(ValueError, match="sensitivity ranking is from another preset"):
        quantize_model(_float_model(micro_cfg), QuantConfig(int16_ops=("backbone.layer4.0.conv1",)))


def test_int16_topk_is_the_reference_fraction():
    assert int16_topk(290, 30, 290) == 30  # r50 itself: the guide's 30
    assert int16_topk(112, 30, 290) == 12  # tiny: 30 / 290 of 112 operators = 11.6 -> 12
    assert int16_topk(5, 30, 290) == 1  # never rounded away entirely ...
    assert int16_topk(112, 0, 290) == 0  # ... unless asked for none
    with pytest.raises(ValueError):
        int16_topk(10, 3, 0)


@pytest.mark.parametrize(("preset", "num_ops", "k"), [("nano", 111, 13), ("tiny", 93, 11), ("r50", 247, 30)])
def test_int16_topk_of_each_preset_counts_its_operators_from_the_config(preset, num_ops, k):
    """The k that sensitivity, calibrate and check_model use: one count (the figures docs/quantization.md
    quotes), however much of a ranking or report the caller holds."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["model"]["preset"] = preset
    cal = load_section(params, "calibrate", CalibrateConfig)
    assert count_quantized_operators(load_model_config(params)) == num_ops
    assert int16_topk_for_params(params, cal.int16_topk, cal.int16_topk_preset) == k


def test_quant_config_round_trips_and_validates():
    config = QuantConfig(int16_ops=("b", "a", "a"), observer="mse", percentile=99.9, weight_reduce_range=False)
    assert config.int16_ops == ("a", "b")
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="observer"):
        QuantConfig(observer="kl")


def test_quantized_checkpoint_rebuilds_the_same_model(micro_cfg):
    config = QuantConfig(int16_ops=("neck.output_conv",), observer="percentile")
    model, (img, lidar2img) = _calibrated(micro_cfg, config)
    with torch.no_grad():
        expected = model(img, lidar2img)
    checkpoint = {"model": model.state_dict(), "quant": config.to_dict()}
    rebuilt = build_model_from_checkpoint(micro_cfg, checkpoint)
    assert isinstance(rebuilt.neck.output_conv.input_quant, FakeQuantize)
    assert rebuilt.neck.output_conv.input_quant.dtype == "int16"
    with torch.no_grad():
        actual = rebuilt(img, lidar2img)
    assert torch.equal(actual["pred_pts"], expected["pred_pts"])
    assert torch.equal(actual["pred_logits"], expected["pred_logits"])
    # a float checkpoint gives the float model
    float_model = build_model_from_checkpoint(micro_cfg, {"model": _float_model(micro_cfg).state_dict()})
    assert not any(isinstance(m, FakeQuantize) for m in float_model.modules())


def test_quantized_outputs_differ_from_float_by_quantization_noise_only(micro_cfg):
    model, (img, lidar2img) = _calibrated(micro_cfg)
    with torch.no_grad():
        quantized = model(img, lidar2img)
        set_fake_quant_mode(model, FakeQuantMode.DISABLED)
        reference = model(img, lidar2img)
    difference = (quantized["pred_pts"] - reference["pred_pts"]).abs()
    assert 0 < difference.max() < 0.05  # normalized coordinates: quantized, but not broken


def test_sensitivity_ranks_a_damaged_operator_first(micro_cfg):
    model, (img, lidar2img) = _calibrated(micro_cfg)
    victim = model.head.decoder.layers[1].cross_attn.output_proj.input_quant
    victim.scale.mul_(40.0)  # a far too coarse grid: this operator's quantization now hurts most
    batches = [{"img": img, "lidar2img": lidar2img}]
    rows = rank_operators(model, batches, micro_cfg.pc_range, progress=False)
    assert len(rows) == len(quantized_operators(model))
    assert rows[0].name == "head.decoder.layers.1.cross_attn.output_proj"
    assert [row.rank for row in rows] == list(range(1, len(rows) + 1))
    errors = [row.activation_nsr for row in rows]
    assert errors == sorted(errors, reverse=True) and errors[0] > 10 * errors[len(errors) // 2]
    weighted = [row for row in rows if row.kind in ("Conv2d", "Linear")]
    assert all(row.weight_nsr is not None and row.weight_nsr >= 0 for row in weighted)
    assert all(row.weight_nsr is None for row in rows if row.kind not in ("Conv2d", "Linear"))
    assert all(q.mode is FakeQuantMode.DISABLED for q in model.modules() if isinstance(q, FakeQuantize))
    report = sensitivity_report(rows, preset="micro", num_operators=len(rows))
    assert top_operators(report, 1) == ["head.decoder.layers.1.cross_attn.output_proj"]
    # the same model and batches give the same ranking
    again = rank_operators(model, batches, micro_cfg.pc_range, with_weights=False, progress=False)
    assert [row.name for row in again] == [row.name for row in rows]
