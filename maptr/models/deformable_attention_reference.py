"""A slow, obviously-correct deformable attention: one loop iteration per (batch, query, head, level, point).

Used only to check :func:`maptr.models.deformable_attention.deformable_sample` (tests) and to show what
the vectorized version saves (benchmarks). Bilinear sampling is written out by hand with the same
conventions as ``F.grid_sample(align_corners=False, padding_mode="zeros")``: normalized ``x`` in [0, 1]
maps to the continuous pixel coordinate ``x * W - 0.5`` (pixel centres at integers), and each of the
four neighbours outside the map contributes zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bilinear_sample_zero_padded(feature: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Sample one point of a (D, H, W) map at normalized (x, y); neighbours outside the map are zero.

    Args:
        feature: (D, H, W) map.
        x, y: 0-d tensors, normalized coordinates (x along W, y along H).
    Returns:
        (D,) interpolated features (differentiable w.r.t. feature, x and y).
    """
    _, height, width = feature.shape
    px = x * width - 0.5  # continuous column index
    py = y * height - 0.5  # continuous row index
    col0 = math.floor(float(px.detach()))
    row0 = math.floor(float(py.detach()))
    frac_x = px - col0
    frac_y = py - row0
    result = torch.zeros(feature.shape[0], dtype=feature.dtype)
    for row, weight_y in ((row0, 1 - frac_y), (row0 + 1, frac_y)):
        for col, weight_x in ((col0, 1 - frac_x), (col0 + 1, frac_x)):
            if 0 <= row < height and 0 <= col < width:
                result = result + weight_y * weight_x * feature[:, row, col]
    return result


def deformable_sample_reference(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Loop version of ``deformable_sample``; same arguments and result.

    Args:
        value: (N, Lv, M, D); sampling_locations: (N, Lq, M, L, P, 2); attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D).
    """
    n, _, num_heads, head_dims = value.shape
    _, num_query, _, _, num_points, _ = sampling_locations.shape
    starts = [0]
    for height, width in spatial_shapes:
        starts.append(starts[-1] + height * width)
    rows = []
    for b in range(n):
        query_rows = []
        for q in range(num_query):
            head_outputs = []
            for m in range(num_heads):
                acc = torch.zeros(head_dims, dtype=value.dtype)
                for level, (height, width) in enumerate(spatial_shapes):
                    level_map = value[b, starts[level] : starts[level + 1], m]  # (H*W, D)
                    level_map = level_map.t().reshape(head_dims, height, width)  # (D, H, W)
                    for p in range(num_points):
                        x, y = sampling_locations[b, q, m, level, p]
                        sample = bilinear_sample_zero_padded(level_map, x, y)
                        acc = acc + attention_weights[b, q, m, level, p] * sample
                head_outputs.append(acc)
            query_rows.append(torch.cat(head_outputs))  # (M*D,)
        rows.append(torch.stack(query_rows))  # (Lq, M*D)
    return torch.stack(rows)  # (N, Lq, M*D)
