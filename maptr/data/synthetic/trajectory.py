"""The ego car's key-frame poses: it drives one lane of the main road at a steady, varying speed.

Poses are sampled at 2 Hz (nuScenes key frames). Positions follow the lane's own arc length, so the speed
is the car's speed in its lane also on curves; the heading is the lane direction; z = 0 (flat ground).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maptr.data.synthetic.centerline import Centerline

KEYFRAME_INTERVAL_US = 500_000  # 2 Hz
MIN_SPEED, MAX_SPEED = 4.0, 12.0  # m/s: 2-6 m between key frames


@dataclass(frozen=True)
class EgoTrajectory:
    """Key-frame poses of one scene.

    Attributes:
        xy: (N, 2) global positions, meters.
        yaw: (N,) headings, radians (counter-clockwise from +x).
        timestamps: (N,) microseconds.
        s: (N,) arc lengths on the main centerline (for statistics and debugging).
    """

    xy: np.ndarray
    yaw: np.ndarray
    timestamps: np.ndarray
    s: np.ndarray


def draw_speed(rng: np.random.Generator) -> float:
    return float(rng.uniform(MIN_SPEED, MAX_SPEED))


def travel_distance(speed: float, num_samples: int) -> float:
    """Meters the ego covers from its first to its last key frame (speed may vary by 10 %)."""
    return 1.1 * speed * (num_samples - 1) * KEYFRAME_INTERVAL_US / 1e6


def drive_lane(
    rng: np.random.Generator,
    main: Centerline,
    lane_offset: float,
    start_s: float,
    speed: float,
    num_samples: int,
    start_timestamp: int,
) -> EgoTrajectory:
    """Poses every 0.5 s along the lane at ``lane_offset`` of ``main``, from centerline arc ``start_s``.

    The speed wanders smoothly within +-10 % of ``speed`` (a car never holds a constant speed).
    """
    dt = KEYFRAME_INTERVAL_US / 1e6
    wobble = 1.0 + 0.1 * np.sin(rng.uniform(0, 2 * np.pi) + np.arange(num_samples) * rng.uniform(0.1, 0.4))
    steps = np.concatenate([[0.0], np.cumsum(speed * wobble[:-1] * dt)])  # (N,) meters along the lane
    grid = np.arange(start_s, min(main.length, start_s + steps[-1] * 2.0 + 10.0), 0.25)  # (G,) centerline s
    lane = main.offset_points(grid, lane_offset)  # (G, 2)
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(lane, axis=0), axis=1))])  # (G,)
    if along[-1] < steps[-1]:
        raise ValueError(f"main road too short for the drive: {along[-1]:.1f} m < {steps[-1]:.1f} m")
    s = np.interp(steps, along, grid)  # (N,)
    pose = main.pose(s)  # (N, 3)
    xy = main.offset_points(s, lane_offset)
    timestamps = start_timestamp + np.arange(num_samples, dtype=np.int64) * KEYFRAME_INTERVAL_US
    return EgoTrajectory(xy=xy, yaw=pose[:, 2], timestamps=timestamps, s=s)
