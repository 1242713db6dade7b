"""The map elements of one scene tile, in global meters, before they become map-expansion records.

Everything the rest of the generator needs about a tile's roads lives here: the polygons and lines that
the map-expansion JSON stores (road segments, lanes and lane connectors, dividers, ped crossings,
walkways), the paint the renderer draws (the same lines plus stop bars), and the driven main road. Rings
are (K, 2) counter-clockwise, not closed (the first point is not repeated); lines are (K, 2) with nodes at
most 1 m apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maptr.data.synthetic.centerline import Centerline

# Road-divider paint styles (lane dividers are always dashed white).
DIVIDER_STYLES = ("double_yellow", "solid_yellow", "double_white", "solid_white")


@dataclass(frozen=True)
class RoadProfile:
    """Cross-section of a road: lanes on each side of its centerline and the sidewalks beyond.

    Attributes:
        lanes_left: lanes on the left of the direction of ``s`` (v > 0).
        lanes_right: lanes on the right (v < 0).
        lane_width: meters.
        sidewalk_width: meters of walkway beyond each curb.
        center_divider: whether a painted road divider separates the two directions.
    """

    lanes_left: int
    lanes_right: int
    lane_width: float
    sidewalk_width: float
    center_divider: bool

    def __post_init__(self) -> None:
        if self.lanes_left < 1 or self.lanes_right < 1:
            raise ValueError("a two-way road needs at least one lane per direction")
        if not 2.0 <= self.lane_width <= 5.0:
            raise ValueError(f"lane width {self.lane_width} m outside [2, 5]")

    @property
    def half_left(self) -> float:
        return self.lanes_left * self.lane_width

    @property
    def half_right(self) -> float:
        return self.lanes_right * self.lane_width

    @property
    def num_lanes(self) -> int:
        return self.lanes_left + self.lanes_right

    def slot_bounds(self, slot: int) -> tuple[float, float]:
        """Lateral band (v_right, v_left) of lane slot ``slot``, counted from the right curb (0)."""
        lo = -self.half_right + slot * self.lane_width
        return lo, lo + self.lane_width


@dataclass
class Lane:
    """A lane or a lane connector (inside a junction).

    Attributes:
        polygon: (K, 2) ring.
        arcline: nuScenes ``arcline_path_3`` records along the direction of traffic.
        left_dividers / right_dividers: indices into :attr:`RoadNetwork.dividers` bounding the lane on
            the left / right of its direction of traffic.
        incoming / outgoing: indices into :attr:`RoadNetwork.lanes` (the lane graph).
        is_connector: True for a lane connector (stored in the ``lane_connector`` layer).
    """

    polygon: np.ndarray
    arcline: list[dict]
    left_dividers: list[int] = field(default_factory=list)
    right_dividers: list[int] = field(default_factory=list)
    incoming: list[int] = field(default_factory=list)
    outgoing: list[int] = field(default_factory=list)
    is_connector: bool = False


@dataclass
class Divider:
    """A painted line that is a map element: ``kind`` "road" (between directions) or "lane".

    Attributes:
        points: (K, 2) nodes at most 1 m apart.
        kind: "road" or "lane".
        style: paint, one of :data:`DIVIDER_STYLES` for road dividers, "dashed_white" for lane dividers.
        dash_phase: meters, where the dash pattern starts (lane dividers).
    """

    points: np.ndarray
    kind: str
    style: str
    dash_phase: float = 0.0


@dataclass
class RoadSegment:
    """A ``road_segment`` polygon: a road block between junctions, or a junction (``is_intersection``)."""

    polygon: np.ndarray
    is_intersection: bool


@dataclass
class Crossing:
    """A zebra ped crossing: ``polygon`` (4, 2) ring, stripes run along ``heading`` (the road's)."""

    polygon: np.ndarray
    heading: float


@dataclass
class RoadNetwork:
    """All map elements of one tile plus what the ego trajectory and the statistics need.

    Attributes:
        main: the driven road's centerline; ``main_profile`` its cross-section.
        drive_left: True where traffic keeps left (Singapore).
        road_segments, lanes, dividers, crossings, walkways: map elements (see the classes).
        stop_bars: (4, 2) rings of painted stop lines (paint only, not map elements).
        curb_lines: (K, 2) outlines of the paved road (rings of the road union), for curb paint.
        arc_lines: (K, 2) centerline parts of every curved piece (a curve "in view" for statistics).
        junction_polygons: (K, 2) rings of the junctions (also in ``road_segments``).
        divider_style: this tile's road-divider paint.
        roads: (centerline, profile) of every road, the main road first (scenery lines the roads).
    """

    main: Centerline
    main_profile: RoadProfile
    drive_left: bool
    divider_style: str
    road_segments: list[RoadSegment] = field(default_factory=list)
    lanes: list[Lane] = field(default_factory=list)
    dividers: list[Divider] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)
    walkways: list[np.ndarray] = field(default_factory=list)
    stop_bars: list[np.ndarray] = field(default_factory=list)
    curb_lines: list[np.ndarray] = field(default_factory=list)
    arc_lines: list[np.ndarray] = field(default_factory=list)
    junction_polygons: list[np.ndarray] = field(default_factory=list)
    roads: list[tuple[Centerline, RoadProfile]] = field(default_factory=list)

    def all_points(self) -> np.ndarray:
        """(N, 2) every vertex of every element (bounds, tile checks)."""
        parts = [r.polygon for r in self.road_segments] + self.walkways + [d.points for d in self.dividers]
        return np.concatenate(parts, axis=0)
