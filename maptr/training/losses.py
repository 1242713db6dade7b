"""The loss terms of MapTRv2, as plain functions of tensors (the criterion decides what they are fed).

Every instance-level loss returns a SUM over its elements; the criterion divides by the number of ground
truth instances (DETR's ``num_boxes`` normalization), so each term reads "loss per GT instance":

- :func:`sigmoid_focal_loss`: classification, summed over queries and classes.
- :func:`points_l1_loss`: L1 over the 2P coordinates of a vector in normalized [0, 1] coordinates, the
  same quantity the matcher's point cost uses (MapTR's OrderedPtsL1Cost / PtsL1Loss).
- :func:`edge_direction_loss`: 1 - cos between consecutive-point edges, in meters (MapTR's PtsDirCosLoss).

The segmentation terms are per-pixel means (MapTR's SimpleLoss): :func:`seg_bce_loss` after
:func:`resize_seg_target`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), summed over every element.

    Args:
        logits: (..., C) raw class logits.
        targets: (..., C) one-hot float targets; an all-zero row is background.
        alpha: weight of the positive term (1 - alpha for negatives); a negative value disables it.
        gamma: focusing exponent.
        weights: optional per-element weights broadcastable to (..., C) (the criterion's class weights).
    Returns:
        scalar tensor, the (weighted) sum over all elements.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = ce * (1.0 - p_t).pow(gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
        loss = alpha_t * loss
    if weights is not None:
        loss = loss * weights
    return loss.sum()


def points_l1_loss(
    pred_pts: torch.Tensor, target_pts: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """L1 distance between matched point sets, summed over instances, points and coordinates.

    Both inputs are in normalized [0, 1] coordinates; ``target_pts`` is the GT in the order the matcher
    chose, so this equals the matcher's point cost summed over the matched pairs.

    Args:
        pred_pts: (M, P, 2) predicted points of the M matched queries.
        target_pts: (M, P, 2) matched ground truth points.
        weights: optional (M,) weight of each instance.
    Returns:
        scalar tensor.
    """
    if pred_pts.shape != target_pts.shape:
        raise ValueError(f"points_l1_loss: shapes differ, {pred_pts.shape} vs {target_pts.shape}")
    if weights is None:
        return (pred_pts - target_pts).abs().sum()
    return ((pred_pts - target_pts).abs().flatten(1).sum(dim=1) * weights).sum()  # (M,) per instance


def edge_direction_loss(
    pred_pts: torch.Tensor, target_pts: torch.Tensor, eps: float = 1e-8, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - cosine similarity between the edges (p[k+1] - p[k]) of prediction and matched GT, summed.

    Give both in METERS: the normalization scales x and y differently (30 m vs 60 m spans) and would
    distort the angles. A zero-length GT edge contributes a constant 1 with zero gradient.

    Args:
        pred_pts: (M, P, 2) predicted points.
        target_pts: (M, P, 2) matched ground truth points in the matched order.
        weights: optional (M,) weight of each instance.
    Returns:
        scalar tensor, the (weighted) sum over the M * (P - 1) edges.
    """
    if pred_pts.shape != target_pts.shape:
        raise ValueError(f"edge_direction_loss: shapes differ, {pred_pts.shape} vs {target_pts.shape}")
    pred_edges = pred_pts[:, 1:] - pred_pts[:, :-1]  # (M, P-1, 2)
    target_edges = target_pts[:, 1:] - target_pts[:, :-1]  # (M, P-1, 2)
    cos = F.cosine_similarity(pred_edges, target_edges, dim=-1, eps=eps)  # (M, P-1)
    if weights is None:
        return (1.0 - cos).sum()
    return ((1.0 - cos).sum(dim=1) * weights).sum()  # (M,) per instance


def resize_seg_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A {0,1} mask brought to the prediction's (h, w).

    Adaptive max-pooling keeps a one-pixel-wide line alive when shrinking (bilinear or nearest would
    drop it); when growing, each output cell copies the input cell it falls in.

    Args:
        target: (N, 1, H, W) mask.
        size: (h, w) of the prediction.
    Returns:
        (N, 1, h, w) mask, the input itself when the sizes already agree.
    """
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.adaptive_max_pool2d(target, output_size=size)


def seg_bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Per-pixel binary cross entropy with logits, positives weighted by ``pos_weight`` (SimpleLoss).

    Args:
        logits: (N, 1, h, w) predicted logits.
        target: (N, 1, H, W) {0,1} mask; resized to (h, w) when it differs.
    Returns:
        scalar tensor, the mean over pixels.
    """
    target = resize_seg_target(target.to(logits.dtype), tuple(logits.shape[-2:]))
    weight = logits.new_tensor([pos_weight])
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
