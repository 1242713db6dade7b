"""The ground of one scene painted into a top-down colour raster, which the camera renderer samples.

Pixel (row, col) of level 0 is the ground point ``(x0 + col * res, y0 + row * res)`` (cv2's pixel-center
convention, so ``cv2.remap`` with ``(x - x0) / res`` samples it). Paint comes straight from the map
elements, so every painted divider, crossing and curb sits exactly where the ground truth says. Coarser
levels (each ``LEVEL_FACTOR`` x smaller, area-averaged) serve far-away pixels that cover many ground
texels, as a mipmap does, instead of aliasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from maptr.data.synthetic.appearance import SceneAppearance
from maptr.data.synthetic.network import RoadNetwork
from maptr.data.synthetic.scenery import Boxes

GROUND_RESOLUTION = 0.1  # meters per level-0 pixel
SUBPIXEL_SHIFT = 3  # cv2 drawing with 1/8-pixel vertex precision
LEVEL_FACTOR = 4
NUM_LEVELS = 3
LANE_LINE_WIDTH = 0.15  # meters
ROAD_LINE_WIDTH = 0.15
DOUBLE_LINE_GAP = 0.15
CURB_WIDTH = 0.3
DASH_LENGTH, DASH_PERIOD = 3.0, 9.0  # lane-divider dashes (nuScenes-like 3 m paint, 6 m gap)
ZEBRA_STRIPE, ZEBRA_PERIOD = 0.5, 1.0


@dataclass
class GroundRaster:
    """Mip levels of the painted ground.

    Attributes:
        levels: list of (H_l, W_l, 3) uint8 BGR images, level 0 finest.
        origin: (x0, y0) global coordinates of level-0 pixel (0, 0).
        resolution: meters per level-0 pixel.
        background: (3,) BGR uint8 colour of the ground outside the raster.
    """

    levels: list[np.ndarray]
    origin: tuple[float, float]
    resolution: float
    background: tuple[int, int, int]


def _bgr(rgb: np.ndarray) -> tuple[float, float, float]:
    return float(rgb[2]), float(rgb[1]), float(rgb[0])


class _Canvas:
    """Level-0 image with drawing in global meters."""

    def __init__(self, origin: tuple[float, float], resolution: float, shape: tuple[int, int]) -> None:
        self.origin = np.array(origin)
        self.scale = (1 << SUBPIXEL_SHIFT) / resolution
        self.image = np.empty((*shape, 3), dtype=np.uint8)

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        return np.round((np.asarray(pts) - self.origin) * self.scale).astype(np.int32)

    def fill(self, polygons: list[np.ndarray], color: tuple[float, float, float], target=None) -> None:
        if polygons:
            img = self.image if target is None else target
            cv2.fillPoly(img, [self.to_pixels(p) for p in polygons], color, cv2.LINE_AA, SUBPIXEL_SHIFT)


def _normals(points: np.ndarray) -> np.ndarray:
    """(K, 2) unit left normals of a polyline (K, 2), from central differences."""
    tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def _band(points: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Ring of the band between lateral offsets ``lo`` < ``hi`` of a polyline."""
    n = _normals(points)
    return np.concatenate([points + lo * n, (points + hi * n)[::-1]], axis=0)


def _resample(points: np.ndarray, a: float, b: float, step: float = 0.5) -> np.ndarray:
    """Points of a polyline between arc lengths a and b."""
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    t = np.linspace(a, b, max(2, int(np.ceil((b - a) / step)) + 1))
    return np.stack([np.interp(t, along, points[:, 0]), np.interp(t, along, points[:, 1])], axis=1)


def _dashes(points: np.ndarray, phase: float) -> list[np.ndarray]:
    """Polylines of the painted dashes of a dashed line."""
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    out = []
    start = -(phase % DASH_PERIOD)
    while start < along[-1]:
        a, b = max(start, 0.0), min(start + DASH_LENGTH, along[-1])
        if b - a > 0.3:
            out.append(_resample(points, a, b))
        start += DASH_PERIOD
    return out


def _zebra(polygon: np.ndarray) -> list[np.ndarray]:
    """Stripes of a crossing ring as :meth:`Centerline.strip_polygon` makes it: its right edge (a -> b)
    then its left edge (b -> a), equally many vertices each (more than two when a piece joint falls
    inside the crossing)."""
    half = polygon.shape[0] // 2
    p00, p10, p01 = polygon[0], polygon[half - 1], polygon[-1]
    along = p10 - p00
    across = p01 - p00
    width = float(np.linalg.norm(across))
    unit = across / max(width, 1e-9)
    inset = along / max(float(np.linalg.norm(along)), 1e-9) * 0.15
    out = []
    for v in np.arange(0.3, width - ZEBRA_STRIPE, ZEBRA_PERIOD):
        a = p00 + v * unit + inset
        b = a + ZEBRA_STRIPE * unit
        out.append(np.array([a, a + along - 2 * inset, b + along - 2 * inset, b]))
    return out


def _shadow_polygons(boxes: Boxes, sun: np.ndarray) -> list[np.ndarray]:
    """Ground shadows of boxes: hull of each footprint and its top face projected along the sun."""
    if len(boxes) == 0 or sun[2] <= 0.05:
        return []
    corners = boxes.corners()  # (N, 8, 3)
    shift = -corners[:, :, 2:3] / sun[2] * sun[None, None, :2]  # (N, 8, 2): along the light to z = 0
    flat = (corners[:, :, :2] + shift).astype(np.float32)
    return [cv2.convexHull(pts).reshape(-1, 2).astype(np.float64) for pts in flat]


def paint_ground(
    rng: np.random.Generator,
    net: RoadNetwork,
    boxes: Boxes,
    look: SceneAppearance,
    bounds: tuple[float, float, float, float],
    resolution: float,
) -> GroundRaster:
    """Paint the ground inside ``bounds`` (x_min, y_min, x_max, y_max) at ``resolution`` m/pixel."""
    x_min, y_min, x_max, y_max = bounds
    shape = (int(np.ceil((y_max - y_min) / resolution)) + 1, int(np.ceil((x_max - x_min) / resolution)) + 1)
    canvas = _Canvas((x_min, y_min), resolution, shape)
    # cv2 fills are ~40x faster than numpy broadcasting on a raster of this size.
    cv2.rectangle(canvas.image, (0, 0), (shape[1], shape[0]), _bgr(look.terrain), thickness=-1)
    canvas.fill(net.walkways, _bgr(look.walkway))
    canvas.fill([r.polygon for r in net.road_segments], _bgr(look.asphalt))

    # Asphalt repairs and stains: darker or lighter patches on the road surface.
    patches = []
    for _ in range(int(rng.integers(4, 16))):
        line, prof = net.roads[int(rng.integers(len(net.roads)))]
        s = float(rng.uniform(0.0, line.length))
        half = min(prof.half_left, prof.half_right) - 0.5
        v = float(rng.uniform(-half, half))
        center = line.offset_points(np.array([s]), v)[0]
        radius = rng.uniform(0.5, 2.5, size=7)
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=7))
        patches.append(center + np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1))
    shade = rng.uniform(0.75, 1.2)
    canvas.fill(patches, _bgr(np.clip(look.asphalt * shade, 0, 255)))

    canvas.fill([_band(c, -CURB_WIDTH / 2, CURB_WIDTH / 2) for c in net.curb_lines], _bgr(look.curb))
    white, yellow = _bgr(look.paint_white), _bgr(look.paint_yellow)
    canvas.fill(net.stop_bars, white)
    canvas.fill([stripe for c in net.crossings for stripe in _zebra(c.polygon)], white)
    lane_dashes, road_white, road_yellow = [], [], []
    for d in net.dividers:
        if d.kind == "lane":
            lane_dashes += [
                _band(p, -LANE_LINE_WIDTH / 2, LANE_LINE_WIDTH / 2) for p in _dashes(d.points, d.dash_phase)
            ]
            continue
        target = road_yellow if "yellow" in d.style else road_white
        if d.style.startswith("double"):
            off = DOUBLE_LINE_GAP / 2
            target.append(_band(d.points, off, off + ROAD_LINE_WIDTH))
            target.append(_band(d.points, -off - ROAD_LINE_WIDTH, -off))
        else:
            target.append(_band(d.points, -ROAD_LINE_WIDTH / 2, ROAD_LINE_WIDTH / 2))
    canvas.fill(lane_dashes + road_white, white)
    canvas.fill(road_yellow, yellow)

    # Cast shadows of buildings, trees and poles darken whatever lies under them.
    if look.shadow_strength > 0:
        mask = np.zeros(shape, dtype=np.uint8)
        canvas.fill(_shadow_polygons(boxes, look.sun_direction), (255.0,), target=mask)
        dark = cv2.multiply(canvas.image, cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR), scale=look.shadow_strength / 255.0)
        canvas.image = cv2.subtract(canvas.image, dark)

    _add_texture(rng, canvas.image, look.texture_noise)
    levels = [canvas.image]
    for _ in range(NUM_LEVELS - 1):
        prev = levels[-1]
        size = (max(1, prev.shape[1] // LEVEL_FACTOR), max(1, prev.shape[0] // LEVEL_FACTOR))
        levels.append(cv2.resize(prev, size, interpolation=cv2.INTER_AREA))
    background = tuple(int(c) for c in np.round(_bgr(look.terrain)))
    return GroundRaster(levels=levels, origin=(x_min, y_min), resolution=resolution, background=background)


def _add_texture(rng: np.random.Generator, image: np.ndarray, sigma: float) -> None:
    """In place: fine grain plus low-frequency blotches (wear, dirt, grass patches), grey levels +-."""
    h, w = image.shape[:2]
    grain = np.clip(rng.normal(128.0, sigma, size=(256, 256)), 0, 255).astype(np.uint8)
    grain = np.tile(grain, (h // 256 + 1, w // 256 + 1))[:h, :w]
    coarse = rng.normal(128.0, sigma * 1.5, size=(max(2, h // 40), max(2, w // 40)))
    blotch = cv2.resize(np.clip(coarse, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    noise = cv2.addWeighted(grain, 1.0, blotch, 1.0, -128.0)  # (H, W) uint8, offset 128
    cv2.addWeighted(image, 1.0, cv2.cvtColor(noise, cv2.COLOR_GRAY2BGR), 1.0, -128.0, dst=image)
