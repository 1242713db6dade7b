"""Segmentation targets of the auxiliary heads: map elements rasterized in BEV and in each camera.

MapTRv2's auxiliary supervision draws every ground-truth polyline (all classes in one channel) as a thin
line: once on the BEV grid and once in each camera image, projected through ``lidar2img`` onto the
ground plane.
"""

from __future__ import annotations

import cv2
import numpy as np

from maptr.data.vectors import resample_polyline

SUBPIXEL_BITS = 4  # cv2 fixed-point drawing: coordinates carry 4 fractional bits


def _draw(mask: np.ndarray, lines: list[np.ndarray], thickness: int) -> None:
    if lines:
        pts = [np.round(line * (1 << SUBPIXEL_BITS)).astype(np.int32) for line in lines]
        cv2.polylines(mask, pts, isClosed=False, color=1, thickness=thickness, shift=SUBPIXEL_BITS)


def bev_mask(
    vectors: list[np.ndarray], pc_range: list[float], bev_h: int, bev_w: int, thickness: int = 1
) -> np.ndarray:
    """Rasterize polylines (K_i, 2) meters in the LiDAR frame to a (bev_h, bev_w) uint8 {0, 1} mask.

    Row i covers y = y0 + (i + 0.5) / bev_h * (y1 - y0), column j covers x likewise (see vectors.py).
    """
    x0, y0, _, x1, y1, _ = pc_range
    mask = np.zeros((bev_h, bev_w), dtype=np.uint8)
    scale = np.array([bev_w / (x1 - x0), bev_h / (y1 - y0)])
    lines = [(np.asarray(v, dtype=np.float64) - [x0, y0]) * scale - 0.5 for v in vectors]  # (K, 2) col, row
    _draw(mask, lines, thickness)
    return mask


def ground_height(lidar2ego: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """z in the LiDAR frame of the ground (ego z = 0) below LiDAR points xy (K, 2) -> (K,)."""
    r, t = lidar2ego[:3, :3], lidar2ego[:3, 3]
    return -(r[2, 0] * xy[:, 0] + r[2, 1] * xy[:, 1] + t[2]) / r[2, 2]


def pv_masks(
    vectors: list[np.ndarray],
    lidar2img: np.ndarray,
    lidar2ego: np.ndarray,
    image_hw: tuple[int, int],
    stride: int,
    step: float = 0.5,
    thickness: int = 1,
) -> np.ndarray:
    """Project ground polylines into every camera and rasterize them at 1/``stride`` resolution.

    Args:
        vectors: polylines (K_i, 2) meters in the LiDAR frame, lying on the ground.
        lidar2img: (Ncam, 4, 4) projections of the network-input images.
        lidar2ego: (4, 4), defines where the ground (ego z = 0) is in the LiDAR frame.
        image_hw: network input (H, W).
        stride: mask downsampling factor.
        step: densification in meters, so that a line that leaves the view is cut near the image edge.
    Returns:
        (Ncam, H // stride, W // stride) uint8 {0, 1}.
    """
    h, w = image_hw[0] // stride, image_hw[1] // stride
    masks = np.zeros((lidar2img.shape[0], h, w), dtype=np.uint8)
    dense = []
    for v in vectors:
        v = np.asarray(v, dtype=np.float64)
        length = float(np.linalg.norm(np.diff(v, axis=0), axis=1).sum())
        dense.append(resample_polyline(v, max(2, int(np.ceil(length / step)) + 1)).astype(np.float64))
    if not dense:
        return masks
    sizes = [len(d) for d in dense]
    xy = np.concatenate(dense)  # (sum K, 2)
    pts = np.concatenate([xy, ground_height(lidar2ego, xy)[:, None], np.ones((len(xy), 1))], axis=1)  # (sum K, 4)
    proj = np.einsum("cij,nj->cni", lidar2img.astype(np.float64), pts)  # (Ncam, sum K, 4)
    depth = proj[..., 2]
    uv = proj[..., :2] / np.maximum(depth, 1e-6)[..., None] / stride - 0.5  # (Ncam, sum K, 2) mask pixels
    in_front = depth > 0.5  # drop points behind or right at the camera plane
    bounds = np.cumsum([0, *sizes])
    for cam in range(lidar2img.shape[0]):
        runs = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            vis = in_front[cam, a:b]
            # split the polyline into maximal runs of points in front of the camera
            edges = np.flatnonzero(np.diff(np.concatenate([[0], vis.astype(np.int8), [0]])))
            for s, e in zip(edges[::2], edges[1::2], strict=True):
                if e - s >= 2:
                    runs.append(np.clip(uv[cam, a + s : a + e], -1e5, 1e5))  # int32-safe for cv2
        _draw(masks[cam], runs, thickness)
    return masks
