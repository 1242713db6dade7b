"""Map-element polylines as fixed-size point sets: resampling, equivalent orders, normalization.

Conventions used across the project:
- Points are in the LiDAR frame of MapTR, in meters: x to the right, y forward.
- ``pc_range = [x0, y0, z0, x1, y1, z1]``; normalized coordinates map [x0, x1] x [y0, y1] to [0, 1]^2.
- A polyline is *closed* (a polygon ring) when its first and last points coincide.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PADDING_VALUE = -10000.0  # fills unused equivalent-order slots, as in MapTR


def resample_polyline(points: np.ndarray, num: int) -> np.ndarray:
    """Points evenly spaced along a polyline's length.

    Args:
        points: (K, 2) polyline vertices, K >= 2.
        num: number of output points; the first and last vertices are kept exactly.
    Returns:
        (num, 2) float32 array.
    """
    points = np.asarray(points, dtype=np.float64)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)  # (K-1,)
    cum = np.concatenate([[0.0], np.cumsum(seg)])  # (K,)
    if cum[-1] <= 0:
        return np.repeat(points[:1], num, axis=0).astype(np.float32)
    t = np.linspace(0.0, cum[-1], num)
    x = np.interp(t, cum, points[:, 0])
    y = np.interp(t, cum, points[:, 1])
    return np.stack([x, y], axis=1).astype(np.float32)


def is_closed(points: np.ndarray, tol: float = 1e-3) -> bool:
    """True when the polyline is a ring (first point equals last point within ``tol`` meters)."""
    return bool(np.linalg.norm(np.asarray(points[0]) - np.asarray(points[-1])) <= tol)


def num_equivalent_orders(num_pts: int) -> int:
    """Slots per instance for equivalent orders: a ring of ``num_pts`` points (first == last) has
    ``num_pts - 1`` cyclic shifts, each in two directions."""
    return 2 * (num_pts - 1)


def equivalent_orders(points: np.ndarray, closed: bool) -> tuple[np.ndarray, np.ndarray]:
    """All point orders that describe the same map element (MapTR's permutation-equivalent set).

    A polyline has two (forward, reversed). A closed ring of P points (first == last) has P-1 start
    points times two directions; every variant is closed again (its first point repeated at the end).

    Args:
        points: (P, 2) resampled points.
        closed: whether the element is a ring.
    Returns:
        orders: (S, P, 2) float32 with S = 2 * (P - 1); unused slots hold PADDING_VALUE.
        valid: (S,) bool, True for the slots that hold an order.
    """
    points = np.asarray(points, dtype=np.float32)
    num_pts = points.shape[0]
    slots = num_equivalent_orders(num_pts)
    orders = np.full((slots, num_pts, 2), PADDING_VALUE, dtype=np.float32)
    valid = np.zeros(slots, dtype=bool)
    if not closed:
        orders[0] = points
        orders[1] = points[::-1]
        valid[:2] = True
        return orders, valid
    ring = points[:-1]  # (P-1, 2) unique vertices
    n = ring.shape[0]
    idx = (np.arange(n)[:, None] + np.arange(n)[None, :]) % n  # (P-1 shifts, P-1)
    fwd = ring[idx]  # (P-1, P-1, 2)
    rev = ring[::-1][idx]  # (P-1, P-1, 2)
    both = np.concatenate([fwd, rev], axis=0)  # (2(P-1), P-1, 2)
    orders[:] = np.concatenate([both, both[:, :1]], axis=1)  # close each ring: (S, P, 2)
    valid[:] = True
    return orders, valid


def normalize_points(points: torch.Tensor, pc_range: Sequence[float]) -> torch.Tensor:
    """Meters in the LiDAR frame -> [0, 1] over the perception range. Shape is preserved (..., 2)."""
    lo = points.new_tensor([pc_range[0], pc_range[1]])
    span = points.new_tensor([pc_range[3] - pc_range[0], pc_range[4] - pc_range[1]])
    return (points - lo) / span


def denormalize_points(points: torch.Tensor, pc_range: Sequence[float]) -> torch.Tensor:
    """[0, 1] over the perception range -> meters in the LiDAR frame. Shape is preserved (..., 2)."""
    lo = points.new_tensor([pc_range[0], pc_range[1]])
    span = points.new_tensor([pc_range[3] - pc_range[0], pc_range[4] - pc_range[1]])
    return points * span + lo
