"""The 13 nuScenes tables of the synthetic world (``<dataroot>/<version>/*.json``).

One vehicle (n015's rig, one ``calibrated_sensor`` row per sensor), one log and one scene per tile, one
key frame every 0.5 s with six camera images and a LIDAR_TOP sweep, an ``ego_pose`` per sample_data.
The annotation tables (attribute, category, instance, sample_annotation, visibility) are empty: the map
is the only ground truth. No lidarseg/panoptic tables: the devkit would then look for their folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from maptr.data.synthetic.map_expansion import LOCATIONS
from maptr.data.synthetic.rig import SensorRig, yaw_to_quaternion
from maptr.data.synthetic.tokens import make_token

TABLE_NAMES = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)
VEHICLE = "n015"
_UTC_OFFSET_HOURS = {"boston-seaport": -4}  # the Singapore maps are at +8


@dataclass(frozen=True)
class SceneLog:
    """What the tables need about one generated scene.

    Attributes:
        name: official nuScenes scene name (``scene-0001``).
        location: one of the four map names.
        description: free text (road features), as nuScenes scenes have.
        timestamps: (N,) microseconds of the key frames.
        xy: (N, 2) ego positions, meters; yaw: (N,) ego headings, radians.
    """

    name: str
    location: str
    description: str
    timestamps: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray

    @property
    def logfile(self) -> str:
        return logfile_name(self.location, int(self.timestamps[0]))


def logfile_name(location: str, timestamp_us: int) -> str:
    """nuScenes-style log name, e.g. ``n015-2018-07-24-11-22-45+0800`` (local time of the location)."""
    hours = _UTC_OFFSET_HOURS.get(location, 8)
    local = datetime.fromtimestamp(timestamp_us / 1e6, tz=UTC).astimezone(timezone(timedelta(hours=hours)))
    return f"{VEHICLE}-{local:%Y-%m-%d-%H-%M-%S}{hours:+03d}00"


def sample_data_filename(logfile: str, channel: str, timestamp_us: int) -> str:
    """Path relative to the dataroot, as nuScenes names its files."""
    ext = "pcd.bin" if channel.startswith("LIDAR") else "jpg"
    return f"samples/{channel}/{logfile}__{channel}__{timestamp_us}.{ext}"


def map_png_filename(namespace: str, location: str) -> str:
    return f"maps/{make_token(namespace, 'map-png', location)}.png"


def build_tables(scenes: list[SceneLog], rig: SensorRig, namespace: str) -> dict[str, list[dict[str, Any]]]:
    """All 13 tables for ``scenes`` (in order); tokens derive from ``namespace`` (seeded)."""

    def tok(*parts: object) -> str:
        return make_token(namespace, *parts)

    sensors = [*rig.cameras, rig.lidar]
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLE_NAMES}
    for cal in sensors:
        tables["sensor"].append({"token": tok("sensor", cal.channel), "channel": cal.channel, "modality": cal.modality})
        tables["calibrated_sensor"].append(
            {
                "token": tok("calibrated_sensor", cal.channel),
                "sensor_token": tok("sensor", cal.channel),
                "translation": list(cal.translation),
                "rotation": list(cal.rotation),
                "camera_intrinsic": [] if cal.intrinsic is None else cal.intrinsic.tolist(),
            }
        )

    logs_by_location: dict[str, list[str]] = {loc: [] for loc in LOCATIONS}
    for scene in scenes:
        log_tok = tok("log", scene.name)
        logs_by_location[scene.location].append(log_tok)
        first_time = datetime.fromtimestamp(int(scene.timestamps[0]) / 1e6, tz=UTC)
        tables["log"].append(
            {
                "token": log_tok,
                "logfile": scene.logfile,
                "vehicle": VEHICLE,
                "date_captured": f"{first_time:%Y-%m-%d}",
                "location": scene.location,
            }
        )
        sample_toks = [tok("sample", scene.name, k) for k in range(len(scene.timestamps))]
        tables["scene"].append(
            {
                "token": tok("scene", scene.name),
                "log_token": log_tok,
                "nbr_samples": len(sample_toks),
                "first_sample_token": sample_toks[0],
                "last_sample_token": sample_toks[-1],
                "name": scene.name,
                "description": scene.description,
            }
        )
        for k, ts in enumerate(scene.timestamps):
            tables["sample"].append(
                {
                    "token": sample_toks[k],
                    "timestamp": int(ts),
                    "prev": sample_toks[k - 1] if k > 0 else "",
                    "next": sample_toks[k + 1] if k + 1 < len(sample_toks) else "",
                    "scene_token": tok("scene", scene.name),
                }
            )
        for cal in sensors:
            sd_toks = [tok("sample_data", scene.name, cal.channel, k) for k in range(len(scene.timestamps))]
            for k, ts in enumerate(scene.timestamps):
                pose_tok = tok("ego_pose", scene.name, cal.channel, k)
                tables["ego_pose"].append(
                    {
                        "token": pose_tok,
                        "timestamp": int(ts),
                        "rotation": yaw_to_quaternion(float(scene.yaw[k])),
                        "translation": [float(scene.xy[k, 0]), float(scene.xy[k, 1]), 0.0],
                    }
                )
                is_camera = cal.intrinsic is not None
                tables["sample_data"].append(
                    {
                        "token": sd_toks[k],
                        "sample_token": sample_toks[k],
                        "ego_pose_token": pose_tok,
                        "calibrated_sensor_token": tok("calibrated_sensor", cal.channel),
                        "timestamp": int(ts),
                        "fileformat": "jpg" if is_camera else "pcd",
                        "is_key_frame": True,
                        "height": rig.image_height if is_camera else 0,
                        "width": rig.image_width if is_camera else 0,
                        "filename": sample_data_filename(scene.logfile, cal.channel, int(ts)),
                        "prev": sd_toks[k - 1] if k > 0 else "",
                        "next": sd_toks[k + 1] if k + 1 < len(sd_toks) else "",
                    }
                )
    for loc in LOCATIONS:
        tables["map"].append(
            {
                "token": tok("map", loc),
                "log_tokens": logs_by_location[loc],
                "category": "semantic_prior",
                "filename": map_png_filename(namespace, loc),
            }
        )
    return tables


def write_tables(tables: dict[str, list[dict[str, Any]]], table_dir: str | os.PathLike) -> None:
    """One ``<name>.json`` per table."""
    table_dir = Path(table_dir)
    table_dir.mkdir(parents=True, exist_ok=True)
    for name in TABLE_NAMES:
        with open(table_dir / f"{name}.json", "w") as fh:
            json.dump(tables[name], fh, indent=0, separators=(",", ":"))
