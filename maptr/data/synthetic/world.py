"""Generate a whole synthetic nuScenes world: scenes in parallel, then tables, maps and statistics.

Layout of the world (global meters, per location map): scene tiles are 500 m apart on a row, train tiles
at y = 250 and val tiles at y = 1250, so no val road is ever near a train road. Scenes take the official
nuScenes scene names of their split (``nuscenes.utils.splits``), so any packer splits synthetic and real
data by the same code. The output appears atomically: everything is written into a temporary sibling
folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from nuscenes.utils import splits
from tqdm import tqdm

from maptr.data.synthetic.map_expansion import LOCATIONS, MapExpansionBuilder
from maptr.data.synthetic.rig import CAMERA_CHANNELS, LIDAR_CHANNEL, build_rig
from maptr.data.synthetic.scene import SceneJob, SceneResult, generate_scene
from maptr.data.synthetic.stats import (
    FLOORS,
    MIN_SAMPLES_FOR_VARIETY_FLOORS,
    WorldBelowFloorError,
    check_floors,
    summarize,
)
from maptr.data.synthetic.tables import SceneLog, build_tables, logfile_name, map_png_filename, write_tables
from maptr.data.synthetic.tokens import make_token

TILE_PITCH = 500.0  # meters between neighbouring tile centers
TRAIN_ROW_Y, VAL_ROW_Y = 250.0, 1250.0
FIRST_TIMESTAMP_US = 1_532_400_000_000_000  # late July 2018, like nuScenes' n015 logs
SCENE_SPACING_US = 3_600_000_000  # one hour between scenes
VAL_TIME_OFFSET = 1000  # val scenes start 1000 hours after the train scenes
# Scene i of a split goes to LOCATION_CYCLE[i % 8]: half Boston (keep right), half Singapore (keep left),
# close to nuScenes trainval (Boston 55 %, one-north 21 %, Queenstown 15 %, Holland Village 9 %).
LOCATION_CYCLE = (
    "boston-seaport",
    "singapore-onenorth",
    "boston-seaport",
    "singapore-queenstown",
    "boston-seaport",
    "singapore-onenorth",
    "boston-seaport",
    "singapore-hollandvillage",
)


def scene_names(version: str, split: str, count: int) -> list[str]:
    """The first ``count`` official scene names of ``split`` (mini splits for a ``*-mini`` version)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    names = getattr(splits, f"mini_{split}" if version.endswith("mini") else split)
    if not 0 <= count <= len(names):
        raise ValueError(f"{count} {split} scenes requested but {version} has {len(names)} {split} names")
    return list(names[:count])


def plan_jobs(out_dir: Path, version: str, scene_counts: dict[str, int], **shared: Any) -> list[SceneJob]:
    """One job per scene, in table order (``scene_counts``: scenes per split, train then val): location,
    tile, timestamps, names. ``shared``: the :class:`SceneJob` fields all scenes have in common (seed,
    num_samples, image_width, image_height, jpeg_quality)."""
    jobs = []
    for split, count in scene_counts.items():
        columns: Counter[str] = Counter()  # tiles used so far in each location's row
        for index, name in enumerate(scene_names(version, split, count)):
            location = LOCATION_CYCLE[index % len(LOCATION_CYCLE)]
            column = columns[location]
            columns[location] += 1
            row_y = TRAIN_ROW_Y if split == "train" else VAL_ROW_Y
            slot = index + (VAL_TIME_OFFSET if split == "val" else 0)
            first = FIRST_TIMESTAMP_US + slot * SCENE_SPACING_US
            jobs.append(
                SceneJob(
                    split=split,
                    index=index,
                    name=name,
                    location=location,
                    drive_left=location.startswith("singapore"),
                    tile_center=(TILE_PITCH / 2 + column * TILE_PITCH, row_y),
                    first_timestamp=first,
                    logfile=logfile_name(location, first),
                    out_dir=str(out_dir),
                    **shared,
                )
            )
    return jobs


def _run_jobs(jobs: list[SceneJob], workers: int, progress: bool) -> list[SceneResult]:
    total = sum(j.num_samples for j in jobs)
    results: dict[tuple[str, int], SceneResult] = {}
    with tqdm(total=total, unit="sample", desc="synth", disable=not progress, mininterval=2.0) as bar:
        if workers <= 1:
            for job in jobs:
                res = generate_scene(job)
                results[(job.split, job.index)] = res
                bar.update(job.num_samples)
        else:
            # fork: workers inherit the imported modules (no re-import cost per worker).
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(processes=workers) as pool:
                for res in pool.imap_unordered(generate_scene, jobs, chunksize=1):
                    results[(res.job.split, res.job.index)] = res
                    bar.update(res.job.num_samples)
    return [results[(j.split, j.index)] for j in jobs]


def _write_maps(root: Path, results: list[SceneResult], namespace: str) -> None:
    expansion = root / "maps" / "expansion"
    expansion.mkdir(parents=True, exist_ok=True)
    builders = {loc: MapExpansionBuilder(namespace, loc) for loc in LOCATIONS}
    for res in results:
        builders[res.job.location].add_tile(res.job.name, res.network)
    for loc, builder in builders.items():
        with open(expansion / f"{loc}.json", "w") as fh:
            json.dump(builder.to_json(), fh, separators=(",", ":"))
        # The devkit only checks that the map mask PNG exists; ship a valid tiny one.
        ok, png = cv2.imencode(".png", np.full((8, 8), 128, dtype=np.uint8))
        assert ok
        (root / map_png_filename(namespace, loc)).write_bytes(png.tobytes())


def world_stats(results: list[SceneResult], jobs: list[SceneJob]) -> dict[str, Any]:
    """Measured variety of a world (see :mod:`maptr.data.synthetic.stats`)."""
    counts = [c for r in results for c in r.counts]
    brightness = [b for r in results for b in r.brightness]
    scene_brightness = [float(np.mean(r.brightness)) for r in results]
    per_split: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        chosen = [r for r in results if r.job.split == split]
        per_split[split] = {"scenes": len(chosen), "samples": sum(len(r.counts) for r in chosen)}
    junction_kinds = Counter(kind for r in results for kind in _junction_kinds(r.description))
    profile_lanes = Counter(
        f"{r.network.main_profile.lanes_right}+{r.network.main_profile.lanes_left}" for r in results
    )
    return {
        "splits": per_split,
        "locations": dict(Counter(j.location for j in jobs)),
        "instances_per_sample": {
            "divider": summarize([c.divider for c in counts]),
            "ped_crossing": summarize([c.ped_crossing for c in counts]),
            "boundary": summarize([c.boundary for c in counts]),
        },
        "share_of_samples": {
            "curve": round(float(np.mean([c.curve for c in counts])), 3),
            "junction": round(float(np.mean([c.junction for c in counts])), 3),
            "ped_crossing": round(float(np.mean([c.ped_crossing > 0 for c in counts])), 3),
        },
        "scenes_with": {
            "curve": sum(bool(r.network.arc_lines) for r in results),
            "junction": sum(bool(r.network.junction_polygons) for r in results),
            "ped_crossing": sum(bool(r.network.crossings) for r in results),
            "keep_left_traffic": sum(r.network.drive_left for r in results),
        },
        "junctions": {"X": junction_kinds.get("X", 0), "T": junction_kinds.get("T", 0)},
        "main_road_lanes_fwd_plus_back": dict(sorted(profile_lanes.items())),
        "speed_mps": summarize([r.speed for r in results]),
        "brightness": {
            **summarize(brightness),
            "scene_spread": round(max(scene_brightness) - min(scene_brightness), 3),
        },
        "floors": FLOORS,
        "floors_checked": "all" if len(counts) >= MIN_SAMPLES_FOR_VARIETY_FLOORS else "boundary_min only",
    }


def _junction_kinds(description: str) -> list[str]:
    return [part.split()[0] for part in description.split(", ") if part.endswith("junction")]


def generate_world(
    out_dir: str | os.PathLike,
    *,
    seed: int,
    version: str,
    train_scenes: int,
    val_scenes: int,
    samples_per_scene: int,
    image_width: int,
    image_height: int,
    jpeg_quality: int,
    workers: int | None = None,
    check_variety: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a nuScenes-format world to ``out_dir`` (replacing it atomically) and return its statistics.

    Args:
        out_dir: the dataroot to create (``<out_dir>/<version>/``, ``maps/``, ``samples/``).
        seed: everything derives from it; the same seed gives byte-identical files.
        version: table folder name; ``*-mini`` versions take the mini split scene names.
        train_scenes / val_scenes: scenes per split; samples_per_scene: key frames (2 Hz) per scene.
        image_width / image_height / jpeg_quality: camera images.
        workers: processes rendering scenes in parallel (default: all cores; 1 renders in-process).
        check_variety: raise :class:`WorldBelowFloorError` if the world falls below :data:`FLOORS`.
        progress: show a tqdm bar over samples.
    """
    if samples_per_scene < 1:
        raise ValueError(f"samples_per_scene must be >= 1, got {samples_per_scene}")
    if train_scenes + val_scenes < 1:
        raise ValueError("at least one scene is needed")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    build_rig(image_width, image_height)  # validates the image size before any work
    out = Path(out_dir)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
            (tmp / "samples" / channel).mkdir(parents=True)
        jobs = plan_jobs(tmp, version, {"train": train_scenes, "val": val_scenes}, seed=seed,
                         num_samples=samples_per_scene, image_width=image_width, image_height=image_height,
                         jpeg_quality=jpeg_quality)  # fmt: skip
        workers = (os.cpu_count() or 1) if workers is None else workers
        results = _run_jobs(jobs, min(workers, len(jobs)), progress)
        namespace = make_token("synth", seed)
        logs = [
            SceneLog(
                name=r.job.name,
                location=r.job.location,
                description=r.description,
                timestamps=r.trajectory.timestamps,
                xy=r.trajectory.xy,
                yaw=r.trajectory.yaw,
            )
            for r in results
        ]
        write_tables(build_tables(logs, build_rig(image_width, image_height), namespace), tmp / version)
        _write_maps(tmp, results, namespace)
        stats = world_stats(results, jobs)
        failures = check_floors(stats, sum(len(r.counts) for r in results))
        if failures and check_variety:
            raise WorldBelowFloorError("generated world falls below its floors: " + "; ".join(failures))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats
