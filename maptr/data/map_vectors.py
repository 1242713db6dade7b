"""Vectorized map ground truth from a nuScenes map expansion, in MapTR's LiDAR frame.

For each sample the map is cropped to the perception range around the LiDAR (``lidar2global =
ego2global @ lidar2ego``) and turned into polylines in meters, x right, y forward:

- ``divider``: road_divider and lane_divider lines, clipped to the range;
- ``ped_crossing``: ped_crossing polygons merged (union), their rings clipped to the range;
- ``boundary``: rings of the union of road_segment and lane polygons, clipped to the range.

The devkit reads the map (``NuScenesMap``, ``extract_line``, ``extract_polygon``); the spatial query uses
one shapely STRtree per layer instead of ``get_records_in_patch``, which tests every record of the city
in Python for every sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shapely import affinity, ops
from shapely.geometry import GeometryCollection, LinearRing, LineString, MultiLineString, Polygon, box
from shapely.strtree import STRtree

CLASS_NAMES = ("divider", "ped_crossing", "boundary")
DIVIDER_LAYERS = ("road_divider", "lane_divider")
BOUNDARY_LAYERS = ("road_segment", "lane")


@dataclass
class MapInstance:
    """One ground-truth map element: (K, 2) polyline in meters (closed when first == last) and its class."""

    points: np.ndarray
    label: int


class LayerIndex:
    """Shapely geometries of one kind of map record with an STRtree for patch queries."""

    def __init__(self, geoms: list) -> None:
        self.geoms = [g for g in geoms if g is not None and not g.is_empty]
        self.tree = STRtree(self.geoms) if self.geoms else None

    def query(self, region: Polygon) -> list:
        if self.tree is None:
            return []
        return [self.geoms[i] for i in self.tree.query(region, predicate="intersects")]


class MapGroundTruth:
    """Map ground truth extractor for one nuScenes location.

    Args:
        nusc_map: a ``nuscenes.map_expansion.map_api.NuScenesMap``.
        pc_range: [x0, y0, z0, x1, y1, z1], the perception range in the LiDAR frame (meters).
    """

    def __init__(self, nusc_map, pc_range: list[float]) -> None:
        self.pc_range = pc_range
        self.dividers = LayerIndex(
            [nusc_map.extract_line(rec["line_token"]) for layer in DIVIDER_LAYERS for rec in getattr(nusc_map, layer)]
        )
        self.crossings = LayerIndex(
            [_valid(nusc_map.extract_polygon(rec["polygon_token"])) for rec in nusc_map.ped_crossing]
        )
        self.surfaces = LayerIndex(
            [
                _valid(nusc_map.extract_polygon(rec["polygon_token"]))
                for layer in BOUNDARY_LAYERS
                for rec in getattr(nusc_map, layer)
            ]
        )

    def instances(self, lidar2global: np.ndarray) -> list[MapInstance]:
        """Map elements in the perception range of a LiDAR pose.

        Args:
            lidar2global: (4, 4) LiDAR -> global transform of the sample.
        Returns:
            instances ordered by class (dividers, crossings, boundaries), points (K, 2) float32 meters.
        """
        x0, y0, _, x1, y1, _ = self.pc_range
        local_box = box(x0, y0, x1, y1)
        # Global -> LiDAR as a 2D affine map [a, b, d, e, xoff, yoff] (shapely's order); z is dropped
        # because the map is planar.
        global2lidar = np.linalg.inv(lidar2global)
        rot, trans = global2lidar[:2, :2], global2lidar[:2, 3]
        to_lidar = [rot[0, 0], rot[0, 1], rot[1, 0], rot[1, 1], trans[0], trans[1]]
        lidar2global_2d = [
            lidar2global[0, 0], lidar2global[0, 1], lidar2global[1, 0], lidar2global[1, 1],
            lidar2global[0, 3], lidar2global[1, 3],
        ]  # fmt: skip
        region = affinity.affine_transform(local_box, lidar2global_2d)

        out: list[MapInstance] = []
        for line in self.dividers.query(region):
            clipped = affinity.affine_transform(line, to_lidar).intersection(local_box)
            out += [MapInstance(p, 0) for p in _line_parts(clipped)]

        # Rings are clipped by a box shrunk by a few cm so that a ring running along the range's edge does
        # not leave a sliver of boundary exactly on it.
        inner = box(x0 + 0.05, y0 + 0.05, x1 - 0.05, y1 - 0.05)
        for label, layer in ((1, self.crossings), (2, self.surfaces)):
            polys = [affinity.affine_transform(p, to_lidar) for p in layer.query(region)]
            if not polys:
                continue
            merged = ops.unary_union(polys)
            for ring in _rings(merged):
                out += [MapInstance(p, label) for p in _line_parts(ring.intersection(inner))]
        return out


def _valid(poly: Polygon) -> Polygon | None:
    """Repair a self-touching polygon with buffer(0) instead of dropping it silently."""
    if poly is None or poly.is_empty:
        return None
    return poly if poly.is_valid else poly.buffer(0)


def _rings(geom) -> list[LineString]:
    """Exterior and interior rings of a (multi)polygon, exteriors counter-clockwise, holes clockwise."""
    polys = [geom] if isinstance(geom, Polygon) else [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon)]
    rings: list[LineString] = []
    for poly in polys:
        ext = LinearRing(poly.exterior.coords)
        rings.append(LineString(ext.coords if ext.is_ccw else ext.coords[::-1]))
        for hole in poly.interiors:
            ring = LinearRing(hole.coords)
            rings.append(LineString(ring.coords[::-1] if ring.is_ccw else ring.coords))
    return rings


def _line_parts(geom) -> list[np.ndarray]:
    """The polylines of a clipping result as (K, 2) float32 arrays; a ring split by the clip box is
    re-joined where its two ends meet, so a ring cut once is one polyline, not two."""
    if geom.is_empty:
        return []
    if isinstance(geom, LineString):
        parts = [geom]
    elif isinstance(geom, (MultiLineString, GeometryCollection)):
        parts = [g for g in geom.geoms if isinstance(g, LineString)]
        merged = ops.linemerge(parts) if len(parts) > 1 else None
        if merged is not None and not merged.is_empty:
            parts = list(merged.geoms) if isinstance(merged, MultiLineString) else [merged]
    else:
        parts = []
    return [np.asarray(p.coords, dtype=np.float32)[:, :2] for p in parts if p.length > 1e-3]
