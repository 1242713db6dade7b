"""What a generated world contains, measured in MapTR's frame, and the floors it must not fall below.

Counts follow MapTR's ground truth: the perception patch is 30 m (x, right) by 60 m (y, forward) around
the LiDAR (``lidar2global = ego2global @ lidar2ego``); dividers are road + lane divider pieces clipped to
the patch, ped crossings the crossing polygons that reach into it, boundaries the pieces of the road
union's outline (road segments and lanes) inside it. Shares count samples whose patch holds a curved
road piece, a junction or a ped crossing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, MultiLineString, Polygon, box

from maptr.data.synthetic.network import RoadNetwork
from maptr.data.synthetic.rig import SensorCalibration, pose_matrix, yaw_to_quaternion
from maptr.data.synthetic.road_network import road_union

PATCH_SIZE = (30.0, 60.0)  # meters along the LiDAR x (right) and y (forward) axes: pc_range of MapTR
MIN_SAMPLES_FOR_VARIETY_FLOORS = 100  # shares of a handful of samples say nothing

# Floors a world must keep. `*_min` apply to every sample, the others to world-wide means/shares.
FLOORS = {
    "boundary_min": 1,  # the ego is always on a road: a curb is always in range
    "divider_mean": 2.0,
    "boundary_mean": 1.8,
    "ped_crossing_share": 0.2,
    "junction_share": 0.2,
    "curve_share": 0.3,
    "brightness_spread": 40.0,  # grey levels between the darkest and brightest scene
}


class WorldBelowFloorError(RuntimeError):
    """A generated world lacks the variety the generator promises (see :data:`FLOORS`)."""


@dataclass
class SampleCounts:
    divider: int
    ped_crossing: int
    boundary: int
    curve: bool
    junction: bool


class TileGeometry:
    """Shapely views of one tile's elements, built once and queried per sample."""

    def __init__(self, net: RoadNetwork) -> None:
        self.dividers = [LineString(d.points) for d in net.dividers]
        self.crossings = shapely.unary_union([Polygon(c.polygon) for c in net.crossings])
        union = road_union(net)
        rings = []
        for poly in getattr(union, "geoms", [union]):
            rings.append(poly.exterior)
            rings.extend(poly.interiors)
        self.outline = MultiLineString([np.asarray(r.coords) for r in rings])
        self.arcs = MultiLineString(net.arc_lines) if net.arc_lines else None
        self.junctions = shapely.unary_union([Polygon(p) for p in net.junction_polygons])

    def count(self, patch: Polygon) -> SampleCounts:
        def pieces(geom: shapely.Geometry) -> int:
            if geom.is_empty:
                return 0
            return len(geom.geoms) if hasattr(geom, "geoms") else 1

        crossing_parts = self.crossings.intersection(patch)
        return SampleCounts(
            divider=sum(pieces(d.intersection(patch)) for d in self.dividers),
            ped_crossing=pieces(crossing_parts),
            boundary=pieces(shapely.line_merge(self.outline.intersection(patch))),
            curve=self.arcs is not None and self.arcs.intersects(patch),
            junction=self.junctions.intersects(patch),
        )


def lidar_patch(ego_xy: np.ndarray, ego_yaw: float, lidar: SensorCalibration) -> Polygon:
    """The MapTR perception patch of a key frame, in global coordinates."""
    ego2global = pose_matrix([float(ego_xy[0]), float(ego_xy[1]), 0.0], yaw_to_quaternion(ego_yaw))
    lidar2global = ego2global @ lidar.sensor_to_ego()
    center = lidar2global[:2, 3]
    angle = math.degrees(math.atan2(lidar2global[1, 0], lidar2global[0, 0]))  # yaw of the LiDAR x axis
    w, h = PATCH_SIZE
    patch = box(center[0] - w / 2, center[1] - h / 2, center[0] + w / 2, center[1] + h / 2)
    return affinity.rotate(patch, angle, origin=(center[0], center[1]), use_radians=False)


def summarize(values: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(arr.mean()), 3), "min": round(float(arr.min()), 3), "max": round(float(arr.max()), 3)}


def check_floors(stats: dict, num_samples: int) -> list[str]:
    """Names and values of the floors ``stats`` falls below (variety floors only for large worlds)."""
    inst, share = stats["instances_per_sample"], stats["share_of_samples"]
    failures = []
    if inst["boundary"]["min"] < FLOORS["boundary_min"]:
        failures.append(f"boundary_min {inst['boundary']['min']} < {FLOORS['boundary_min']}")
    if num_samples < MIN_SAMPLES_FOR_VARIETY_FLOORS:
        return failures
    checks = {
        "divider_mean": inst["divider"]["mean"],
        "boundary_mean": inst["boundary"]["mean"],
        "ped_crossing_share": share["ped_crossing"],
        "junction_share": share["junction"],
        "curve_share": share["curve"],
        "brightness_spread": stats["brightness"]["scene_spread"],
    }
    for name, value in checks.items():
        if value < FLOORS[name]:
            failures.append(f"{name} {value} < {FLOORS[name]}")
    return failures
