"""One road block: the map elements of a road between two junctions (or a junction and a road end).

A block is the band ``s0 <= s <= s1`` of a :class:`Centerline` with a :class:`RoadProfile`. It becomes one
``road_segment``, one lane per lane slot, the dividers between slots (cut where a ped crossing is), the
ped crossings, two walkways and, at the ends that meet a junction, painted stop bars. Lanes, road segment
and walkways share the same sampled arc lengths, so their common edges have identical vertices and the
union of road polygons (MapTR's boundary) has no slivers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maptr.data.synthetic.centerline import Centerline
from maptr.data.synthetic.network import Crossing, Divider, Lane, RoadNetwork, RoadProfile, RoadSegment

DIVIDER_NODE_STEP = 1.0  # meters between line nodes (the devkit finds lines by their nodes)
CROSSING_DIVIDER_GAP = 1.0  # meters of unpainted road between a divider end and a crossing
JUNCTION_DIVIDER_GAP = 1.5  # meters between a divider end and the junction when no crossing is there
STOP_BAR_WIDTH = 0.4


@dataclass
class BlockLanes:
    """The lanes of a block by slot (0 = rightmost): ``lane_ids[slot]`` indexes ``RoadNetwork.lanes``,
    ``forward[slot]`` says whether its traffic runs along ``s``."""

    lane_ids: list[int]
    forward: list[bool]


def lane_edge_offsets(profile: RoadProfile) -> tuple[float, ...]:
    """Lateral offsets of the inner lane boundaries (the vertices lanes put on a block's end edges)."""
    return tuple(-profile.half_right + j * profile.lane_width for j in range(1, profile.num_lanes))


def lane_runs_forward(profile: RoadProfile, slot: int, drive_left: bool) -> bool:
    """Right-hand traffic uses the right-side slots along ``s``; left-hand traffic the left-side ones."""
    return (slot < profile.lanes_right) != drive_left


def _subtract_intervals(lo: float, hi: float, cuts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """[lo, hi] minus the union of ``cuts``, as sorted disjoint intervals."""
    pieces = [(lo, hi)]
    for a, b in cuts:
        nxt = []
        for p, q in pieces:
            if b <= p or a >= q:
                nxt.append((p, q))
                continue
            if a > p:
                nxt.append((p, a))
            if b < q:
                nxt.append((b, q))
        pieces = nxt
    return pieces


def add_block(
    net: RoadNetwork,
    line: Centerline,
    s0: float,
    s1: float,
    profile: RoadProfile,
    *,
    crossings: list[tuple[float, float]],
    junction_at_start: bool,
    junction_at_end: bool,
    dash_phase: float,
) -> BlockLanes:
    """Append a block's elements to ``net`` and return its lanes.

    Args:
        line: the road's centerline; the block covers arc lengths [s0, s1].
        profile: lanes and sidewalks.
        crossings: (a, b) arc-length intervals of ped crossings inside the block (straight parts only).
        junction_at_start / junction_at_end: whether a junction adjoins that end (stop bars, divider gap).
        dash_phase: meters, start of the lane-divider dash pattern.
    """
    if not 0.0 <= s0 < s1 <= line.length + 1e-9:
        raise ValueError(f"block [{s0}, {s1}] outside the centerline [0, {line.length}]")
    hl, hr, ws = profile.half_left, profile.half_right, profile.sidewalk_width
    edges = lane_edge_offsets(profile)
    net.road_segments.append(RoadSegment(line.strip_polygon(s0, s1, -hr, hl, end_offsets=edges), is_intersection=False))
    if ws > 0:
        net.walkways.append(line.strip_polygon(s0, s1, hl, hl + ws))
        net.walkways.append(line.strip_polygon(s0, s1, -hr - ws, -hr))

    # Ped crossings: the full road width; dividers stop CROSSING_DIVIDER_GAP short of them.
    for a, b in crossings:
        mid = line.pose(np.array([(a + b) / 2.0]))[0]
        net.crossings.append(Crossing(polygon=line.strip_polygon(a, b, -hr, hl), heading=float(mid[2])))
    start = s0 + (JUNCTION_DIVIDER_GAP if junction_at_start else 0.0)
    end = s1 - (JUNCTION_DIVIDER_GAP if junction_at_end else 0.0)
    cuts = [(a - CROSSING_DIVIDER_GAP, b + CROSSING_DIVIDER_GAP) for a, b in crossings]
    intervals = [(a, b) for a, b in _subtract_intervals(start, end, cuts) if b - a >= 1.5]

    # Dividers on the inner slot boundaries 1 .. num_lanes - 1; boundary lanes_right is the road divider.
    boundary_dividers: dict[int, list[int]] = {}
    for j in range(1, profile.num_lanes):
        is_center = j == profile.lanes_right
        if is_center and not profile.center_divider:
            continue
        v = -hr + j * profile.lane_width
        ids = []
        for a, b in intervals:
            ids.append(len(net.dividers))
            net.dividers.append(
                Divider(
                    points=line.polyline(a, b, v, DIVIDER_NODE_STEP),
                    kind="road" if is_center else "lane",
                    style=net.divider_style if is_center else "dashed_white",
                    dash_phase=dash_phase,
                )
            )
        boundary_dividers[j] = ids

    lane_ids, forward = [], []
    for slot in range(profile.num_lanes):
        v_lo, v_hi = profile.slot_bounds(slot)
        fwd = lane_runs_forward(profile, slot, net.drive_left)
        lower, upper = boundary_dividers.get(slot, []), boundary_dividers.get(slot + 1, [])
        lane_ids.append(len(net.lanes))
        forward.append(fwd)
        net.lanes.append(
            Lane(
                polygon=line.strip_polygon(s0, s1, v_lo, v_hi),
                arcline=line.arcline_paths(s0, s1, (v_lo + v_hi) / 2.0, reverse=not fwd),
                left_dividers=upper if fwd else lower,
                right_dividers=lower if fwd else upper,
            )
        )

    # Stop bars across the lanes that enter a junction, just before the first crossing/divider end.
    forward_band = (-hr, 0.0) if not net.drive_left else (0.0, hl)
    backward_band = (0.0, hl) if not net.drive_left else (-hr, 0.0)
    if junction_at_end:
        bar_end = min([end] + [a - CROSSING_DIVIDER_GAP for a, b in crossings if b > end - 10.0])
        net.stop_bars.append(line.strip_polygon(bar_end + 0.2, bar_end + 0.2 + STOP_BAR_WIDTH, *forward_band))
    if junction_at_start:
        bar_start = max([start] + [b + CROSSING_DIVIDER_GAP for a, b in crossings if a < start + 10.0])
        net.stop_bars.append(line.strip_polygon(bar_start - 0.2 - STOP_BAR_WIDTH, bar_start - 0.2, *backward_band))
    return BlockLanes(lane_ids=lane_ids, forward=forward)


def link_lanes(net: RoadNetwork, src: int, dst: int) -> None:
    """Record that traffic leaving lane ``src`` enters lane ``dst``."""
    net.lanes[src].outgoing.append(dst)
    net.lanes[dst].incoming.append(src)
