"""Multi-scale deformable attention (Deformable-DETR) in pure PyTorch, built on ``F.grid_sample``.

This is the only deformable attention of the project: the BEV self-attention, the spatial
cross-attention into the cameras and the map decoder's cross-attention all use it, and so do training,
calibration, QAT and the ONNX export (GridSample is a standard ONNX op from opset 16). There is no CUDA
kernel and no second "deploy" version that could drift from it.

Coordinate frames and value ranges:
- Normalized sampling coordinates ``(x, y)`` lie in [0, 1]^2 over a feature map of size (H, W): ``x``
  runs along the width (columns), ``y`` along the height (rows). The centre of pixel (row i, col j) is
  ``((j + 0.5) / W, (i + 0.5) / H)``, which is ``F.grid_sample``'s ``align_corners=False`` convention.
- Sampling outside the map reads zeros (``padding_mode="zeros"``), with bilinear interpolation
  between the border pixels and the zero padding.
- Predicted sampling offsets are in pixels of the level they sample (divided by (W, H) of that level),
  so one offset unit means "one feature-map cell" on every level.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maptr.models.tensor_ops import Add, Mul


def deformable_sample(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    multiply: Callable[[Tensor, Tensor], Tensor] = torch.mul,
) -> Tensor:
    """Attention-weighted sum of bilinear samples of a multi-level value map.

    Vectorized over heads, queries and points: one ``grid_sample`` per level samples every head,
    query and point at once, which keeps the exported graph small (one GridSample node per level).

    Args:
        value: (N, Lv, M, D) values of M heads with D channels each, levels flattened row-major and
            concatenated; ``Lv == sum(H_l * W_l)``.
        spatial_shapes: static list of (H_l, W_l), one per level.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y) in [0, 1] (outside reads zeros).
        attention_weights: (N, Lq, M, L, P), usually a softmax over (L, P) per head.
        multiply: the product of samples and weights; a module of the caller (:class:`Mul`) so that a
            quantizer can fake-quantize both factors, ``torch.mul`` otherwise.
    Returns:
        (N, Lq, M * D) sampled features, heads concatenated along channels.
    """
    n, num_value, num_heads, head_dims = value.shape
    _, num_query, _, num_levels, num_points, _ = sampling_locations.shape
    if num_value != sum(h * w for h, w in spatial_shapes):
        raise ValueError(f"value has {num_value} positions but spatial_shapes {spatial_shapes} need a sum")
    # grid_sample expects coordinates in [-1, 1]; [0, 1] -> [-1, 1] keeps the pixel-centre convention.
    grids = 2.0 * sampling_locations - 1.0  # (N, Lq, M, L, P, 2)
    sampled_levels = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = value[:, start : start + height * width]  # (N, H*W, M, D)
        start += height * width
        # Heads go into the batch so one grid_sample serves all of them.
        level_value = level_value.permute(0, 2, 3, 1).reshape(n * num_heads, head_dims, height, width)
        level_grid = grids[:, :, :, level].permute(0, 2, 1, 3, 4)  # (N, M, Lq, P, 2)
        level_grid = level_grid.reshape(n * num_heads, num_query, num_points, 2)  # (N*M, Lq, P, 2)
        sampled = F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, D, Lq, P)
        sampled_levels.append(sampled)
    sampled_all = torch.stack(sampled_levels, dim=3)  # (N*M, D, Lq, L, P)
    sampled_all = sampled_all.flatten(3)  # (N*M, D, Lq, L*P)
    weights = attention_weights.permute(0, 2, 1, 3, 4)  # (N, M, Lq, L, P)
    weights = weights.reshape(n * num_heads, 1, num_query, num_levels * num_points)  # (N*M, 1, Lq, L*P)
    output = multiply(sampled_all, weights).sum(-1)  # (N*M, D, Lq)
    output = output.view(n, num_heads * head_dims, num_query)  # (N, M*D, Lq)
    return output.transpose(1, 2).contiguous()  # (N, Lq, M*D)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention: each query attends to a few learned points around its reference points.

    The projections a quantizer will wrap (sampling offsets, attention weights, value and output) are
    plain ``nn.Linear`` modules, so fake-quant wrappers can be inserted around them later.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        if min(num_heads, num_levels, num_points) < 1:
            raise ValueError(f"num_heads, num_levels, num_points must be >= 1, got {num_heads, num_levels, num_points}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.location_add = Add()  # reference points + normalized sampling offsets
        self.weight_product = Mul()  # sampled values x attention weights
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed pattern independent of the query: head h looks in direction
        # 2*pi*h/M, its k-th point k+1 cells away, so the heads initially cover a ring of
        # neighbourhoods instead of all collapsing on the reference point.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (M, 2)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]  # on the unit square
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())  # (M*L*P*2,)
        # Zero attention logits: uniform weights over all points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_groups: int = 1,
    ) -> Tensor:
        """Attend from each query to points sampled around its reference points.

        Args:
            query: (B, Lq, C) queries (positional embedding already added by the caller).
            reference_points: normalized (x, y) in [0, 1], either (B*G, Lq, L, 2): one point per level,
                or (B*G, Lq, L, A, 2): A anchors per level (BEVFormer's pillar heights), with the
                P points split evenly over the anchors (P % A == 0).
            value: (B*G, Lv, C) flattened multi-level value maps, ``Lv == sum(H_l * W_l)``.
            spatial_shapes: static list of (H_l, W_l).
            value_groups: G value maps per query batch element (the cameras of the spatial
                cross-attention, index fastest within each batch element). Offsets and weights
                depend only on the query, so they are computed once and shared by the G groups.
        Returns:
            (B*G, Lq, C) attended features after the output projection.
        """
        batch, num_query, _ = query.shape
        num_value = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != levels:
            raise ValueError(f"expected {levels} spatial shapes, got {spatial_shapes}")
        value = self.value_proj(value)  # (B*G, Lv, C)
        value = value.view(batch * value_groups, num_value, heads, self.embed_dims // heads)  # (B*G, Lv, M, D)

        offsets = self.sampling_offsets(query).view(batch, 1, num_query, heads, levels, points, 2)
        # Offsets are in cells of their level: divide by (W, H) to get normalized units.
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        offsets = offsets / normalizer.view(1, 1, 1, 1, levels, 1, 2)
        weights = self.attention_weights(query).view(batch, 1, num_query, heads, levels * points)
        weights = weights.softmax(-1).view(batch, 1, num_query, heads, levels, points)
        # Share across the G value groups; expand is free, reshape materializes once.
        offsets = offsets.expand(-1, value_groups, -1, -1, -1, -1, -1)
        offsets = offsets.reshape(batch * value_groups, num_query, heads, levels, points, 2)
        weights = weights.expand(-1, value_groups, -1, -1, -1, -1)
        weights = weights.reshape(batch * value_groups, num_query, heads, levels, points)

        if reference_points.dim() == 4:
            ref = reference_points.view(batch * value_groups, num_query, 1, levels, 1, 2)
            locations = self.location_add(ref, offsets)  # (B*G, Lq, M, L, P, 2)
        elif reference_points.dim() == 5:
            anchors = reference_points.shape[3]
            if points % anchors:
                raise ValueError(f"num_points {points} must be a multiple of the {anchors} anchors")
            ref = reference_points.view(batch * value_groups, num_query, 1, levels, 1, anchors, 2)
            offsets = offsets.view(batch * value_groups, num_query, heads, levels, points // anchors, anchors, 2)
            locations = self.location_add(ref, offsets).flatten(4, 5)  # (B*G, Lq, M, L, P, 2)
        else:
            raise ValueError(f"reference_points must be 4-D or 5-D, got shape {tuple(reference_points.shape)}")
        output = deformable_sample(value, spatial_shapes, locations, weights, self.weight_product)  # (B*G, Lq, C)
        return self.output_proj(output)
