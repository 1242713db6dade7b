"""Criterion and loss terms: names and weights, zero loss at the GT, normalization, gradients, seg."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import model_config
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from maptr.config import ModelConfig
from maptr.data.vectors import equivalent_orders, normalize_points
from maptr.training.criterion import build_criterion, build_weight_dict
from maptr.training.losses import edge_direction_loss, resize_seg_target, seg_bce_loss, sigmoid_focal_loss

P = 5
Q, Q_O2M, C = 6, 12, 3


def tiny_config() -> ModelConfig:
    cfg = model_config()
    cfg.num_pts_per_vec, cfg.decoder_layers, cfg.k_one2many = P, 3, 2
    cfg.num_vec_one2one, cfg.num_vec_one2many = Q, Q_O2M
    return cfg


def gt_batch() -> dict:
    """Sample 0: a polyline and a ring; sample 1: no GT. Seg targets at twice the prediction size."""
    ys = np.linspace(-10, 10, P)
    line = np.stack([0.1 * ys - 4, ys], axis=1).astype(np.float32)
    angles = np.linspace(0, 2 * np.pi, P)[:-1]
    ring = np.stack([5 + 2 * np.cos(angles), 3 * np.sin(angles)], axis=1)
    ring = np.concatenate([ring, ring[:1]]).astype(np.float32)
    orders, valid = zip(equivalent_orders(line, False), equivalent_orders(ring, True), strict=True)
    slots = orders[0].shape[0]
    bev = torch.zeros(2, 1, 8, 4)
    bev[:, :, :, 1] = 1.0  # a one-pixel-wide line
    return {
        "gt_labels": [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long)],
        "gt_pts": [torch.from_numpy(np.stack([line, ring])), torch.zeros(0, P, 2)],
        "gt_orders": [torch.from_numpy(np.stack(orders)), torch.zeros(0, slots, P, 2)],
        "gt_orders_valid": [torch.from_numpy(np.stack(valid)), torch.zeros(0, slots, dtype=torch.bool)],
        "bev_seg": bev,
        "pv_seg": (torch.rand(2, 6, 1, 4, 6) > 0.7).float(),
    }


def layer(num_queries: int, gen: torch.Generator) -> dict:
    return {
        "pred_logits": torch.randn(2, num_queries, C, generator=gen).requires_grad_(),
        "pred_pts": torch.rand(2, num_queries, P, 2, generator=gen).requires_grad_(),
    }


def train_outputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = layer(Q, gen)
    out["aux_outputs"] = [layer(Q, gen), layer(Q, gen)]
    o2m = layer(Q_O2M, gen)
    o2m["aux_outputs"] = [layer(Q_O2M, gen), layer(Q_O2M, gen)]
    out["one2many"] = o2m
    out["bev_seg"] = torch.randn(2, 1, 4, 2, generator=gen).requires_grad_()
    out["pv_seg"] = torch.randn(2, 6, 1, 2, 3, generator=gen).requires_grad_()
    return out


def leaves(out: dict) -> list[torch.Tensor]:
    found = []
    for value in out.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found += leaves(value)
        elif isinstance(value, list):
            for item in value:
                found += leaves(item)
    return found


def test_loss_names_weights_and_gradients() -> None:
    cfg = tiny_config()
    criterion = build_criterion(cfg)
    outputs = train_outputs()
    losses = criterion(outputs, gt_batch())
    assert set(losses) == set(criterion.weight_dict)
    for name in ("loss_cls", "loss_pts_0", "loss_dir_1", "o2m_loss_cls", "o2m_loss_pts_1", "loss_bev_seg"):
        assert name in losses
    assert "loss_cls_2" not in losses  # 3 decoder layers: the last one plus aux _0, _1
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert criterion.weight_dict["o2m_loss_pts"] == cfg.criterion.pts_weight * cfg.criterion.one2many_weight
    assert criterion.weight_dict["loss_pv_seg"] == cfg.criterion.pv_seg_weight
    total = criterion.total_loss(losses)
    total.backward()
    for tensor in leaves(outputs):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_eval_mode_outputs_give_one2one_losses_only() -> None:
    outputs = train_outputs()
    for key in ("one2many", "bev_seg", "pv_seg"):
        del outputs[key]
    losses = build_criterion(tiny_config())(outputs, gt_batch())
    assert set(losses) == {f"{n}{s}" for n in ("loss_cls", "loss_pts", "loss_dir") for s in ("", "_0", "_1")}


def test_predictions_on_the_gt_give_zero_point_and_direction_loss() -> None:
    batch = gt_batch()
    outputs = train_outputs()
    with torch.no_grad():
        pts = outputs["pred_pts"]
        # Query 4 predicts the polyline REVERSED and query 1 the ring from another start vertex:
        # the matcher must pick those orders, so the losses vanish.
        pts[0, 4] = normalize_points(batch["gt_pts"][0][0].flip(0), [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0])
        pts[0, 1] = normalize_points(batch["gt_orders"][0][1, 2], [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0])
    losses = build_criterion(tiny_config())(outputs, batch)
    assert losses["loss_pts"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_dir"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_pts_0"].item() > 0.1  # the aux layers still have random predictions


def test_instance_losses_are_per_gt_instance() -> None:
    # The same sample twice: sums double, so does the GT count, the per-instance loss is unchanged.
    criterion = build_criterion(tiny_config())
    batch = gt_batch()
    outputs = train_outputs()
    single = {k: v[:1] for k, v in batch.items()}
    single_out = {"pred_logits": outputs["pred_logits"][:1], "pred_pts": outputs["pred_pts"][:1]}
    double = {
        k: list(v[:1]) * 2 if isinstance(v, list) else v[:1].repeat(2, *[1] * (v.dim() - 1)) for k, v in single.items()
    }
    double_out = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in single_out.items()}
    a = criterion(single_out, single)
    b = criterion(double_out, double)
    for name in ("loss_cls", "loss_pts", "loss_dir"):
        assert a[name].item() == pytest.approx(b[name].item(), rel=1e-5)
    # Two GT instances in the single sample: loss_pts = sum over 2 matched vectors / 2.
    assert a["loss_pts"].item() > 0


def test_all_empty_batch_is_finite() -> None:
    batch = gt_batch()
    for key in ("gt_labels", "gt_pts", "gt_orders", "gt_orders_valid"):
        batch[key] = [batch[key][1], batch[key][1]]
    losses = build_criterion(tiny_config())(train_outputs(), batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_pts"].item() == 0.0 and losses["loss_cls"].item() > 0  # all queries are background


def test_focal_loss_matches_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 3, generator=gen)
    targets = (torch.rand(4, 7, 3, generator=gen) > 0.8).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    ref = tv_sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
    torch.testing.assert_close(ours, ref)


def test_edge_direction_loss_values() -> None:
    target = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    assert edge_direction_loss(target * 3.0, target).item() == pytest.approx(0.0, abs=1e-6)  # same directions
    flipped = torch.tensor([[[0.0, 0.0], [-1.0, 0.0], [-1.0, 1.0]]])  # opposite, then perpendicular
    assert edge_direction_loss(flipped, target).item() == pytest.approx(2.0 + 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        edge_direction_loss(target, target[:, :2])


def test_seg_target_resize_keeps_thin_lines_and_bce_value() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, :, 5] = 1.0  # a one-pixel-wide column
    small = resize_seg_target(target, (4, 4))
    assert small.shape == (1, 1, 4, 4)
    assert small[0, 0, :, 2].eq(1).all() and small.sum() == 4
    logits = torch.zeros(1, 1, 4, 4)
    # At logit 0 every pixel costs log 2, positives times pos_weight: mean = log2 * (12 + 4 * 3) / 16.
    assert seg_bce_loss(logits, target, pos_weight=3.0).item() == pytest.approx(math.log(2) * 24 / 16)


def test_weight_dict_follows_the_config() -> None:
    cfg = tiny_config()
    cfg.bev_seg, cfg.pv_seg, cfg.k_one2many = False, False, 0
    weights = build_weight_dict(cfg)
    assert not any(k.startswith("o2m_") or "seg" in k for k in weights)
    assert len(weights) == 3 * cfg.decoder_layers
    criterion = build_criterion(tiny_config())
    with pytest.raises(KeyError, match="without a weight"):
        criterion.total_loss({"loss_unknown": torch.tensor(1.0)})


def weighted_criterion(weights: list[float]):
    cfg = tiny_config()
    cfg.criterion = dataclasses.replace(cfg.criterion, class_weights=weights)
    return build_criterion(cfg)


def test_class_weights_scale_each_classes_instances_and_nothing_else() -> None:
    batch = gt_batch()  # sample 0: a divider polyline (class 0) and a ped crossing ring (class 1)
    plain = weighted_criterion([1.0, 1.0, 1.0])(train_outputs(), batch)  # all ones: MapTR's losses
    ped = weighted_criterion([1.0, 3.0, 1.0])(train_outputs(), batch)
    divider = weighted_criterion([3.0, 1.0, 1.0])(train_outputs(), batch)
    cfg = tiny_config()
    assert cfg.criterion.class_weights == [1.0, 1.5, 1.0]  # params.yaml: ped crossings x1.5
    default = build_criterion(cfg)(train_outputs(), batch)
    for name in ("loss_pts", "loss_dir", "loss_pts_0", "o2m_loss_pts"):
        ring_part = (ped[name] - plain[name]).item() / 2  # weight 3 adds two more copies of the ring's term
        line_part = (divider[name] - plain[name]).item() / 2
        assert ring_part > 0 and line_part > 0
        assert ring_part + line_part == pytest.approx(plain[name].item(), rel=1e-5)
        assert (default[name] - plain[name]).item() == pytest.approx(ring_part / 2, rel=1e-4)  # half a copy
    # Classification: only the matched queries' rows change; the background rows keep their loss.
    outputs_plain, outputs_ped = train_outputs(), train_outputs()
    weighted_criterion([1.0, 1.0, 1.0])(outputs_plain, batch)["loss_cls"].backward()
    weighted_criterion([1.0, 3.0, 1.0])(outputs_ped, batch)["loss_cls"].backward()
    changed = (outputs_plain["pred_logits"].grad != outputs_ped["pred_logits"].grad).any(dim=2)  # (B, Q)
    assert changed.sum().item() == 1  # the one query matched to the ring
    assert ped["loss_cls"].item() > plain["loss_cls"].item()


def test_class_weights_must_be_one_positive_number_per_class() -> None:
    with pytest.raises(ValueError, match="class_weights must be 3 positive numbers"):
        weighted_criterion([1.0, 2.0])
    with pytest.raises(ValueError, match="class_weights must be 3 positive numbers"):
        weighted_criterion([1.0, 0.0, 1.0])
