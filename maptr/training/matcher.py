"""Hungarian matching of vector queries to map elements, with permutation-equivalent point orders.

A ground-truth element has several point orders that describe it equally well (a polyline read either
way, a polygon ring from any start vertex in either direction, see
:func:`maptr.data.vectors.equivalent_orders`). The cost of a (query, GT) pair is therefore the cost
against the GT's BEST order, and the matcher reports which order that was so that the loss supervises
the prediction with exactly that order (MapTR's MapTRAssigner).

Point cost (one definition for matcher and loss): the L1 distance between the flattened (P * 2)
vectors of prediction and GT order in normalized [0, 1] coordinates, i.e. sum over points and
coordinates of |d| (MapTR's OrderedPtsL1Cost; ``match_pts_cost`` and ``pts_weight`` in params.yaml are
MapTR's weights, tuned for this sum). :func:`maptr.training.losses.points_l1_loss` sums the same |d|.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from maptr.config import ModelConfig
from maptr.data.vectors import normalize_points

# Replaces the cost of invalid order slots before the min over orders, and anything non-finite after:
# scipy's linear_sum_assignment rejects NaN and -inf, and a huge finite cost is never preferred.
_INVALID_COST = 1e8

MatchIndices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of Q predictions to N ground truths per sample (DETR's HungarianMatcher).

    cost(q, n) = cls_weight * focal_cost(q, label_n) + pts_weight * min_s L1(pts_q, order_{n,s})
    """

    def __init__(
        self,
        pc_range: list[float],
        cls_weight: float = 2.0,
        pts_weight: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if len(pc_range) != 6:
            raise ValueError(f"pc_range must be [x0, y0, z0, x1, y1, z1], got {pc_range}")
        if cls_weight < 0 or pts_weight < 0 or cls_weight == pts_weight == 0:
            raise ValueError(f"costs must be >= 0 and not both 0, got cls={cls_weight} pts={pts_weight}")
        self.pc_range = list(pc_range)
        self.cls_weight = cls_weight
        self.pts_weight = pts_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def classification_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Focal cost of predicting each GT's class (Deformable-DETR): positive minus negative focal term.

        Args:
            logits: (Q, C) raw logits of one sample.
            labels: (N,) GT classes.
        Returns:
            (Q, N) cost.
        """
        prob = logits.sigmoid()  # (Q, C)
        eps = 1e-8  # keeps log finite at saturated probabilities
        neg = (1 - self.focal_alpha) * prob.pow(self.focal_gamma) * -(1 - prob + eps).log()
        pos = self.focal_alpha * (1 - prob).pow(self.focal_gamma) * -(prob + eps).log()
        return pos[:, labels] - neg[:, labels]  # (Q, N)

    def points_cost(
        self, pred_pts: torch.Tensor, gt_orders: torch.Tensor, gt_orders_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 cost against every equivalent order of every GT, minimized over orders.

        Args:
            pred_pts: (Q, P, 2) normalized predicted points.
            gt_orders: (N, S, P, 2) GT orders in METERS; invalid slots hold padding.
            gt_orders_valid: (N, S) bool.
        Returns:
            cost: (Q, N) min over valid orders of sum |pred - gt| (normalized units).
            best_order: (Q, N) long, the argmin order for each pair.
        """
        num_q, num_pts = pred_pts.shape[:2]
        num_gt, num_orders = gt_orders.shape[:2]
        valid = gt_orders_valid.reshape(num_gt * num_orders)  # (N*S,)
        gt_norm = normalize_points(gt_orders.to(pred_pts.dtype), self.pc_range)  # (N, S, P, 2)
        gt_flat = gt_norm.reshape(num_gt * num_orders, num_pts * 2)[valid]  # (V, 2P) valid orders only
        # One cdist over all (query, valid GT order) pairs: p=1 on the flattened 2P-vectors is exactly
        # the sum of |d| over points and coordinates. Skipping the padding slots matters: a polyline
        # fills 2 of its 2(P-1) slots.
        valid_cost = torch.cdist(pred_pts.reshape(num_q, num_pts * 2), gt_flat, p=1)  # (Q, V)
        cost = valid_cost.new_full((num_q, num_gt * num_orders), _INVALID_COST)  # (Q, N*S)
        cost[:, valid] = valid_cost
        return cost.view(num_q, num_gt, num_orders).min(dim=2)  # (Q, N), (Q, N)

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_pts: torch.Tensor,
        gt_labels: list[torch.Tensor],
        gt_orders: list[torch.Tensor],
        gt_orders_valid: list[torch.Tensor],
        num_repeats: int = 1,
    ) -> list[MatchIndices]:
        """Match each sample of the batch.

        Args:
            pred_logits: (B, Q, C) raw class logits.
            pred_pts: (B, Q, P, 2) normalized predicted points.
            gt_labels: B tensors (N_b,) long.
            gt_orders: B tensors (N_b, S, P, 2) meters.
            gt_orders_valid: B tensors (N_b, S) bool.
            num_repeats: match against the GT set repeated this many times (MapTRv2's one2many group),
                without materializing the copies: the (Q, N) cost is computed once and tiled.
        Returns:
            B tuples (query_idx, gt_idx, order_idx), each (min(Q, num_repeats * N_b),) long on the CPU;
            query_idx is sorted ascending (scipy's convention), gt_idx[i] in [0, N_b) is the element
            matched to query_idx[i] (its copy number is dropped) and order_idx[i] its order.
        """
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        batch = pred_logits.shape[0]
        if not (len(gt_labels) == len(gt_orders) == len(gt_orders_valid) == batch):
            raise ValueError(
                f"batch of {batch} predictions but {len(gt_labels)} labels / {len(gt_orders)} orders / "
                f"{len(gt_orders_valid)} validity masks"
            )
        logits = pred_logits.detach().float()
        pts = pred_pts.detach().float()
        indices: list[MatchIndices] = []
        for b in range(batch):
            num_gt = gt_labels[b].numel()
            if num_gt == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty.clone(), empty.clone()))
                continue
            labels = gt_labels[b].to(logits.device).long()
            orders = gt_orders[b].to(pts.device)
            valid = gt_orders_valid[b].to(pts.device).bool()
            pts_cost, best_order = self.points_cost(pts[b], orders, valid)  # (Q, N), (Q, N)
            cost = self.pts_weight * pts_cost
            if self.cls_weight:
                cost = cost + self.cls_weight * self.classification_cost(logits[b], labels)  # (Q, N)
            cost = torch.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)
            cost = cost.repeat(1, num_repeats)  # (Q, k*N): copy r of element n is column r*N + n
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            query_idx = torch.as_tensor(rows, dtype=torch.long)
            gt_idx = torch.as_tensor(cols, dtype=torch.long) % num_gt
            order_idx = best_order.cpu()[query_idx, gt_idx]
            indices.append((query_idx, gt_idx, order_idx))
        return indices


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    """The matcher of a model preset: costs from ``cfg.criterion``, focal shape shared with the loss."""
    crit = cfg.criterion
    return HungarianMatcher(
        pc_range=cfg.pc_range,
        cls_weight=crit.match_cls_cost,
        pts_weight=crit.match_pts_cost,
        focal_alpha=crit.focal_alpha,
        focal_gamma=crit.focal_gamma,
    )
