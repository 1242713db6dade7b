"""Procedural roads of one scene tile: plan a main road with curves and junctions, then build its elements.

The main road is the one the ego drives. Its plan is a chain of straights and arcs laid out so that the
planned features (curves, a T or X junction, mid-block crossings) fall inside the stretch the ego sees;
cross-road arms leave the junctions at right angles. A plan is rejected and redrawn (same RNG stream, so
still deterministic) when the road would overlap itself, an arm would cross another road, or the roads
would leave the tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

from maptr.data.synthetic.blocks import add_block
from maptr.data.synthetic.centerline import Centerline
from maptr.data.synthetic.junction import CROSSING_OFFSET, JunctionSpec, add_junction, arm_centerline
from maptr.data.synthetic.network import DIVIDER_STYLES, RoadNetwork, RoadProfile

TILE_ROAD_HALF_EXTENT = 200.0  # meters: roads stay within this box around the tile center
MAX_PLAN_ATTEMPTS = 40
P_CURVE = 0.7  # a scene's road has at least one arc
P_SECOND_CURVE = 0.35
P_JUNCTION = 0.8
P_SECOND_JUNCTION = 0.25
P_X_JUNCTION = 0.55
P_JUNCTION_CROSSING = 0.65  # per junction approach / arm
P_MIDBLOCK_CROSSING = 0.45
P_NO_CENTER_LINE = 0.25  # for 1 + 1 lane roads: unpainted residential streets


@dataclass(frozen=True)
class EgoWindow:
    """The stretch of the main road the ego drives: centerline arc lengths [start, start + travel]."""

    start: float
    travel: float

    @property
    def end(self) -> float:
        return self.start + self.travel


@dataclass
class TilePlan:
    """A drawn plan: the main centerline (in tile-local coordinates), its junctions and crossings."""

    main: Centerline
    junctions: list[JunctionSpec]
    midblock: list[tuple[float, float]]


def draw_main_profile(rng: np.random.Generator) -> RoadProfile:
    """Lanes per direction 1-3 (usually equal both ways), lane width, sidewalks, center line."""
    fwd = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    bwd = fwd if rng.random() < 0.7 else int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    center = not (fwd == 1 and bwd == 1 and rng.random() < P_NO_CENTER_LINE)
    return RoadProfile(
        lanes_left=bwd,
        lanes_right=fwd,
        lane_width=float(rng.uniform(2.8, 3.7)),
        sidewalk_width=float(rng.uniform(1.5, 4.0)),
        center_divider=center,
    )


def _draw_junction(rng: np.random.Generator, main: RoadProfile) -> JunctionSpec:
    lanes = int(rng.choice([1, 2], p=[0.6, 0.4]))
    cross = RoadProfile(
        lanes_left=lanes,
        lanes_right=lanes,
        lane_width=float(rng.uniform(2.8, 3.5)),
        sidewalk_width=main.sidewalk_width,  # one sidewalk width wraps around the corners
        center_divider=rng.random() > 0.2,
    )
    if rng.random() < P_X_JUNCTION:
        arms: tuple[str, ...] = ("left", "right")
    else:
        arms = ("left",) if rng.random() < 0.5 else ("right",)
    return JunctionSpec(
        s=0.0,  # placed later
        arms=arms,
        cross=cross,
        corner_radius=float(main.sidewalk_width + rng.uniform(0.5, 6.0)),
        arm_length={side: float(rng.uniform(45.0, 90.0)) for side in arms},
        arm_crossing={side: bool(rng.random() < P_JUNCTION_CROSSING) for side in arms},
        crossing_width=float(rng.uniform(3.0, 5.0)),
    )


def _junction_clearance(spec: JunctionSpec) -> float:
    """Straight road needed on each side of a junction center: extent, crossing, divider gaps, margin."""
    return spec.extent + CROSSING_OFFSET + spec.crossing_width + 4.0


def _draw_plan(rng: np.random.Generator, profile: RoadProfile, window: EgoWindow) -> TilePlan:
    """One candidate plan; features are laid out from just behind the ego start onwards."""
    needed = window.end + 100.0  # road ahead of the last sample: cameras see far
    min_radius = max(profile.half_left, profile.half_right) + profile.sidewalk_width + 15.0
    features = []
    if rng.random() < P_CURVE:
        features.append("arc")
        if rng.random() < P_SECOND_CURVE:
            features.append("arc")
    if rng.random() < P_JUNCTION:
        features.append("junction")
        if rng.random() < P_SECOND_JUNCTION:
            features.append("junction")
    rng.shuffle(features)

    lead = float(rng.uniform(max(15.0, window.start - 55.0), window.start + 5.0))
    spec: list[tuple[float, float]] = [(lead, 0.0)]
    junctions: list[JunctionSpec] = []
    total = lead
    for feature in features:
        gap = float(rng.uniform(4.0, 25.0))
        spec.append((gap, 0.0))
        total += gap
        if feature == "arc":
            radius = float(rng.uniform(min_radius, 220.0))
            angle = math.radians(rng.uniform(15.0, 90.0))
            length = min(radius * angle, 130.0)
            spec.append((length, float(rng.choice([-1.0, 1.0])) / radius))
            total += length
        else:
            junction = _draw_junction(rng, profile)
            clearance = _junction_clearance(junction)
            length = 2 * clearance + float(rng.uniform(0.0, 10.0))
            junction.s = total + length / 2 + float(rng.uniform(-2.0, 2.0))
            junctions.append(junction)
            spec.append((length, 0.0))
            total += length
    while total < needed:
        if rng.random() < 0.2:
            radius = float(rng.uniform(min_radius, 220.0))
            length = min(radius * math.radians(rng.uniform(10.0, 45.0)), 80.0)
            spec.append((length, float(rng.choice([-1.0, 1.0])) / radius))
        else:
            length = float(rng.uniform(20.0, 60.0))
            spec.append((length, 0.0))
        total += length

    heading = float(rng.uniform(-math.pi, math.pi))
    main = Centerline.build((0.0, 0.0, heading), spec)
    midblock = _draw_midblock_crossings(rng, main, junctions, window)
    return TilePlan(main=main, junctions=junctions, midblock=midblock)


def _draw_midblock_crossings(
    rng: np.random.Generator, main: Centerline, junctions: list[JunctionSpec], window: EgoWindow
) -> list[tuple[float, float]]:
    """At most one crossing on a straight part inside the seen stretch, clear of junctions."""
    if rng.random() >= P_MIDBLOCK_CROSSING:
        return []
    width = float(rng.uniform(3.0, 5.0))
    for _ in range(30):
        a = float(rng.uniform(window.start - 15.0, window.end + 25.0))
        b = a + width
        if a < 10.0 or b > main.length - 10.0:
            continue
        if np.any(main.curvature_at(np.linspace(a - 1.0, b + 1.0, 8)) != 0.0):
            continue
        if any(abs((a + b) / 2 - j.s) < _junction_clearance(j) + width + 8.0 for j in junctions):
            continue
        return [(a, b)]
    return []


def _plan_is_valid(plan: TilePlan, profile: RoadProfile) -> bool:
    """Reject self-overlapping roads, arms that run into other roads, and plans too big for a tile."""
    hl, hr, ws = profile.half_left, profile.half_right, profile.sidewalk_width
    main = plan.main
    body = Polygon(main.strip_polygon(0.0, main.length, -hr - ws - 1.0, hl + ws + 1.0))
    if not body.is_valid:  # an offset band of a self-approaching curve folds over itself
        return False
    footprint = [body]
    for junction in plan.junctions:
        for side in junction.arms:
            arm = arm_centerline(main, profile, junction, side)
            # The arm beyond its first few meters must stay clear of all roads drawn so far.
            clear_from = min(junction.corner_radius + 5.0, arm.length / 2)
            band = Polygon(
                arm.strip_polygon(
                    clear_from, arm.length, -junction.cross.half_right - ws - 2.0, junction.cross.half_left + ws + 2.0
                )
            )
            if any(band.intersects(f) for f in footprint):
                return False
            footprint.append(band)
    bounds = np.array(shapely.unary_union(footprint).bounds)
    return bool(np.all(bounds[2:] - bounds[:2] <= 2 * TILE_ROAD_HALF_EXTENT))


def _shorten_arms(rng: np.random.Generator, plan: TilePlan) -> None:
    """Shorter arms make more plans fit; called between failed attempts."""
    for junction in plan.junctions:
        for side in junction.arms:
            junction.arm_length[side] = max(25.0, junction.arm_length[side] * float(rng.uniform(0.5, 0.8)))


def _translate(plan: TilePlan, profile: RoadProfile, center: np.ndarray) -> TilePlan:
    """The same plan rebuilt so that the bounding box of its roads is centered on ``center``."""
    pts = [plan.main.strip_polygon(0.0, plan.main.length, -profile.half_right, profile.half_left)]
    for junction in plan.junctions:
        for side in junction.arms:
            arm = arm_centerline(plan.main, profile, junction, side)
            pts.append(arm.offset_points(np.array([0.0, arm.length]), 0.0))
    allpts = np.concatenate(pts, axis=0)
    shift = center - (allpts.min(axis=0) + allpts.max(axis=0)) / 2.0
    x0, y0, h0 = plan.main.pieces[0].start
    spec = [(p.length, p.curvature) for p in plan.main.pieces]
    main = Centerline.build((x0 + float(shift[0]), y0 + float(shift[1]), h0), spec)
    return TilePlan(main=main, junctions=plan.junctions, midblock=plan.midblock)


def plan_tile(rng: np.random.Generator, profile: RoadProfile, window: EgoWindow, center: np.ndarray) -> TilePlan:
    """A valid plan centered on ``center``; falls back to a plain straight road if none is found."""
    for _ in range(MAX_PLAN_ATTEMPTS):
        plan = _draw_plan(rng, profile, window)
        for _ in range(3):
            if _plan_is_valid(plan, profile):
                return _translate(plan, profile, center)
            if not plan.junctions:
                break
            _shorten_arms(rng, plan)
    straight = Centerline.build((0.0, 0.0, float(rng.uniform(-math.pi, math.pi))), [(window.end + 100.0, 0.0)])
    return _translate(TilePlan(main=straight, junctions=[], midblock=[]), profile, center)


def build_network(rng: np.random.Generator, plan: TilePlan, profile: RoadProfile, drive_left: bool) -> RoadNetwork:
    """All map elements of a planned tile."""
    net = RoadNetwork(
        main=plan.main,
        main_profile=profile,
        drive_left=drive_left,
        divider_style=str(rng.choice(DIVIDER_STYLES, p=[0.4, 0.2, 0.2, 0.2])),
    )
    net.roads.append((plan.main, profile))
    dash_phase = float(rng.uniform(0.0, 9.0))
    junctions = sorted(plan.junctions, key=lambda j: j.s)
    # Crossings on the main road next to junctions, drawn per approach.
    crossings = list(plan.midblock)
    for j in junctions:
        for sign in (-1.0, 1.0):
            if rng.random() < P_JUNCTION_CROSSING:
                near = j.s + sign * (j.extent + CROSSING_OFFSET)
                far = near + sign * j.crossing_width
                crossings.append((min(near, far), max(near, far)))
    bounds = [0.0]
    for j in junctions:
        bounds += [j.s - j.extent, j.s + j.extent]
    bounds.append(plan.main.length)
    blocks = []
    for k in range(len(bounds) // 2):
        s0, s1 = bounds[2 * k], bounds[2 * k + 1]
        inside = [(a, b) for a, b in crossings if a >= s0 and b <= s1]
        blocks.append(
            add_block(
                net,
                plan.main,
                s0,
                s1,
                profile,
                crossings=inside,
                junction_at_start=k > 0,
                junction_at_end=k < len(junctions),
                dash_phase=dash_phase,
            )
        )
    for k, j in enumerate(junctions):
        add_junction(net, j, blocks[k], blocks[k + 1], dash_phase)

    road = road_union(net)
    for poly in getattr(road, "geoms", [road]):
        net.curb_lines.append(np.asarray(poly.exterior.coords))
        net.curb_lines.extend(np.asarray(ring.coords) for ring in poly.interiors)
    starts = plan.main.piece_starts()
    for i, piece in enumerate(plan.main.pieces):
        if piece.is_arc:
            net.arc_lines.append(plan.main.polyline(starts[i], starts[i + 1], 0.0, 2.0))
    return net


def road_union(net: RoadNetwork) -> shapely.Geometry:
    """Union of road segments and lanes (MapTR's boundary source) as a shapely geometry."""
    polys = [Polygon(r.polygon) for r in net.road_segments]
    polys += [Polygon(lane.polygon) for lane in net.lanes if not lane.is_connector]
    return shapely.unary_union(polys)


def ego_lane_offset(rng: np.random.Generator, net: RoadNetwork) -> float:
    """Lateral offset (meters, left positive) of a lane that runs along the main road's ``s``."""
    prof = net.main_profile
    slots = [k for k in range(prof.num_lanes) if (k < prof.lanes_right) != net.drive_left]
    slot = int(rng.choice(slots))
    lo, hi = prof.slot_bounds(slot)
    return (lo + hi) / 2.0
