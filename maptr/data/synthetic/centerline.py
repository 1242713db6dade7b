"""A road's reference line: a chain of straight pieces and circular arcs with continuous heading.

Every road of the synthetic world (the main road the ego drives, the cross roads of junctions) is a
:class:`Centerline`. Map elements are offsets of it: a point at arc length ``s`` and lateral offset ``v``
(meters, positive to the left of the direction of travel along ``s``) is ``position(s) + v * normal(s)``.
Arcs are exact, so lane centerlines convert losslessly to nuScenes ``arcline_path_3`` records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Piece:
    """One piece of a centerline.

    Attributes:
        start: (x, y, heading) at the start of the piece; heading in radians, counter-clockwise from +x.
        length: arc length in meters (> 0).
        curvature: signed 1/radius in 1/m; 0 for a straight piece, > 0 turning left, < 0 turning right.
    """

    start: tuple[float, float, float]
    length: float
    curvature: float

    @property
    def is_arc(self) -> bool:
        return self.curvature != 0.0

    def pose(self, ds: np.ndarray) -> np.ndarray:
        """Poses at distances ``ds`` (N,) from the piece start -> (N, 3) x, y, heading."""
        x0, y0, h0 = self.start
        ds = np.asarray(ds, dtype=np.float64)
        if not self.is_arc:
            return np.stack([x0 + ds * math.cos(h0), y0 + ds * math.sin(h0), np.full_like(ds, h0)], axis=1)
        k = self.curvature
        heading = h0 + k * ds  # (N,)
        sin, cos = sin_cos(heading)
        x = x0 + (sin - math.sin(h0)) / k
        y = y0 - (cos - math.cos(h0)) / k
        return np.stack([x, y, heading], axis=1)

    def end(self) -> tuple[float, float, float]:
        x, y, h = self.pose(np.array([self.length]))[0]
        return float(x), float(y), float(h)


@dataclass
class Centerline:
    """A chain of :class:`Piece` s; arc length ``s`` runs from 0 to :attr:`length`."""

    pieces: list[Piece] = field(default_factory=list)

    @staticmethod
    def build(start: tuple[float, float, float], spec: list[tuple[float, float]]) -> Centerline:
        """Chain pieces given as ``(length, curvature)`` from pose ``start`` (x, y, heading)."""
        line = Centerline()
        pose = start
        for length, curvature in spec:
            if length <= 0:
                raise ValueError(f"piece length must be positive, got {length}")
            piece = Piece(start=pose, length=float(length), curvature=float(curvature))
            line.pieces.append(piece)
            pose = piece.end()
        return line

    @property
    def length(self) -> float:
        return float(sum(p.length for p in self.pieces))

    def piece_starts(self) -> np.ndarray:
        """(num_pieces + 1,) arc length at which each piece starts, then the total length."""
        return np.concatenate([[0.0], np.cumsum([p.length for p in self.pieces])])

    def pose(self, s: np.ndarray) -> np.ndarray:
        """Poses at arc lengths ``s`` (N,), clamped to [0, length] -> (N, 3) x, y, heading."""
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        starts = self.piece_starts()
        idx = np.clip(np.searchsorted(starts, s, side="right") - 1, 0, len(self.pieces) - 1)  # (N,)
        out = np.empty((s.shape[0], 3))
        for i in np.unique(idx):
            sel = idx == i
            out[sel] = self.pieces[i].pose(s[sel] - starts[i])
        return out

    def offset_points(self, s: np.ndarray, v: float | np.ndarray) -> np.ndarray:
        """Points at arc lengths ``s`` (N,) and lateral offsets ``v`` (scalar or (N,)) -> (N, 2)."""
        pose = self.pose(s)  # (N, 3)
        sin, cos = sin_cos(pose[:, 2])
        normal = np.stack([-sin, cos], axis=1)  # (N, 2) left normal
        return pose[:, :2] + np.asarray(v, dtype=np.float64).reshape(-1, 1) * normal

    def curvature_at(self, s: np.ndarray) -> np.ndarray:
        """Signed curvature (N,) at arc lengths ``s`` (N,)."""
        starts = self.piece_starts()
        idx = np.clip(np.searchsorted(starts, s, side="right") - 1, 0, len(self.pieces) - 1)
        return np.array([self.pieces[i].curvature for i in idx])

    def sample_s(self, s0: float, s1: float, max_step: float, straight_step: float | None = None) -> np.ndarray:
        """Arc lengths covering [s0, s1]: every piece boundary inside, arcs split to ``max_step`` meters,
        straights to ``straight_step`` meters (None: straights keep only their end points).

        Polygons use ``straight_step=None`` (few nodes); lines use a step for both, because the devkit
        finds a line in a patch by its nodes, not its segments.
        """
        if s1 <= s0:
            raise ValueError(f"empty interval [{s0}, {s1}]")
        starts = self.piece_starts()
        out: list[np.ndarray] = []
        for i, piece in enumerate(self.pieces):
            a, b = max(s0, starts[i]), min(s1, starts[i + 1])
            if b <= a:
                continue
            step = max_step if piece.is_arc else straight_step
            num = 1 if step is None else max(1, math.ceil((b - a) / step))
            out.append(np.linspace(a, b, num + 1))
        s = np.concatenate(out)
        keep = np.concatenate([[True], np.diff(s) > 1e-9])  # drop duplicated piece boundaries
        return s[keep]

    def strip_polygon(
        self,
        s0: float,
        s1: float,
        v_right: float,
        v_left: float,
        max_step: float = 2.0,
        end_offsets: tuple[float, ...] = (),
    ) -> np.ndarray:
        """Counter-clockwise ring (K, 2) of the band ``v_right <= v <= v_left`` over ``s0 <= s <= s1``
        (not closed: the first point is not repeated).

        ``end_offsets`` (strictly between v_right and v_left) add vertices on both end edges: where lanes
        meet a road segment or a junction edge, every polygon then has the same vertices on the shared
        edge, and the union closes exactly instead of leaving 1e-14 m sliver holes.
        """
        if v_left <= v_right:
            raise ValueError(f"v_left {v_left} must exceed v_right {v_right}")
        inner = np.array(sorted(v for v in end_offsets if v_right < v < v_left))
        s = self.sample_s(s0, s1, max_step)
        right = self.offset_points(s, v_right)  # (N, 2), walked forward
        end_edge = self.offset_points(np.full(inner.size, s1), inner)  # (M, 2), walked to the left
        left = self.offset_points(s[::-1], v_left)  # (N, 2), walked back: interior stays on the left
        start_edge = self.offset_points(np.full(inner.size, s0), inner[::-1])  # (M, 2), back to the right
        return np.concatenate([right, end_edge, left, start_edge], axis=0)

    def polyline(self, s0: float, s1: float, v: float, step: float = 1.0) -> np.ndarray:
        """Points (K, 2) of the offset line ``v`` over [s0, s1], at most ``step`` meters apart."""
        return self.offset_points(self.sample_s(s0, s1, step, straight_step=step), v)

    def arcline_paths(self, s0: float, s1: float, v: float, reverse: bool) -> list[dict]:
        """nuScenes ``arcline_path_3`` records of the offset line ``v`` over [s0, s1].

        Each straight part is shape ``LSR`` with ``segment_length [0, L, 0]``; each arc part is ``LSL``
        (left turn) or ``RSR`` (right turn) with ``segment_length [L, 0, 0]`` and its own radius, which the
        devkit's ``discretize_lane`` turns back into the same curve. ``reverse`` walks from s1 to s0 (a lane
        whose traffic runs against ``s``).
        """
        starts = self.piece_starts()
        parts: list[dict] = []
        for i, piece in enumerate(self.pieces):
            a, b = max(s0, starts[i]), min(s1, starts[i + 1])
            if b - a <= 1e-6:
                continue
            pa, pb = self.pose(np.array([a, b]))  # (3,), (3,)
            pts = self.offset_points(np.array([a, b]), v)  # (2, 2)
            k = piece.curvature
            scale = 1.0 - k * v  # an offset line of an arc is a concentric arc of radius (1 - k v) / |k|
            if scale <= 0:
                raise ValueError(f"offset {v} m lies beyond the arc's center (radius {1 / abs(k):.1f} m)")
            length = (b - a) * scale
            if reverse:
                start = [float(pts[1, 0]), float(pts[1, 1]), _wrap(pb[2] + math.pi)]
                end = [float(pts[0, 0]), float(pts[0, 1]), _wrap(pa[2] + math.pi)]
                turn_left = k < 0
            else:
                start = [float(pts[0, 0]), float(pts[0, 1]), _wrap(pa[2])]
                end = [float(pts[1, 0]), float(pts[1, 1]), _wrap(pb[2])]
                turn_left = k > 0
            if k == 0.0:
                shape, radius, seg = "LSR", 999.999, [0.0, length, 0.0]
            else:
                shape = "LSL" if turn_left else "RSR"
                radius, seg = scale / abs(k), [length, 0.0, 0.0]
            parts.append(
                {"start_pose": start, "end_pose": end, "shape": shape, "radius": radius, "segment_length": seg}
            )
        return parts[::-1] if reverse else parts


def sin_cos(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise sine and cosine with the scalar libm functions.

    numpy's vectorized sin/cos may round the last bit differently depending on an element's position in
    the array (SIMD body vs scalar tail). Neighbouring polygons evaluate their shared edge from arrays of
    different lengths or order, and a 1e-14 m mismatch becomes a sliver hole in the road union, which
    MapTR would turn into a spurious boundary. Scalar calls give identical vertices.
    """
    flat = np.asarray(angles, dtype=np.float64).ravel()
    sin = np.fromiter((math.sin(a) for a in flat), dtype=np.float64, count=flat.size)
    cos = np.fromiter((math.cos(a) for a in flat), dtype=np.float64, count=flat.size)
    return sin.reshape(np.shape(angles)), cos.reshape(np.shape(angles))


def _wrap(angle: float) -> float:
    """Angle in [-pi, pi)."""
    return float((angle + math.pi) % (2 * math.pi) - math.pi)
