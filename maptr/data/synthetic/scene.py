"""One scene end to end: draw its tile (roads, drive, scenery, look), render its key frames, count its map.

:func:`generate_scene` runs in a worker process; everything it draws comes from the scene's own RNG
(seeded by the world seed, the split and the scene's index), so a scene is the same whichever worker
renders it and in whatever order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from maptr.data.synthetic.appearance import draw_appearance
from maptr.data.synthetic.network import RoadNetwork
from maptr.data.synthetic.raster import GROUND_RESOLUTION, paint_ground
from maptr.data.synthetic.render import CameraGeometry, SceneRenderer, encode_jpeg, rig_geometry
from maptr.data.synthetic.rig import build_rig
from maptr.data.synthetic.road_network import (
    EgoWindow,
    build_network,
    draw_main_profile,
    ego_lane_offset,
    plan_tile,
)
from maptr.data.synthetic.scenery import place_scenery
from maptr.data.synthetic.stats import SampleCounts, TileGeometry, lidar_patch
from maptr.data.synthetic.tables import sample_data_filename
from maptr.data.synthetic.trajectory import EgoTrajectory, draw_speed, drive_lane, travel_distance

RASTER_MARGIN = 90.0  # meters of ground painted around the driven stretch (cameras see ~100 m)
EGO_START_S = 70.0  # the drive starts this far along the main road: road behind the first frame
SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SceneJob:
    """Everything a worker needs to generate one scene.

    Attributes:
        seed: world seed; split, index: which scene of which split (the RNG stream).
        name: nuScenes scene name; location: map name; drive_left: keep-left traffic.
        tile_center: (2,) global center of the scene's tile, meters.
        first_timestamp: microseconds of the first key frame; logfile: nuScenes log name.
        num_samples: key frames; image_width, image_height, jpeg_quality: camera output.
        out_dir: dataroot being written (temporary directory).
    """

    seed: int
    split: str
    index: int
    name: str
    location: str
    drive_left: bool
    tile_center: tuple[float, float]
    first_timestamp: int
    logfile: str
    num_samples: int
    image_width: int
    image_height: int
    jpeg_quality: int
    out_dir: str


@dataclass
class SceneResult:
    """What the main process keeps of a scene: its map, drive, counts and image brightness."""

    job: SceneJob
    network: RoadNetwork
    trajectory: EgoTrajectory
    counts: list[SampleCounts]
    brightness: list[float]  # mean grey level per key frame (over its six images)
    description: str
    speed: float


_GEOMETRY_CACHE: dict[tuple[int, int], list[CameraGeometry]] = {}


def _camera_geometry(width: int, height: int) -> list[CameraGeometry]:
    """Per-process cache: casting every pixel's ray takes ~0.3 s and depends only on the image size."""
    key = (width, height)
    if key not in _GEOMETRY_CACHE:
        _GEOMETRY_CACHE[key] = rig_geometry(build_rig(width, height))
    return _GEOMETRY_CACHE[key]


def lidar_points() -> np.ndarray:
    """(N, 5) float32 x, y, z, intensity, ring: a sparse ring of ground returns in the LiDAR frame.

    The model does not use the point cloud; MapTR-style converters only require the file to exist.
    """
    angles = np.linspace(-np.pi, np.pi, 64, endpoint=False)
    pts = []
    for ring, radius in enumerate((4.0, 8.0, 16.0)):
        pts.append(
            np.stack(
                [
                    radius * np.cos(angles),
                    radius * np.sin(angles),
                    np.full_like(angles, -1.84),
                    np.full_like(angles, 20.0),
                    np.full_like(angles, float(ring)),
                ],
                axis=1,
            )
        )
    return np.concatenate(pts).astype(np.float32)


def generate_scene(job: SceneJob) -> SceneResult:
    """Draw, render and count one scene; writes its JPEGs and LiDAR files under ``job.out_dir``."""
    cv2.setNumThreads(1)  # one scene per process: parallelism comes from the process pool
    rng = np.random.default_rng([job.seed, SPLIT_IDS[job.split], job.index])
    rig = build_rig(job.image_width, job.image_height)
    profile = draw_main_profile(rng)
    speed = draw_speed(rng)
    window = EgoWindow(start=EGO_START_S, travel=travel_distance(speed, job.num_samples))
    plan = plan_tile(rng, profile, window, np.asarray(job.tile_center, dtype=np.float64))
    net = build_network(rng, plan, profile, drive_left=job.drive_left)
    trajectory = drive_lane(
        rng, net.main, ego_lane_offset(rng, net), window.start, speed, job.num_samples, job.first_timestamp
    )
    boxes = place_scenery(rng, net)
    look = draw_appearance(rng)
    lo = trajectory.xy.min(axis=0) - RASTER_MARGIN
    hi = trajectory.xy.max(axis=0) + RASTER_MARGIN
    raster = paint_ground(rng, net, boxes, look, (lo[0], lo[1], hi[0], hi[1]), GROUND_RESOLUTION)
    renderer = SceneRenderer(_camera_geometry(job.image_width, job.image_height), raster, boxes, look)

    out = Path(job.out_dir)
    lidar_bytes = lidar_points().tobytes()
    tile = TileGeometry(net)
    counts, brightness = [], []
    for k in range(job.num_samples):
        ts = int(trajectory.timestamps[k])
        grey = 0.0
        for c, cam in enumerate(rig.cameras):
            offset = (int(rng.integers(0, 64)), int(rng.integers(0, 64)))
            image = render_camera(renderer, c, trajectory, k, offset)
            grey += float(image.mean()) / len(rig.cameras)
            path = out / sample_data_filename(job.logfile, cam.channel, ts)
            path.write_bytes(encode_jpeg(image, job.jpeg_quality))
        (out / sample_data_filename(job.logfile, rig.lidar.channel, ts)).write_bytes(lidar_bytes)
        brightness.append(grey)
        counts.append(tile.count(lidar_patch(trajectory.xy[k], float(trajectory.yaw[k]), rig.lidar)))
    return SceneResult(
        job=job,
        network=net,
        trajectory=trajectory,
        counts=counts,
        brightness=brightness,
        description=_describe(net, plan_kinds=[j.kind for j in plan.junctions]),
        speed=speed,
    )


def render_camera(renderer: SceneRenderer, camera: int, trajectory: EgoTrajectory, k: int, offset: tuple[int, int]):
    """One image (a seam for tests that need the renderer to fail mid-way)."""
    return renderer.render(camera, trajectory.xy[k], float(trajectory.yaw[k]), offset)


def _describe(net: RoadNetwork, plan_kinds: list[str]) -> str:
    prof = net.main_profile
    parts = [
        f"synthetic, {prof.lanes_right}+{prof.lanes_left} lanes",
        "keep-left" if net.drive_left else "keep-right",
        "curve" if net.arc_lines else "straight",
    ]
    parts += [f"{kind} junction" for kind in plan_kinds]
    if net.crossings:
        parts.append(f"{len(net.crossings)} ped crossing(s)")
    return ", ".join(parts)
