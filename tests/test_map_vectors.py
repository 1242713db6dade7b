"""Map ground truth against hustvl/MapTR's rules, on hand-made map layers (no nuScenes files needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import LineString, Polygon, box

from maptr.data.map_vectors import MapGroundTruth, lidar_patch

PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]


class FakeMap:
    """The part of ``NuScenesMap`` the extractor reads: layer records and geometry by token."""

    def __init__(self, **layers: list) -> None:
        self.geoms: dict[str, object] = {}
        for name in ("road_divider", "lane_divider", "ped_crossing", "road_segment", "lane"):
            records = []
            for i, geom in enumerate(layers.get(name, [])):
                token = f"{name}-{i}"
                self.geoms[token] = geom
                records.append({"line_token": token} if name.endswith("divider") else {"polygon_token": token})
            setattr(self, name, records)

    def extract_line(self, token: str) -> LineString:
        return self.geoms[token]

    def extract_polygon(self, token: str) -> Polygon:
        return self.geoms[token]


def pose(x: float = 0.0, y: float = 0.0, z: float = 0.0, yaw_deg: float = 0.0, pitch_deg: float = 0.0) -> np.ndarray:
    """(4, 4) lidar2global: yaw about z, then pitch about the LiDAR's x axis (a tilted mount)."""
    cy, sy = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    cp, sp = math.cos(math.radians(pitch_deg)), math.sin(math.radians(pitch_deg))
    yaw = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    mat = np.eye(4)
    mat[:3, :3] = yaw @ pitch
    mat[:3, 3] = [x, y, z]
    return mat


def by_label(instances, label: int) -> list[np.ndarray]:
    return [inst.points for inst in instances if inst.label == label]


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring: > 0 counter-clockwise, < 0 clockwise."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def test_crossing_cut_by_the_range_edge_stays_a_closed_ring() -> None:
    gt = MapGroundTruth(FakeMap(ped_crossing=[box(10, 5, 18, 9)]), PC_RANGE)
    (ring,) = by_label(gt.instances(pose()), 1)
    np.testing.assert_allclose(ring[0], ring[-1])  # closed
    assert ring[:, 0].max() == pytest.approx(15.0)  # the side on the range edge is part of it
    assert abs(signed_area(ring)) == pytest.approx(5 * 4)


def test_ring_orientation_exteriors_clockwise_holes_counter_clockwise() -> None:
    crossing = box(-4, 0, 4, 6)
    road = Polygon(box(-10, -20, 10, 20).exterior.coords, [box(-2, -10, 2, -5).exterior.coords])
    gt = MapGroundTruth(FakeMap(ped_crossing=[crossing], road_segment=[road]), PC_RANGE)
    instances = gt.instances(pose())
    (crossing_ring,) = by_label(instances, 1)
    assert signed_area(crossing_ring) < 0
    exterior, hole = by_label(instances, 2)
    assert signed_area(exterior) < 0 and signed_area(hole) > 0
    assert abs(signed_area(hole)) == pytest.approx(4 * 5)


def test_boundaries_end_0_2_m_inside_the_range() -> None:
    gt = MapGroundTruth(FakeMap(road_segment=[box(-5, -50, 5, 50)]), PC_RANGE)
    sides = by_label(gt.instances(pose()), 2)
    assert len(sides) == 2
    for side in sides:
        assert sorted([side[0, 1], side[-1, 1]]) == pytest.approx([-29.8, 29.8])
        assert abs(side[0, 0]) == pytest.approx(5.0)


def test_road_and_lane_polygons_are_unioned_into_one_boundary() -> None:
    road, lane = box(-5, -10, 0, 10), box(0, -10, 5, 10)  # side by side: one 10 x 20 m surface
    gt = MapGroundTruth(FakeMap(road_segment=[road], lane=[lane]), PC_RANGE)
    (ring,) = by_label(gt.instances(pose()), 2)
    assert abs(signed_area(ring)) == pytest.approx(10 * 20)


def test_tilted_lidar_gives_the_same_ground_truth() -> None:
    def to_global(geom):  # the layers drawn in the LiDAR patch frame, placed at (100, -40), yaw 30 deg
        return affinity.translate(affinity.rotate(geom, 30, origin=(0, 0)), 100, -40)

    layers = FakeMap(
        lane_divider=[to_global(LineString([(-3, -25), (-2, 0), (-3, 25)]))],
        ped_crossing=[to_global(box(-6, 8, 6, 12))],
        road_segment=[to_global(box(-7, -40, 7, 40))],
    )
    gt = MapGroundTruth(layers, PC_RANGE)
    level = gt.instances(pose(x=100, y=-40, z=1.8, yaw_deg=30))
    tilted = gt.instances(pose(x=100, y=-40, z=1.8, yaw_deg=30, pitch_deg=1.0))
    assert [i.label for i in level] == [i.label for i in tilted] == [0, 1, 2, 2]
    for a, b in zip(level, tilted, strict=True):
        np.testing.assert_allclose(a.points, b.points, atol=1e-9)  # only the yaw counts
    np.testing.assert_allclose(level[0].points[[0, -1]], [[-3, -25], [-3, 25]], atol=1e-9)


def test_patch_frame_rotates_by_yaw_about_the_lidar() -> None:
    # LiDAR at (100, 50) facing global +y (yaw 90 deg): a global line 10 m ahead of it, running along
    # global x, lies across the patch at local y... and the local x axis points to global +y.
    lidar = pose(x=100, y=50, yaw_deg=90)
    gt = MapGroundTruth(FakeMap(road_divider=[LineString([(110, 40), (110, 60)])]), PC_RANGE)
    (line,) = by_label(gt.instances(lidar), 0)
    # Global (110, y) is 10 m along the LiDAR's -y axis (its x axis points to global +y).
    np.testing.assert_allclose(line[:, 1], [-10.0, -10.0], atol=1e-9)
    np.testing.assert_allclose(sorted(line[:, 0]), [-10.0, 10.0], atol=1e-9)
    patch = lidar_patch(lidar, PC_RANGE)
    assert patch.polygon.area == pytest.approx(30 * 60)


def test_divider_cut_into_pieces_gives_one_instance_per_piece() -> None:
    u_turn = LineString([(0, -10), (20, -10), (20, 10), (0, 10)])  # leaves the range and comes back
    gt = MapGroundTruth(FakeMap(road_divider=[u_turn]), PC_RANGE)
    pieces = by_label(gt.instances(pose()), 0)
    assert len(pieces) == 2
    assert all(p[:, 0].max() == pytest.approx(15.0) for p in pieces)


def test_invalid_polygon_is_skipped_as_maptr_does() -> None:
    bowtie = Polygon([(-4, 0), (4, 6), (4, 0), (-4, 6)])  # self-intersecting
    assert not bowtie.is_valid
    gt = MapGroundTruth(FakeMap(ped_crossing=[bowtie, box(-2, -10, 2, -6)]), PC_RANGE)
    (ring,) = by_label(gt.instances(pose()), 1)
    assert abs(signed_area(ring)) == pytest.approx(16)
