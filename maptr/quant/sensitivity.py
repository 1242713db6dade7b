"""Quantization sensitivity (the guide's ``quant_analysis``): which operators hurt most when quantized.

One operator at a time: on the calibrated 8-bit model with every fake-quant disabled (= the float model
with BatchNorm folded), the inputs of one operator are fake-quantized (8-bit, its calibrated scales) and
the model's outputs are compared with the float outputs on a few validation batches. The ranking key
is the noise-to-signal ratio of the outputs,

    NSR = sum ||y_q - y_f||^2 / sum ||y_f - mean(y_f)||^2, summed over the class scores (sigmoid) and the
    normalized points,

scale-free, so that scores and points count alike. The weights' damage (int8 weights alone) is measured
too, for the report: it is not what int16 activations can repair. The operators at the top of the
activation ranking get int16 inputs (see :mod:`maptr.quant.quantizer`), except those under the
``calibrate.int16_exclude`` prefixes: the image side by default, where ORT has no int16 convolution.

Speed: an operator in the map head only needs the head to be re-run, one in the encoder the encoder and
head; the float camera features and BEV features of every batch are computed once and reused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from maptr.config import load_model_config
from maptr.models.maptr import MapTR
from maptr.quant.fake_quant import QUANT_RANGES, FakeQuantize, FakeQuantMode, set_fake_quant_mode
from maptr.quant.quantizer import (
    OperatorInfo,
    count_quantized_operators,
    quantized_operators,
    set_operator_mode,
)

# Where an operator sits decides how much of the forward must be re-run: 0 from the images,
# 1 from the camera features (encoder), 2 from the BEV features (map head).
_STAGE_OF_PREFIX = {"backbone": 0, "neck": 0, "encoder": 1, "head": 2}


@dataclass
class OperatorSensitivity:
    """One row of the ranking."""

    name: str
    kind: str
    activation_nsr: float  # ranking key: output NSR with this operator's inputs quantized (8-bit)
    score_nsr: float
    pts_nsr: float
    pts_error_m: float  # score-weighted mean point displacement, meters
    weight_nsr: float | None  # output NSR with only this operator's weights quantized (int8)
    input_ranges: list[list[float]] = field(default_factory=list)  # per input: [lo, hi] of its 8-bit grid
    rank: int = 0


@dataclass
class _Cached:
    """Float intermediates of one batch."""

    img: Tensor  # (B, Ncam, 3, H, W)
    lidar2img: Tensor  # (B, Ncam, 4, 4)
    camera_features: Tensor  # (B*Ncam, C, h, w)
    bev: Tensor  # (B, H*W, C)
    scores: Tensor  # (B, Q, K) sigmoid
    pts: Tensor  # (B, Q, P, 2) normalized


def _stage_of(name: str) -> int:
    prefix = name.split(".", 1)[0]
    if prefix not in _STAGE_OF_PREFIX:
        raise ValueError(f"operator {name!r} is outside backbone / neck / encoder / head")
    return _STAGE_OF_PREFIX[prefix]


def _forward_from(model: MapTR, stage: int, cached: _Cached) -> tuple[Tensor, Tensor]:
    """MapTR's eval forward (``MapTR.predict`` without the training extras) started at ``stage``."""
    if stage == 0:
        camera_features = model.neck(model.backbone(cached.img.flatten(0, 1)))  # (B*Ncam, C, h, w)
    else:
        camera_features = cached.camera_features
    bev = model.encoder(camera_features, cached.lidar2img) if stage <= 1 else cached.bev  # (B, H*W, C)
    out = model.head(bev, with_one2many=False)
    return out["pred_logits"].sigmoid(), out["pred_pts"]


def _input_range(quant: FakeQuantize) -> list[float]:
    grid = QUANT_RANGES[quant.dtype]
    scale, zero_point = float(quant.scale), int(quant.zero_point)
    return [(grid.qmin - zero_point) * scale, (grid.qmax - zero_point) * scale]


class _ErrorAccumulator:
    """Sums of squared errors and of the float outputs' variance over batches."""

    def __init__(self, pc_range: list[float]) -> None:
        x0, y0, _, x1, y1, _ = pc_range
        self.extent = torch.tensor([x1 - x0, y1 - y0])  # meters per normalized unit, (x, y)
        self.sums = {"score_err": 0.0, "score_var": 0.0, "pts_err": 0.0, "pts_var": 0.0, "disp": 0.0, "weight": 0.0}

    def add(self, ref: _Cached, scores: Tensor, pts: Tensor) -> None:
        s = self.sums
        s["score_err"] += float(((scores - ref.scores) ** 2).sum())
        s["score_var"] += float(((ref.scores - ref.scores.mean()) ** 2).sum())
        s["pts_err"] += float(((pts - ref.pts) ** 2).sum())
        s["pts_var"] += float(((ref.pts - ref.pts.mean()) ** 2).sum())
        confidence = ref.scores.amax(-1)  # (B, Q)
        displacement = ((pts - ref.pts) * self.extent).norm(dim=-1).mean(-1)  # (B, Q) meters
        s["disp"] += float((confidence * displacement).sum())
        s["weight"] += float(confidence.sum())

    def result(self) -> tuple[float, float, float]:
        """(score NSR, points NSR, score-weighted point displacement in meters)."""
        s = self.sums
        return (
            s["score_err"] / max(s["score_var"], 1e-12),
            s["pts_err"] / max(s["pts_var"], 1e-12),
            s["disp"] / max(s["weight"], 1e-12),
        )


def _measure(model: MapTR, stage: int, cache: list[_Cached], pc_range: list[float]) -> tuple[float, float, float]:
    errors = _ErrorAccumulator(pc_range)
    for cached in cache:
        scores, pts = _forward_from(model, stage, cached)
        errors.add(cached, scores, pts)
    return errors.result()


@torch.no_grad()
def rank_operators(
    model: MapTR,
    batches: Iterable[dict[str, Any]],
    pc_range: list[float],
    with_weights: bool = True,
    progress: bool = True,
) -> list[OperatorSensitivity]:
    """Ranks the quantized operators of a calibrated model by the damage of quantizing each alone.

    Args:
        model: a model from :func:`~maptr.quant.quantizer.quantize_model` whose activation scales are
            set (calibrated); its fake-quant modes are left DISABLED on return.
        batches: dicts with ``img`` (B, Ncam, 3, H, W) and ``lidar2img`` (B, Ncam, 4, 4).
        pc_range: [x0, y0, z0, x1, y1, z1], to express point errors in meters.
        with_weights: also measure each conv / linear with only its weights quantized.
    Returns:
        one :class:`OperatorSensitivity` per operator, most damaging first (``rank`` 1 = worst).
    """
    model.eval()
    set_fake_quant_mode(model, FakeQuantMode.DISABLED)
    cache = []
    for batch in batches:
        img, lidar2img = batch["img"], batch["lidar2img"]
        camera_features = model.neck(model.backbone(img.flatten(0, 1)))  # (B*Ncam, C, h, w)
        bev = model.encoder(camera_features, lidar2img)  # (B, H*W, C)
        out = model.head(bev, with_one2many=False)
        cache.append(_Cached(img, lidar2img, camera_features, bev, out["pred_logits"].sigmoid(), out["pred_pts"]))
    if not cache:
        raise ValueError("sensitivity analysis got no batches")

    ops: list[OperatorInfo] = quantized_operators(model)
    rows = []
    for op in tqdm(ops, desc="sensitivity", unit="op", disable=not progress):
        stage = _stage_of(op.name)
        set_operator_mode(op, FakeQuantMode.QUANTIZE, FakeQuantMode.DISABLED)
        score_nsr, pts_nsr, pts_error_m = _measure(model, stage, cache, pc_range)
        weight_nsr = None
        if with_weights and op.weight_quant is not None:
            set_operator_mode(op, FakeQuantMode.DISABLED, FakeQuantMode.QUANTIZE)
            weight_score, weight_pts, _ = _measure(model, stage, cache, pc_range)
            weight_nsr = weight_score + weight_pts
        set_operator_mode(op, FakeQuantMode.DISABLED, FakeQuantMode.DISABLED)
        rows.append(
            OperatorSensitivity(
                name=op.name,
                kind=op.kind,
                activation_nsr=score_nsr + pts_nsr,
                score_nsr=score_nsr,
                pts_nsr=pts_nsr,
                pts_error_m=pts_error_m,
                weight_nsr=weight_nsr,
                input_ranges=[_input_range(quant) for quant in op.input_quants],
            )
        )
    # Stable sort: equal errors keep the model's order, so the ranking is reproducible.
    rows.sort(key=lambda row: -row.activation_nsr)
    for rank, row in enumerate(rows, start=1):
        row.rank = rank
    return rows


def int16_topk(num_ops: int, reference_topk: int, reference_num_ops: int) -> int:
    """How many operators get int16: the same fraction of this model's operators as ``reference_topk``
    is of the reference preset's (the guide: 30 for r50), rounded, at least 1 when the reference has any."""
    if reference_num_ops < 1 or reference_topk < 0:
        raise ValueError(
            f"need reference_num_ops >= 1 and reference_topk >= 0, got {reference_num_ops}, {reference_topk}"
        )
    if reference_topk == 0:
        return 0
    return max(1, min(num_ops, round(reference_topk * num_ops / reference_num_ops)))


def int16_topk_for_params(params: dict[str, Any], topk: int, topk_preset: str) -> int:
    """:func:`int16_topk` for the preset that a params dict selects, ``topk`` being k of preset ``topk_preset``.

    Both operator counts come from :func:`count_quantized_operators` (the preset's config alone), so that
    sensitivity, calibrate and the model checker, which hold different things (a ranking, a report, a
    model), get the same k.
    """
    reference = load_model_config({**params, "model": {**params["model"], "preset": topk_preset}})
    return int16_topk(count_quantized_operators(load_model_config(params)), topk, count_quantized_operators(reference))


def sensitivity_report(rows: list[OperatorSensitivity], **meta: Any) -> dict[str, Any]:
    """The JSON document of the sensitivity stage: metadata and the ranked table."""
    return {**meta, "metric": "output NSR (scores + points), one operator's inputs quantized at a time",
            "operators": [asdict(row) for row in rows]}  # fmt: skip


def excluded(name: str, prefixes: Iterable[str]) -> bool:
    """Is module path ``name`` one of ``prefixes`` or inside one of them (``backbone`` covers ``backbone.conv1``)?"""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def top_operators(report: dict[str, Any], k: int, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the ``k`` most sensitive operators of a report written by :func:`sensitivity_report`,
    skipping those under the module-path prefixes ``exclude`` (``calibrate.int16_exclude``)."""
    prefixes = tuple(exclude)
    ranked = sorted(report["operators"], key=lambda row: row["rank"])
    return [row["name"] for row in ranked if not excluded(row["name"], prefixes)][:k]
