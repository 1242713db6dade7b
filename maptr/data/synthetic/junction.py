"""A T or X junction on a straight part of the main road: its polygon, cross-road arms and connectors.

Junction frame: origin at the main centerline point ``s``, ``u`` along the main road, ``v`` to its left.
The junction polygon spans ``|u| <= e`` with ``e = hc + r`` (cross-road half width plus curb radius) and
opens towards each arm between two quarter-circle curb fillets. Vertices shared with neighbouring
polygons (main-road blocks, arm blocks) are computed by the same centerline calls as theirs, so the road
union closes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from maptr.data.synthetic.blocks import BlockLanes, add_block, lane_edge_offsets, lane_runs_forward, link_lanes
from maptr.data.synthetic.centerline import Centerline
from maptr.data.synthetic.network import Lane, RoadNetwork, RoadProfile, RoadSegment

FILLET_STEP_DEG = 10.0
CROSSING_OFFSET = 0.8  # meters between the junction edge and a crossing next to it


@dataclass
class JunctionSpec:
    """A planned junction.

    Attributes:
        s: arc length of its center on the main road (on a straight piece).
        arms: subset of {"left", "right"}: both for an X junction, one for a T.
        cross: the cross road's profile (symmetric: same lanes both ways).
        corner_radius: curb fillet radius, meters (>= sidewalk width, so corner walkways fit).
        arm_length: side -> meters of cross road beyond the junction.
        arm_crossing: side -> whether a crossing spans that arm next to the junction.
        crossing_width: meters along the road of every crossing of this junction.
    """

    s: float
    arms: tuple[str, ...]
    cross: RoadProfile
    corner_radius: float
    arm_length: dict[str, float] = field(default_factory=dict)
    arm_crossing: dict[str, bool] = field(default_factory=dict)
    crossing_width: float = 4.0

    @property
    def extent(self) -> float:
        """Half length of the junction along the main road."""
        return self.cross.half_left + self.corner_radius

    @property
    def kind(self) -> str:
        return "X" if len(self.arms) == 2 else "T"


def arm_centerline(main: Centerline, main_profile: RoadProfile, spec: JunctionSpec, side: str) -> Centerline:
    """The straight centerline of one arm, from the junction edge outwards."""
    x, y, h = main.pose(np.array([spec.s]))[0]
    normal = np.array([-math.sin(h), math.cos(h)])
    if side == "left":
        dist, heading = main_profile.half_left + spec.corner_radius, h + math.pi / 2
    else:
        dist, heading = -(main_profile.half_right + spec.corner_radius), h - math.pi / 2
    start = np.array([x, y]) + dist * normal
    return Centerline.build((float(start[0]), float(start[1]), heading), [(spec.arm_length[side], 0.0)])


def _fillet(center_uv: tuple[float, float], radius: float, a0: float, a1: float) -> np.ndarray:
    """(N, 2) interior points of a circular arc in junction (u, v) coordinates, angles in degrees."""
    num = max(2, math.ceil(abs(a1 - a0) / FILLET_STEP_DEG))
    ang = np.radians(np.linspace(a0, a1, num + 1)[1:-1])
    return np.stack([center_uv[0] + radius * np.cos(ang), center_uv[1] + radius * np.sin(ang)], axis=1)


def _to_global(main: Centerline, s: float, uv: np.ndarray) -> np.ndarray:
    """Junction (u, v) -> global (N, 2)."""
    x, y, h = main.pose(np.array([s]))[0]
    t = np.array([math.cos(h), math.sin(h)])
    n = np.array([-math.sin(h), math.cos(h)])
    return np.array([x, y]) + uv[:, :1] * t + uv[:, 1:2] * n


def junction_polygon(main: Centerline, main_profile: RoadProfile, spec: JunctionSpec) -> np.ndarray:
    """Counter-clockwise ring (K, 2) of the junction's road surface."""
    e, r, hc = spec.extent, spec.corner_radius, spec.cross.half_left
    hl, hr, s = main_profile.half_left, main_profile.half_right, spec.s
    # Inner lane boundaries go on every shared edge, as the neighbouring blocks have them (see blocks.py).
    main_edges = np.array(lane_edge_offsets(main_profile))
    arm_edges = np.array((-hc,) + lane_edge_offsets(spec.cross) + (hc,))
    parts = [main.offset_points(np.array([s - e]), -hr)]
    if "right" in spec.arms:
        arm = arm_centerline(main, main_profile, spec, "right")
        parts.append(_to_global(main, s, _fillet((-e, -hr - r), r, 90.0, 0.0)))
        parts.append(arm.offset_points(np.zeros(arm_edges.size), arm_edges))
        parts.append(_to_global(main, s, _fillet((e, -hr - r), r, 180.0, 90.0)))
    parts.append(main.offset_points(np.array([s + e]), -hr))
    parts.append(main.offset_points(np.full(main_edges.size, s + e), main_edges))
    parts.append(main.offset_points(np.array([s + e]), hl))
    if "left" in spec.arms:
        arm = arm_centerline(main, main_profile, spec, "left")
        parts.append(_to_global(main, s, _fillet((e, hl + r), r, 270.0, 180.0)))
        parts.append(arm.offset_points(np.zeros(arm_edges.size), arm_edges))
        parts.append(_to_global(main, s, _fillet((-e, hl + r), r, 360.0, 270.0)))
    parts.append(main.offset_points(np.array([s - e]), hl))
    parts.append(main.offset_points(np.full(main_edges.size, s - e), main_edges[::-1]))
    return np.concatenate(parts, axis=0)


def _corner_walkway(
    main: Centerline, s: float, center_uv: tuple[float, float], r: float, ws: float, a0: float, a1: float
) -> np.ndarray:
    """Ring of the sidewalk wrapped around a curb fillet: the annulus sector r - ws .. r, angles a0 -> a1."""
    ang = np.radians(np.linspace(a0, a1, max(2, math.ceil(abs(a1 - a0) / FILLET_STEP_DEG)) + 1))
    outer = np.stack([center_uv[0] + r * np.cos(ang), center_uv[1] + r * np.sin(ang)], axis=1)
    inner = np.stack([center_uv[0] + (r - ws) * np.cos(ang), center_uv[1] + (r - ws) * np.sin(ang)], axis=1)
    ring = np.concatenate([outer, inner[::-1]], axis=0)
    if a1 < a0:  # walked clockwise around the fillet center: reverse to keep the ring counter-clockwise
        ring = ring[::-1]
    return _to_global(main, s, ring)


def add_junction(
    net: RoadNetwork,
    spec: JunctionSpec,
    before: BlockLanes,
    after: BlockLanes,
    dash_phase: float,
) -> None:
    """Append the junction polygon, its arms (blocks), connectors and corner sidewalks to ``net``.

    Args:
        before / after: lanes of the main-road blocks ending / starting at the junction.
    """
    main, prof = net.main, net.main_profile
    e, r, s = spec.extent, spec.corner_radius, spec.s
    ws = prof.sidewalk_width
    ring = junction_polygon(main, prof, spec)
    net.road_segments.append(RoadSegment(ring, is_intersection=True))
    net.junction_polygons.append(ring)

    # Main road straight through: one connector per lane slot.
    for slot in range(prof.num_lanes):
        v_lo, v_hi = prof.slot_bounds(slot)
        fwd = lane_runs_forward(prof, slot, net.drive_left)
        conn = len(net.lanes)
        net.lanes.append(
            Lane(
                polygon=main.strip_polygon(s - e, s + e, v_lo, v_hi),
                arcline=main.arcline_paths(s - e, s + e, (v_lo + v_hi) / 2, reverse=not fwd),
                is_connector=True,
            )
        )
        src, dst = (before, after) if fwd else (after, before)
        link_lanes(net, src.lane_ids[slot], conn)
        link_lanes(net, conn, dst.lane_ids[slot])

    arms: dict[str, BlockLanes] = {}
    for side in spec.arms:
        arm = arm_centerline(main, prof, spec, side)
        net.roads.append((arm, spec.cross))
        crossings = []
        if spec.arm_crossing.get(side, False):
            crossings.append((CROSSING_OFFSET, CROSSING_OFFSET + spec.crossing_width))
        arms[side] = add_block(
            net,
            arm,
            0.0,
            arm.length,
            spec.cross,
            crossings=crossings,
            junction_at_start=True,
            junction_at_end=False,
            dash_phase=dash_phase,
        )

    # Cross road straight through an X junction, from the right arm's start to the left arm's start.
    if len(arms) == 2:
        right = arm_centerline(main, prof, spec, "right")
        x0, y0, _ = right.pose(np.array([0.0]))[0]
        h = main.pose(np.array([s]))[0][2]
        span = prof.half_left + prof.half_right + 2 * r
        through = Centerline.build((float(x0), float(y0), h + math.pi / 2), [(span, 0.0)])
        n = spec.cross.num_lanes
        for slot in range(n):
            v_lo, v_hi = spec.cross.slot_bounds(slot)
            fwd = lane_runs_forward(spec.cross, slot, net.drive_left)
            conn = len(net.lanes)
            net.lanes.append(
                Lane(
                    polygon=through.strip_polygon(0.0, span, v_lo, v_hi),
                    arcline=through.arcline_paths(0.0, span, (v_lo + v_hi) / 2, reverse=not fwd),
                    is_connector=True,
                )
            )
            # The right arm runs the other way: its slot n-1-k is this connector's slot k.
            from_right, to_left = arms["right"].lane_ids[n - 1 - slot], arms["left"].lane_ids[slot]
            src, dst = (from_right, to_left) if fwd else (to_left, from_right)
            link_lanes(net, src, conn)
            link_lanes(net, conn, dst)

    # Sidewalks: straight along a side without an arm, around the curb fillets where an arm opens.
    if ws > 0:
        hl, hr = prof.half_left, prof.half_right
        if "right" in spec.arms:
            net.walkways.append(_corner_walkway(main, s, (-e, -hr - r), r, ws, 90.0, 0.0))
            net.walkways.append(_corner_walkway(main, s, (e, -hr - r), r, ws, 180.0, 90.0))
        else:
            net.walkways.append(main.strip_polygon(s - e, s + e, -hr - ws, -hr))
        if "left" in spec.arms:
            net.walkways.append(_corner_walkway(main, s, (e, hl + r), r, ws, 270.0, 180.0))
            net.walkways.append(_corner_walkway(main, s, (-e, hl + r), r, ws, 360.0, 270.0))
        else:
            net.walkways.append(main.strip_polygon(s - e, s + e, hl, hl + ws))
