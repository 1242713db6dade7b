"""Geometry of the spatial cross-attention: BEV pillar points and their projection into the cameras.

Frames: pillar points are in MapTR's LiDAR frame in meters (x right, y forward, z up), inside
``pc_range = [x0, y0, z0, x1, y1, z1]``. ``lidar2img`` (4x4) maps homogeneous LiDAR points to
``(u*d, v*d, d, 1)`` with (u, v) in pixels of the network input image and d > 0 in front of the camera.
Projected points are returned normalized by the image size, (u / W, v / H), which is the [0, 1]
convention of the deformable attention (pixel centres at (j + 0.5) / W).

Everything here is static-shape tensor arithmetic (no data-dependent control flow, no boolean
indexing), so it traces and exports as is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bev_cell_centers(bev_h: int, bev_w: int) -> Tensor:
    """Normalized (x, y) centre of every BEV cell, row-major (cell i * bev_w + j).

    Returns:
        (bev_h * bev_w, 2): x = (j + 0.5) / bev_w along the columns, y = (i + 0.5) / bev_h along the rows.
    """
    ys = (torch.arange(bev_h, dtype=torch.float32) + 0.5) / bev_h  # (H,)
    xs = (torch.arange(bev_w, dtype=torch.float32) + 0.5) / bev_w  # (W,)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([grid_x, grid_y], dim=-1).flatten(0, 1)  # (H*W, 2)


def pillar_points(bev_h: int, bev_w: int, num_points_in_pillar: int, pc_range: list[float]) -> Tensor:
    """3D anchors of every BEV cell: ``num_points_in_pillar`` heights evenly spread over [z0, z1].

    Returns:
        (A, bev_h * bev_w, 3) LiDAR-frame points in meters, A = num_points_in_pillar; anchor k is at
        z = z0 + (k + 0.5) / A * (z1 - z0), the cell centre in x and y.
    """
    x0, y0, z0, x1, y1, z1 = pc_range
    centers = bev_cell_centers(bev_h, bev_w)  # (H*W, 2) normalized
    xy = torch.stack([x0 + centers[:, 0] * (x1 - x0), y0 + centers[:, 1] * (y1 - y0)], dim=-1)  # (H*W, 2)
    zs = z0 + (torch.arange(num_points_in_pillar, dtype=torch.float32) + 0.5) / num_points_in_pillar * (z1 - z0)
    xy = xy[None].expand(num_points_in_pillar, -1, -1)  # (A, H*W, 2)
    z = zs[:, None, None].expand(-1, bev_h * bev_w, 1)  # (A, H*W, 1)
    return torch.cat([xy, z], dim=-1)  # (A, H*W, 3)


def project_to_cameras(
    points: Tensor, lidar2img: Tensor, image_size: tuple[int, int], eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Project LiDAR points into every camera; normalized image coordinates and visibility.

    Args:
        points: (A, Lq, 3) LiDAR-frame points (A anchors of Lq BEV cells).
        lidar2img: (B, Ncam, 4, 4).
        image_size: (W, H) of the network input in pixels.
        eps: minimum depth in meters for a point to count as in front of the camera.
    Returns:
        reference_points: (B, Ncam, Lq, A, 2) normalized (u / W, v / H), clamped to [-1, 2]: points
            behind a camera or far outside the image land in the zero padding of the sampler instead
            of producing huge coordinates.
        visible: (B, Ncam, Lq) float in {0, 1}: 1 where at least one anchor of the cell projects in
            front of the camera and inside the image.
    """
    num_anchors, num_query, _ = points.shape
    batch, num_cams = lidar2img.shape[:2]
    width, height = image_size
    # Query-major columns (cell q's anchors adjacent): the results then reshape to (.., Lq, A) for free.
    columns = points.transpose(0, 1).reshape(num_query * num_anchors, 3).T  # (3, Lq*A)
    homogeneous = torch.cat([columns, torch.ones_like(columns[:1])], dim=0)  # (4, Lq*A)
    # The image size goes into the matrix rows, so the projection lands in normalized coordinates, and
    # each of (u*d/W, v*d/H, d) is a contiguous row: elementwise ops on whole rows, no broadcasting
    # over a trailing dimension of 2 (which ONNX Runtime runs ~10x slower than a flat elementwise op).
    scale = torch.tensor([1.0 / width, 1.0 / height, 1.0], dtype=points.dtype, device=points.device)
    matrix = lidar2img[:, :, :3] * scale[:, None]  # (B, Ncam, 3, 4)
    projected = matrix @ homogeneous  # (B, Ncam, 3, Lq*A)
    u_scaled, v_scaled, depth = projected.unbind(dim=2)  # (B, Ncam, Lq*A) each
    safe_depth = depth.clamp(min=eps)
    x = u_scaled / safe_depth  # (B, Ncam, Lq*A) u / W
    y = v_scaled / safe_depth  # (B, Ncam, Lq*A) v / H
    inside = (depth > eps) & (x > 0.0) & (x < 1.0) & (y > 0.0) & (y < 1.0)  # (B, Ncam, Lq*A)
    inside = inside.to(points.dtype).view(batch, num_cams, num_query, num_anchors)  # (B, Ncam, Lq, A)
    visible = inside.amax(dim=3)  # (B, Ncam, Lq)
    reference_points = torch.stack([x.clamp(-1.0, 2.0), y.clamp(-1.0, 2.0)], dim=-1)  # (B, Ncam, Lq*A, 2)
    reference_points = reference_points.view(batch, num_cams, num_query, num_anchors, 2)  # (B, Ncam, Lq, A, 2)
    return reference_points, visible
