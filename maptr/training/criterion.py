"""MapTRv2's training objective: Hungarian-matched set losses per decoder layer, one2many, segmentation.

Loss names (all unweighted; ``weight_dict`` holds the weights; total = sum(weight_dict[k] * loss[k])):

- last decoder layer of the one2one group: ``loss_cls``, ``loss_pts``, ``loss_dir``;
- earlier decoder layers: the same names with ``_0``, ``_1``, ... (DETR's aux-loss convention);
- one2many group (MapTRv2's hybrid matching: its queries are matched against the GT repeated
  ``k_one2many`` times): the same names prefixed ``o2m_``, weights multiplied by ``one2many_weight``;
- dense auxiliary heads, once per batch (they come from the shared BEV / image features, not from a
  query group): ``loss_bev_seg``, ``loss_pv_seg``.

Instance losses are sums divided by the number of GT instances of their group (averaged over ranks
under torch.distributed, clamped >= 1, as DETR): see :mod:`maptr.training.losses` for each term.
``class_weights`` (one per class, params ``model.criterion.class_weights``) let a GT element count more
in the sums than its class's share of the data; the normalizer stays the plain count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from maptr.config import ModelConfig
from maptr.data.vectors import denormalize_points, normalize_points
from maptr.training.losses import edge_direction_loss, points_l1_loss, seg_bce_loss, sigmoid_focal_loss
from maptr.training.matcher import HungarianMatcher, MatchIndices, build_matcher

INSTANCE_LOSSES = ("loss_cls", "loss_pts", "loss_dir")


def _num_instances(count: int, device: torch.device) -> float:
    """GT count used to normalize instance losses: averaged across ranks, at least 1."""
    num = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(num.item(), 1.0)


class MapTRCriterion(nn.Module):
    """Computes the unweighted loss dict of a MapTR output dict against a collated batch."""

    def __init__(
        self,
        matcher: HungarianMatcher,
        num_classes: int,
        pc_range: list[float],
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        k_one2many: int = 0,
        bev_seg_pos_weight: float = 4.0,
        pv_seg_pos_weight: float = 1.0,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(pc_range) != 6:
            raise ValueError(f"pc_range must be [x0, y0, z0, x1, y1, z1], got {pc_range}")
        if k_one2many < 0:
            raise ValueError(f"k_one2many must be >= 0, got {k_one2many}")
        if class_weights is not None and (len(class_weights) != num_classes or min(class_weights) <= 0):
            raise ValueError(f"class_weights must be {num_classes} positive numbers, got {class_weights}")
        self.matcher = matcher
        self.num_classes = num_classes
        self.pc_range = list(pc_range)
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.k_one2many = k_one2many
        self.bev_seg_pos_weight = bev_seg_pos_weight
        self.pv_seg_pos_weight = pv_seg_pos_weight
        # All ones: MapTR's losses, computed without weights (bit-identical to an unweighted criterion).
        uniform = class_weights is None or all(w == 1.0 for w in class_weights)
        self.class_weights = None if uniform else torch.tensor(class_weights, dtype=torch.float32)

    # ----------------------------------------------------------------------------------------------
    def instance_losses(
        self,
        pred_logits: torch.Tensor,
        pred_pts: torch.Tensor,
        gt_labels: list[torch.Tensor],
        gt_orders: list[torch.Tensor],
        indices: list[MatchIndices],
        num_instances: float,
    ) -> dict[str, torch.Tensor]:
        """Classification, point and direction losses of one decoder layer given its matching.

        Args:
            pred_logits: (B, Q, C) raw logits.
            pred_pts: (B, Q, P, 2) normalized points.
            gt_labels: B tensors (N_b,).
            gt_orders: B tensors (N_b, S, P, 2) meters.
            indices: the matcher's B (query_idx, gt_idx, order_idx).
            num_instances: normalizer (GT count of this group).
        Returns:
            {"loss_cls", "loss_pts", "loss_dir"} scalars.
        """
        device = pred_logits.device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _, _ in indices]).to(device)  # (M,)
        matched_labels = torch.cat(
            [gt_labels[b].to(device)[g.to(device)] for b, (_, g, _) in enumerate(indices)]
        ).long()  # (M,)
        matched_gt = torch.cat(
            [gt_orders[b].to(device)[g.to(device), o.to(device)] for b, (_, g, o) in enumerate(indices)]
        ).to(pred_pts.dtype)  # (M, P, 2) meters, in the matched order

        # Unmatched queries keep an all-zero target: background for a sigmoid classifier.
        targets = torch.zeros_like(pred_logits)  # (B, Q, C)
        targets[batch_idx, query_idx, matched_labels] = 1.0
        instance_weights = cls_weights = None
        if self.class_weights is not None:
            # A matched query's whole class row, its points and its edges weigh as its GT's class.
            instance_weights = self.class_weights.to(device, pred_pts.dtype)[matched_labels]  # (M,)
            cls_weights = torch.ones(pred_logits.shape[:2], device=device, dtype=pred_logits.dtype)  # (B, Q)
            cls_weights[batch_idx, query_idx] = instance_weights.to(pred_logits.dtype)
            cls_weights = cls_weights[..., None]  # (B, Q, 1)
        loss_cls = sigmoid_focal_loss(pred_logits, targets, self.focal_alpha, self.focal_gamma, cls_weights)

        matched_pred = pred_pts[batch_idx, query_idx]  # (M, P, 2) normalized
        loss_pts = points_l1_loss(matched_pred, normalize_points(matched_gt, self.pc_range), instance_weights)
        loss_dir = edge_direction_loss(
            denormalize_points(matched_pred, self.pc_range), matched_gt, weights=instance_weights
        )
        return {
            "loss_cls": loss_cls / num_instances,
            "loss_pts": loss_pts / num_instances,
            "loss_dir": loss_dir / num_instances,
        }

    def group_losses(
        self,
        group: dict[str, Any],
        gt_labels: list[torch.Tensor],
        gt_orders: list[torch.Tensor],
        gt_orders_valid: list[torch.Tensor],
        prefix: str = "",
        num_repeats: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Match and compute the instance losses of the last layer and of every aux layer of a group.

        Args:
            group: {"pred_logits": (B, Q, C), "pred_pts": (B, Q, P, 2), "aux_outputs": optional list of
                the same for earlier layers}.
            gt_labels / gt_orders / gt_orders_valid: the batch's GT.
            prefix: prepended to every loss name ("o2m_" for the one2many group).
            num_repeats: the GT set counts this many times (one2many); normalizer included.
        """
        device = group["pred_logits"].device
        num_instances = _num_instances(num_repeats * sum(int(t.numel()) for t in gt_labels), device)
        layers = [(layer, f"_{i}") for i, layer in enumerate(group.get("aux_outputs") or [])]
        layers.append((group, ""))
        losses: dict[str, torch.Tensor] = {}
        for layer, suffix in layers:
            # Every layer is matched on its own predictions (DETR): early layers are not forced to
            # agree with the final assignment.
            logits, pts = layer["pred_logits"], layer["pred_pts"]
            indices = self.matcher(logits, pts, gt_labels, gt_orders, gt_orders_valid, num_repeats)
            layer_losses = self.instance_losses(logits, pts, gt_labels, gt_orders, indices, num_instances)
            losses.update({f"{prefix}{name}{suffix}": value for name, value in layer_losses.items()})
        return losses

    def seg_losses(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """BEV and perspective-view segmentation losses, for whichever seg outputs are present.

        outputs["bev_seg"]: (B, 1, h, w) logits vs batch["bev_seg"] (B, 1, H, W);
        outputs["pv_seg"]: (B, Ncam, 1, h, w) logits vs batch["pv_seg"] (B, Ncam, 1, H', W').
        """
        losses: dict[str, torch.Tensor] = {}
        if outputs.get("bev_seg") is not None:
            logits = outputs["bev_seg"]
            target = batch["bev_seg"].to(logits.device)
            losses["loss_bev_seg"] = seg_bce_loss(logits, target, self.bev_seg_pos_weight)
        if outputs.get("pv_seg") is not None:
            logits = outputs["pv_seg"]
            target = batch["pv_seg"].to(logits.device)
            losses["loss_pv_seg"] = seg_bce_loss(
                logits.flatten(0, 1),  # (B*Ncam, 1, h, w)
                target.flatten(0, 1),  # (B*Ncam, 1, H', W')
                self.pv_seg_pos_weight,
            )
        return losses

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """All unweighted losses for the outputs present (eval-mode outputs give only one2one losses).

        Args:
            outputs: the model's dict (pred_logits, pred_pts, aux_outputs, optionally one2many,
                bev_seg, pv_seg).
            batch: the collated batch (gt_labels, gt_orders, gt_orders_valid, bev_seg, pv_seg).
        Returns:
            {loss name: scalar tensor}.
        """
        gt_labels = batch["gt_labels"]
        gt_orders = batch["gt_orders"]
        gt_valid = batch["gt_orders_valid"]
        losses = self.group_losses(outputs, gt_labels, gt_orders, gt_valid)
        one2many = outputs.get("one2many")
        if one2many is not None and self.k_one2many > 0:
            # Each GT appears k times, so k one2many queries can claim it (MapTRv2 hybrid matching);
            # the matcher tiles the cost instead of copying the GT.
            losses.update(
                self.group_losses(one2many, gt_labels, gt_orders, gt_valid, prefix="o2m_", num_repeats=self.k_one2many)
            )
        losses.update(self.seg_losses(outputs, batch))
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum(weight_dict[k] * losses[k]); a loss without a weight is an error, not silently dropped."""
        missing = sorted(set(losses) - set(self.weight_dict))
        if missing:
            raise KeyError(f"losses without a weight in weight_dict: {missing}")
        return sum(self.weight_dict[k] * v for k, v in losses.items())  # type: ignore[return-value]


def build_weight_dict(cfg: ModelConfig) -> dict[str, float]:
    """Weights of every loss the criterion can return for a preset (aux layers, one2many, seg)."""
    crit = cfg.criterion
    base = {"loss_cls": crit.cls_weight, "loss_pts": crit.pts_weight, "loss_dir": crit.dir_weight}
    suffixes = [""] + [f"_{i}" for i in range(cfg.decoder_layers - 1)]
    weights = {f"{name}{s}": w for name, w in base.items() for s in suffixes}
    if cfg.k_one2many > 0:
        weights.update({f"o2m_{name}": w * crit.one2many_weight for name, w in list(weights.items())})
    if cfg.bev_seg:
        weights["loss_bev_seg"] = crit.bev_seg_weight
    if cfg.pv_seg:
        weights["loss_pv_seg"] = crit.pv_seg_weight
    return weights


def build_criterion(cfg: ModelConfig) -> MapTRCriterion:
    """The criterion of a model preset: matcher, focal shape, one2many repeat, seg pos weights."""
    crit = cfg.criterion
    return MapTRCriterion(
        matcher=build_matcher(cfg),
        num_classes=cfg.num_classes,
        pc_range=cfg.pc_range,
        weight_dict=build_weight_dict(cfg),
        focal_alpha=crit.focal_alpha,
        focal_gamma=crit.focal_gamma,
        k_one2many=cfg.k_one2many,
        bev_seg_pos_weight=crit.bev_seg_pos_weight,
        pv_seg_pos_weight=crit.pv_seg_pos_weight,
        class_weights=crit.class_weights,
    )
