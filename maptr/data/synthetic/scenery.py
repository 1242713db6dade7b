"""Vertical clutter beside the roads: buildings, trees, street-light poles and utility boxes.

Everything is an oriented box standing on (or floating above, for tree crowns) the ground, kept off the
paved road so the map ground truth stays fully valid. The renderer draws them with depth, so they occlude
the ground behind them, and the raster painter casts their shadows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

from maptr.data.synthetic.network import RoadNetwork


@dataclass(frozen=True)
class Boxes:
    """N oriented boxes in the global frame.

    Attributes:
        center: (N, 2) footprint centers, meters.
        z0: (N,) height of the bottom face (0 for things standing on the ground).
        size: (N, 3) length along ``yaw``, width across, height, meters.
        yaw: (N,) radians.
        color: (N, 3) RGB base colour (before light and haze), 0-255.
    """

    center: np.ndarray
    z0: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    color: np.ndarray

    def __len__(self) -> int:
        return int(self.center.shape[0])

    def corners(self) -> np.ndarray:
        """(N, 8, 3) corners: bottom face counter-clockwise from (-l/2, -w/2), then the top face."""
        sx = np.array([-0.5, 0.5, 0.5, -0.5])
        sy = np.array([-0.5, -0.5, 0.5, 0.5])
        lx = sx[None] * self.size[:, :1]  # (N, 4) along the box
        ly = sy[None] * self.size[:, 1:2]  # (N, 4) across
        cos, sin = np.cos(self.yaw)[:, None], np.sin(self.yaw)[:, None]
        x = self.center[:, :1] + cos * lx - sin * ly  # (N, 4)
        y = self.center[:, 1:2] + sin * lx + cos * ly
        bottom = np.stack([x, y, np.repeat(self.z0[:, None], 4, axis=1)], axis=2)  # (N, 4, 3)
        top = bottom.copy()
        top[:, :, 2] += self.size[:, 2:3]
        return np.concatenate([bottom, top], axis=1)

    def footprints(self) -> np.ndarray:
        """(N, 4, 2) ground footprints (bottom faces)."""
        return self.corners()[:, :4, :2]


BUILDING_COLORS = np.array(
    [[190, 180, 165], [160, 95, 80], [120, 130, 145], [205, 200, 190], [150, 150, 150], [175, 150, 120]],
    dtype=np.float64,
)


class _Collector:
    """Accumulates boxes and rejects those that overlap the paved road or an earlier building."""

    def __init__(self, keep_out: shapely.Geometry) -> None:
        self.keep_out = keep_out
        shapely.prepare(self.keep_out)
        self.rows: list[tuple[float, float, float, float, float, float, float, float, float, float]] = []
        self.solids: list[Polygon] = []

    def add(
        self, xy: np.ndarray, z0: float, size: tuple[float, float, float], yaw: float, color: np.ndarray, solid: bool
    ) -> bool:
        c, s = np.cos(yaw), np.sin(yaw)
        half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * np.array(size[:2]) / 2.0
        foot = Polygon(xy + half @ np.array([[c, s], [-s, c]]))
        if z0 < 2.0 and self.keep_out.intersects(foot):
            return False
        if solid and any(foot.intersects(other) for other in self.solids):
            return False
        if solid:
            self.solids.append(foot)
        self.rows.append((float(xy[0]), float(xy[1]), z0, *size, yaw, *map(float, color)))
        return True

    def boxes(self) -> Boxes:
        arr = np.array(self.rows, dtype=np.float64).reshape(-1, 10)
        return Boxes(center=arr[:, 0:2], z0=arr[:, 2], size=arr[:, 3:6], yaw=arr[:, 6], color=arr[:, 7:10])


def place_scenery(rng: np.random.Generator, net: RoadNetwork) -> Boxes:
    """Boxes along both sides of every road of the tile."""
    road = shapely.unary_union([Polygon(r.polygon) for r in net.road_segments]).buffer(0.3)
    collector = _Collector(road)
    density = float(rng.uniform(0.3, 1.0))  # built-up (1) .. open country (0.3)
    height_scale = float(rng.choice([8.0, 15.0, 30.0], p=[0.4, 0.4, 0.2]))
    for line, profile in net.roads:
        for side in (1.0, -1.0):
            curb = profile.half_left if side > 0 else profile.half_right
            edge = curb + profile.sidewalk_width
            builds = rng.random() < density
            s = float(rng.uniform(0.0, 10.0))
            while s < line.length - 5.0:
                pose = line.pose(np.array([s]))[0]
                normal = np.array([-np.sin(pose[2]), np.cos(pose[2])]) * side
                if builds and rng.random() < 0.85:
                    front = float(rng.uniform(8.0, 30.0))
                    depth = float(rng.uniform(8.0, 20.0))
                    back = edge + float(rng.uniform(1.0, 8.0)) + depth / 2
                    height = float(np.clip(rng.normal(height_scale, height_scale * 0.4), 3.5, 60.0))
                    color = BUILDING_COLORS[int(rng.integers(len(BUILDING_COLORS)))] * rng.uniform(0.85, 1.1)
                    mid = line.pose(np.array([s + front / 2]))[0]
                    n_mid = np.array([-np.sin(mid[2]), np.cos(mid[2])]) * side
                    collector.add(mid[:2] + back * n_mid, 0.0, (front, depth, height), mid[2], color, solid=True)
                    s += front + float(rng.uniform(1.0, 10.0))
                else:
                    # Open verge: a tree (trunk + crown) a few meters beyond the sidewalk.
                    if rng.random() < 0.6:
                        at = pose[:2] + (edge + float(rng.uniform(0.8, 4.0))) * normal
                        trunk_h = float(rng.uniform(1.8, 3.2))
                        crown = float(rng.uniform(2.5, 5.0))
                        if collector.add(at, 0.0, (0.35, 0.35, trunk_h), pose[2], np.array([95, 75, 55]), True):
                            green = np.array([60, 105, 50]) * rng.uniform(0.8, 1.2)
                            collector.add(at, trunk_h - 0.3, (crown, crown, crown * 0.9), pose[2], green, False)
                    s += float(rng.uniform(6.0, 18.0))
            # Street lights near the curb and a few utility boxes, on the sidewalk.
            spacing = float(rng.uniform(20.0, 40.0))
            for s_pole in np.arange(float(rng.uniform(0.0, spacing)), line.length, spacing):
                pose = line.pose(np.array([s_pole]))[0]
                normal = np.array([-np.sin(pose[2]), np.cos(pose[2])]) * side
                height = float(rng.uniform(5.0, 9.0))
                collector.add(
                    pose[:2] + (curb + 0.5) * normal,
                    0.0,
                    (0.22, 0.22, height),
                    pose[2],
                    np.array([110, 110, 115]),
                    solid=False,
                )
                if rng.random() < 0.15 and profile.sidewalk_width > 1.8:
                    at = pose[:2] + (curb + profile.sidewalk_width - 0.6) * normal + rng.uniform(-3, 3, 2)
                    collector.add(at, 0.0, (0.9, 0.6, 1.3), pose[2], np.array([80, 110, 90]), solid=False)
    return collector.boxes()
