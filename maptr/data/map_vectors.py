"""Vectorized map ground truth from a nuScenes map expansion, as hustvl/MapTR defines it.

The rules are those of MapTR's ``VectorizedLocalMap`` (maptrv2 branch,
``tools/maptrv2/custom_nusc_map_converter.py``; the main branch's dataset has the same rules for these
three classes), written anew here:

- **Frame.** The map patch is the perception range centered on the LiDAR and rotated by the YAW of
  ``lidar2global`` only; map geometry is clipped to it in global coordinates, then rotated by -yaw about
  the LiDAR's position and translated to it: x right, y forward, in meters. Pitch, roll and the LiDAR's
  height play no part. Deliberate consequence, kept as MapTR has it: the camera geometry
  (``lidar2img``, built in :mod:`maptr.data.packing`) is the full 3D transform, so on a tilted LiDAR the
  GT frame and the camera frame differ by the tilt times the LiDAR's height (~5 cm on nuScenes).
- ``divider``: every road_divider and lane_divider line clipped to the patch; each piece of a line cut
  into several pieces is its own instance (no merging).
- ``ped_crossing``: the VALID ped_crossing polygons (invalid ones are skipped) clipped to the patch and
  merged (union). Each exterior ring, made clockwise, and each hole, made counter-clockwise, is clipped
  by a box 0.2 m LARGER than the range, so a crossing cut by the range edge stays a closed ring.
- ``boundary``: the union of the valid road_segment polygons and of the valid lane polygons, each
  clipped to the patch; its rings (exteriors clockwise, holes counter-clockwise) clipped by a box 0.2 m
  SMALLER than the range, so boundaries end at +-14.8 / +-29.8 m and a ring running along the range edge
  leaves no sliver on it. Pieces of one ring are joined with ``linemerge``.

The devkit reads the map (``NuScenesMap``, ``extract_line``, ``extract_polygon``); the spatial query uses
one shapely STRtree per layer (its hits taken in record order) instead of testing every record of the
city for every sample. Centerlines are not among this pipeline's classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from shapely import affinity, ops
from shapely.geometry import LinearRing, LineString, MultiLineString, MultiPolygon, Polygon, box
from shapely.strtree import STRtree

from maptr.classes import CLASS_NAMES

DIVIDER_LAYERS = ("road_divider", "lane_divider")
BOUNDARY_LAYERS = ("road_segment", "lane")
CROSSING_MARGIN = 0.2  # meters the crossing rings' clip box extends PAST the range
BOUNDARY_MARGIN = 0.2  # meters the boundary rings' clip box stays INSIDE the range


@dataclass
class MapInstance:
    """One ground-truth map element: (K, 2) float64 polyline in meters (closed when first == last)."""

    points: np.ndarray
    label: int


class LayerIndex:
    """Shapely geometries of one kind of map record, in record order, with an STRtree for queries."""

    def __init__(self, geoms: list) -> None:
        self.geoms = [g for g in geoms if g is not None and not g.is_empty]
        self.tree = STRtree(self.geoms) if self.geoms else None

    def query(self, region: Polygon) -> list:
        """The geometries whose envelope meets ``region``, in record order (the tree's order is not)."""
        if self.tree is None:
            return []
        return [self.geoms[i] for i in sorted(self.tree.query(region))]


@dataclass(frozen=True)
class Patch:
    """The perception range around one LiDAR pose: its polygon in global coordinates and the
    global -> LiDAR-patch transform (MapTR's: rotation by -yaw about the LiDAR, then translation)."""

    polygon: Polygon  # the range in global coordinates
    x: float  # LiDAR position in the global frame
    y: float
    yaw_degrees: float  # yaw of lidar2global

    def to_local(self, geom):
        rotated = affinity.rotate(geom, -self.yaw_degrees, origin=(self.x, self.y), use_radians=False)
        return affinity.affine_transform(rotated, [1.0, 0.0, 0.0, 1.0, -self.x, -self.y])


def lidar_patch(lidar2global: np.ndarray, pc_range: list[float]) -> Patch:
    """The map patch of a LiDAR pose: range [x0, y0, _, x1, y1, _] around the LiDAR, rotated by its yaw.

    Args:
        lidar2global: (4, 4) LiDAR -> global transform; only its x, y translation and its yaw are used.
    """
    x, y = float(lidar2global[0, 3]), float(lidar2global[1, 3])
    # Yaw of the rotation: the heading of its x axis in the global x-y plane (the devkit's quaternion_yaw).
    yaw = math.atan2(lidar2global[1, 0], lidar2global[0, 0])
    yaw_degrees = yaw / math.pi * 180.0
    x0, y0, _, x1, y1, _ = pc_range
    polygon = affinity.rotate(box(x + x0, y + y0, x + x1, y + y1), yaw_degrees, origin=(x, y), use_radians=False)
    return Patch(polygon=polygon, x=x, y=y, yaw_degrees=yaw_degrees)


class MapGroundTruth:
    """Map ground truth extractor for one nuScenes location.

    Args:
        nusc_map: a ``nuscenes.map_expansion.map_api.NuScenesMap`` (or anything with its ``extract_line``,
            ``extract_polygon`` and layer record lists).
        pc_range: [x0, y0, z0, x1, y1, z1], the perception range in the LiDAR frame (meters).
    """

    def __init__(self, nusc_map, pc_range: list[float]) -> None:
        self.pc_range = pc_range
        self.dividers = {
            layer: LayerIndex([nusc_map.extract_line(rec["line_token"]) for rec in getattr(nusc_map, layer)])
            for layer in DIVIDER_LAYERS
        }
        self.crossings = LayerIndex(
            [_valid_or_none(nusc_map.extract_polygon(r["polygon_token"])) for r in nusc_map.ped_crossing]
        )
        self.surfaces = {
            layer: LayerIndex(
                [_valid_or_none(nusc_map.extract_polygon(rec["polygon_token"])) for rec in getattr(nusc_map, layer)]
            )
            for layer in BOUNDARY_LAYERS
        }

    def instances(self, lidar2global: np.ndarray) -> list[MapInstance]:
        """Map elements in the perception range of a LiDAR pose.

        Args:
            lidar2global: (4, 4) LiDAR -> global transform of the sample.
        Returns:
            instances ordered by class (dividers, crossings, boundaries), points (K, 2) float64 meters in
            the patch frame (see the module docstring).
        """
        patch = lidar_patch(lidar2global, self.pc_range)
        x0, y0, _, x1, y1, _ = self.pc_range
        out: list[MapInstance] = []
        for layer in DIVIDER_LAYERS:
            for line in self.dividers[layer].query(patch.polygon):
                clipped = line.intersection(patch.polygon)
                if not clipped.is_empty:
                    out += [MapInstance(p, 0) for p in _line_pieces(patch.to_local(clipped))]

        crossings = _clipped_polygons(self.crossings, patch)
        if crossings:
            grow = CROSSING_MARGIN
            rings = _oriented_rings(ops.unary_union(crossings))
            out += [
                MapInstance(p, 1) for r in rings for p in _clip_ring(r, box(x0 - grow, y0 - grow, x1 + grow, y1 + grow))
            ]

        roads = _clipped_polygons(self.surfaces["road_segment"], patch)
        lanes = _clipped_polygons(self.surfaces["lane"], patch)
        if roads or lanes:
            surface = ops.unary_union([ops.unary_union(roads), ops.unary_union(lanes)])
            shrink = BOUNDARY_MARGIN
            inner = box(x0 + shrink, y0 + shrink, x1 - shrink, y1 - shrink)
            out += [MapInstance(p, 2) for r in _oriented_rings(surface) for p in _clip_ring(r, inner)]
        return out


def _valid_or_none(poly: Polygon) -> Polygon | None:
    """MapTR skips a map polygon that shapely finds invalid (self-touching, folded) instead of repairing it."""
    if poly is None or poly.is_empty or not poly.is_valid:
        return None
    return poly


def _clipped_polygons(layer: LayerIndex, patch: Patch) -> list:
    """The layer's polygons clipped to the patch in global coordinates, then moved to the patch frame."""
    out = []
    for poly in layer.query(patch.polygon):
        clipped = poly.intersection(patch.polygon)
        if not clipped.is_empty:
            out.append(patch.to_local(clipped))
    return out


def _oriented_rings(geom) -> list[LinearRing]:
    """Rings of a (multi)polygon: exteriors clockwise, then holes counter-clockwise (MapTR's order:
    all exteriors first, then all holes)."""
    if isinstance(geom, Polygon):
        polys = [geom]
    elif isinstance(geom, MultiPolygon):
        polys = list(geom.geoms)
    else:  # a collection (polygons touching lines): only its polygons have rings
        polys = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon)]
    exteriors = [
        LinearRing(p.exterior.coords[::-1]) if p.exterior.is_ccw else p.exterior for p in polys if not p.is_empty
    ]
    holes = [LinearRing(h.coords) if h.is_ccw else LinearRing(h.coords[::-1]) for p in polys for h in p.interiors]
    return exteriors + holes


def _clip_ring(ring: LinearRing, clip_box: Polygon) -> list[np.ndarray]:
    """A ring clipped by a box; pieces that meet are joined (``linemerge``)."""
    clipped = ring.intersection(clip_box)
    if isinstance(clipped, MultiLineString):
        clipped = ops.linemerge(clipped)
    return _line_pieces(clipped)


def _line_pieces(geom) -> list[np.ndarray]:
    """The polylines of a clipping result as (K, 2) float64 arrays, one per LineString piece; points and
    empty pieces are dropped (a clip touching the box at one point yields a point)."""
    if isinstance(geom, LineString):
        parts = [geom]
    else:
        parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, LineString)]
    return [np.asarray(p.coords, dtype=np.float64)[:, :2] for p in parts if not p.is_empty]
