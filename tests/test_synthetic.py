"""Tests of the synthetic nuScenes-format world: the devkit reads it, the map is MapTR-ready, the images
show the map where the calibration says, and generation is deterministic and atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from nuscenes.map_expansion.arcline_path_utils import discretize_lane
from nuscenes.map_expansion.map_api import NuScenesMap
from nuscenes.nuscenes import NuScenes
from nuscenes.utils import splits
from pyquaternion import Quaternion
from shapely.geometry import LineString, Point, Polygon
from shapely.ops import unary_union

from maptr.data.synthetic import FLOORS, WorldBelowFloorError, generate_world, scene_names
from maptr.data.synthetic import scene as scene_module
from maptr.data.synthetic.centerline import Centerline
from maptr.data.synthetic.map_expansion import LOCATIONS
from maptr.data.synthetic.rig import CAMERA_CHANNELS, build_rig, camera_optical_axis_yaw_deg
from maptr.data.synthetic.stats import check_floors

VERSION = "v1.0-trainval"
TINY = dict(
    version=VERSION,
    train_scenes=2,
    val_scenes=1,
    samples_per_scene=3,
    image_width=160,
    image_height=90,
    jpeg_quality=90,
    progress=False,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "nuscenes"
    stats = generate_world(root, seed=0, workers=1, **TINY)
    return root, stats


@pytest.fixture(scope="module")
def nusc(world: tuple[Path, dict]) -> NuScenes:
    return NuScenes(VERSION, str(world[0]), verbose=False)


@pytest.fixture(scope="module")
def maps(world: tuple[Path, dict]) -> dict[str, NuScenesMap]:
    return {loc: NuScenesMap(str(world[0]), loc) for loc in LOCATIONS}


def _pose(record: dict) -> np.ndarray:
    mat = np.eye(4)
    mat[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    mat[:3, 3] = record["translation"]
    return mat


def _lidar2global(nusc: NuScenes, sample: dict) -> np.ndarray:
    sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    return _pose(nusc.get("ego_pose", sd["ego_pose_token"])) @ _pose(
        nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    )


def _location(nusc: NuScenes, sample: dict) -> str:
    return nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])["location"]


# --------------------------------------------------------------------------------------------------
# Tables, files, calibration
# --------------------------------------------------------------------------------------------------
def test_devkit_loads_every_sample_with_all_sensors(world, nusc):
    root, _ = world
    assert len(nusc.scene) == 3 and len(nusc.sample) == 9
    assert not (root / VERSION / "lidarseg.json").exists() and not (root / VERSION / "panoptic.json").exists()
    for sample in nusc.sample:
        assert set(sample["data"]) == {*CAMERA_CHANNELS, "LIDAR_TOP"}
        lidar_path = nusc.get_sample_data_path(sample["data"]["LIDAR_TOP"])
        points = np.fromfile(lidar_path, dtype=np.float32)
        assert points.size > 0 and points.size % 5 == 0


def test_camera_intrinsics_are_scaled_and_images_decode_at_that_size(nusc):
    rig = build_rig(160, 90)
    sample = nusc.sample[4]
    for channel in CAMERA_CHANNELS:
        path, _, K = nusc.get_sample_data(sample["data"][channel])
        np.testing.assert_allclose(K, rig.camera(channel).intrinsic)
        image = cv2.imread(path)
        assert image is not None and image.shape == (90, 160, 3)
    # nuScenes' CAM_FRONT focal length 1266.4 px at 1600 px wide, scaled by 160 / 1600.
    front = nusc.get_sample_data(sample["data"]["CAM_FRONT"])[2]
    assert front[0, 0] == pytest.approx(126.64172, abs=1e-4)


def test_rig_matches_nuscenes_camera_yaws():
    rig = build_rig(480, 270)
    yaws = {cam.channel: camera_optical_axis_yaw_deg(cam) for cam in rig.cameras}
    expected = {
        "CAM_FRONT": 0.3,
        "CAM_FRONT_RIGHT": -56.4,
        "CAM_FRONT_LEFT": 55.2,
        "CAM_BACK": 179.9,
        "CAM_BACK_LEFT": 108.6,
        "CAM_BACK_RIGHT": -110.8,
    }
    for channel, yaw in expected.items():
        assert yaws[channel] == pytest.approx(yaw, abs=0.1)
    with pytest.raises(ValueError, match="at least 16x16"):
        build_rig(8, 8)


def test_samples_are_linked_at_two_hertz(nusc):
    for scene in nusc.scene:
        token, times, xy, last = scene["first_sample_token"], [], [], ""
        while token:
            sample = nusc.get("sample", token)
            times.append(sample["timestamp"])
            xy.append(_lidar2global(nusc, sample)[:2, 3])
            last, token = token, sample["next"]
        assert len(times) == scene["nbr_samples"] == 3
        assert np.all(np.diff(times) == 500_000)
        assert scene["last_sample_token"] == last
        steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        assert np.all((steps > 1.8) & (steps < 6.6))  # 4-12 m/s (+-10 %) at 2 Hz
    sd = nusc.get("sample_data", nusc.sample[1]["data"]["CAM_FRONT"])
    assert sd["is_key_frame"] and sd["prev"] and sd["next"]
    log_tokens = {tok for m in nusc.map for tok in m["log_tokens"]}
    assert log_tokens == {log["token"] for log in nusc.log}
    assert {log["location"] for log in nusc.log} <= set(LOCATIONS)


# --------------------------------------------------------------------------------------------------
# Splits and tiles
# --------------------------------------------------------------------------------------------------
def test_scene_names_follow_official_splits(nusc):
    names = [s["name"] for s in nusc.scene]
    assert names[:2] == list(splits.train[:2]) and names[2] == splits.val[0]
    assert scene_names("v1.0-mini", "val", 2) == ["scene-0103", "scene-0916"]
    with pytest.raises(ValueError, match="val names"):
        scene_names(VERSION, "val", 151)


def test_train_and_val_tiles_are_far_apart(nusc, maps):
    boxes = {}
    for scene in nusc.scene:
        split = "train" if scene["name"] in splits.train else "val"
        xy = []
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            xy.append(_lidar2global(nusc, sample)[:2, 3])
            token = sample["next"]
        xy = np.array(xy)
        loc = nusc.get("log", scene["log_token"])["location"]
        boxes[scene["name"]] = (split, loc, Polygon.from_bounds(*(xy.min(0) - 150), *(xy.max(0) + 150)))
    pairs = 0
    for name_a, (split_a, loc_a, box_a) in boxes.items():
        for name_b, (split_b, loc_b, box_b) in boxes.items():
            if split_a == "train" and split_b == "val" and loc_a == loc_b:
                pairs += 1
                assert not box_a.intersects(box_b), (name_a, name_b)
    assert pairs >= 1  # the tiny world puts a train and a val scene in Boston
    # Every map node of a location lies within 300 m of its own scenes' drives: tiles do not spill over.
    for loc, m in maps.items():
        own = [b for split, l_, b in boxes.values() if l_ == loc]
        if not own:
            assert m.node == []
            continue
        region = unary_union(own).buffer(150)
        nodes = np.array([[n["x"], n["y"]] for n in m.node])
        assert all(region.contains(Point(p)) for p in nodes[:: max(1, len(nodes) // 500)])


# --------------------------------------------------------------------------------------------------
# Map expansion
# --------------------------------------------------------------------------------------------------
def test_all_four_maps_load_and_polygons_are_valid(maps):
    assert set(maps) == set(LOCATIONS)
    for m in maps.values():
        assert m.version >= "1.3" and m.canvas_edge[1] > 0
        for layer in ("road_segment", "lane", "ped_crossing", "walkway", "lane_connector"):
            for rec in getattr(m, layer):
                poly = m.extract_polygon(rec["polygon_token"])
                assert poly.is_valid and poly.exterior.is_ccw, (layer, rec["token"])
        for layer in ("road_divider", "lane_divider"):
            for rec in getattr(m, layer):
                line = m.extract_line(rec["line_token"])
                steps = np.linalg.norm(np.diff(np.asarray(line.coords), axis=0), axis=1)
                assert len(steps) >= 1 and steps.max() <= 2.0  # the devkit finds lines by their nodes


def test_map_geometry_around_every_sample(nusc, maps):
    found = {"road_divider": 0, "lane_divider": 0, "ped_crossing": 0, "road_segment": 0, "lane": 0}
    for sample in nusc.sample:
        l2g = _lidar2global(nusc, sample)
        m = maps[_location(nusc, sample)]
        x, y = l2g[0, 3], l2g[1, 3]
        records = m.get_records_in_patch((x - 30, y - 30, x + 30, y + 30), list(found))
        for layer, tokens in records.items():
            found[layer] += len(tokens) > 0
        yaw = math.degrees(math.atan2(l2g[1, 0], l2g[0, 0]))
        geom = dict(m.get_map_geom((x, y, 60, 30), yaw, ["road_segment", "lane", "road_divider", "lane_divider"]))
        road = unary_union([g for g in geom["road_segment"] + geom["lane"]])
        assert road.area > 200.0  # the ego is on a road in every frame
        # The LiDAR (at the patch origin after the devkit's transform) stands on the road.
        assert road.buffer(0.5).contains(Point(0.0, 0.0))
    assert found["road_segment"] == found["lane"] == len(nusc.sample)
    assert found["road_divider"] > 0 and found["lane_divider"] > 0 and found["ped_crossing"] > 0


def test_road_union_has_no_sliver_holes(maps):
    # MapTR turns every interior ring of the road union into a boundary instance.
    for m in maps.values():
        polys = [m.extract_polygon(r["polygon_token"]) for r in m.road_segment + m.lane]
        if not polys:
            continue
        union = unary_union(polys)
        for part in getattr(union, "geoms", [union]):
            assert len(part.interiors) == 0


def test_lanes_have_centerlines_connectivity_and_divider_segments(maps):
    m = maps["singapore-onenorth"]
    assert m.lane and m.lane_connector
    for rec in m.lane[:20] + m.lane_connector[:10]:
        poses = np.array(discretize_lane(m.arcline_path_3[rec["token"]], 0.5))
        assert poses.shape[0] >= 2
        lane_poly = m.extract_polygon(rec["polygon_token"]).buffer(0.05)
        assert all(lane_poly.contains(Point(p)) for p in poses[:, :2])
        # Consecutive centerline poses point along the lane (yaw consistent with the motion).
        step = np.diff(poses[:, :2], axis=0)
        moving = np.linalg.norm(step, axis=1) > 1e-3  # consecutive arcline paths repeat their joint pose
        heading = np.arctan2(step[moving, 1], step[moving, 0])
        assert np.all(np.abs(np.angle(np.exp(1j * (heading - poses[:-1, 2][moving])))) < 0.1)
        m.get_incoming_lane_ids(rec["token"])
        m.get_outgoing_lane_ids(rec["token"])
    assert any(rec["left_lane_divider_segments"] or rec["right_lane_divider_segments"] for rec in m.lane)
    connected = [c for c in m.lane_connector if m.get_incoming_lane_ids(c["token"])]
    assert connected and all(m.get_outgoing_lane_ids(c["token"]) for c in connected)


def test_centerline_arcline_round_trip():
    line = Centerline.build((3.0, -2.0, 0.4), [(20.0, 0.0), (35.0, 1 / 40.0), (10.0, 0.0), (25.0, -1 / 30.0)])
    for reverse in (False, True):
        for v in (-4.5, 2.0):
            paths = line.arcline_paths(2.0, 85.0, v, reverse=reverse)
            poses = np.array(discretize_lane(paths, 0.25))[:, :2]
            exact = LineString(line.polyline(2.0, 85.0, v, step=0.05))
            assert max(exact.distance(Point(p)) for p in poses) < 0.01
            start = line.offset_points(np.array([85.0 if reverse else 2.0]), v)[0]
            np.testing.assert_allclose(poses[0], start, atol=1e-6)
    with pytest.raises(ValueError, match="beyond the arc"):
        line.arcline_paths(25.0, 50.0, 45.0, reverse=False)


# --------------------------------------------------------------------------------------------------
# Rendering geometry
# --------------------------------------------------------------------------------------------------
def test_painted_road_divider_projects_onto_paint(nusc, maps):
    """A road-divider node 10-25 m ahead of CAM_FRONT, projected with the tables' calibration, lands on
    pixels clearly brighter than the asphalt 1.5 m beside it; the same test 0.9 m off the line fails."""
    checked, on_line, off_line = 0, 0, 0
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
        cam2ego = _pose(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]))
        ego2global = _pose(nusc.get("ego_pose", sd["ego_pose_token"]))
        global2cam = np.linalg.inv(ego2global @ cam2ego)
        K = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
        image = cv2.imread(nusc.get_sample_data_path(sd["token"])).astype(np.float64).mean(axis=2)  # (H, W)
        m = maps[_location(nusc, sample)]

        def pixel(xy: np.ndarray, global2cam: np.ndarray = global2cam, K: np.ndarray = K) -> tuple[int, int]:
            pts = global2cam @ np.array([xy[0], xy[1], 0.0, 1.0])
            u, v = np.round((K @ pts[:3])[:2] / pts[2]).astype(int)
            return int(u), int(v)

        def looks_painted(point: np.ndarray, normal: np.ndarray, image: np.ndarray = image) -> bool | None:
            spots = [pixel(point), pixel(point - 1.5 * normal), pixel(point + 1.5 * normal)]
            h, w = image.shape
            if not all(2 <= u < w - 2 and 0 <= v < h for u, v in spots):
                return None
            (u, v), *sides = spots
            paint = image[v, u - 2 : u + 3].max()  # double lines leave a gap at the divider's center
            return bool(paint > min(image[sv, su] for su, sv in sides) + 15)  # a stop bar may lie on one side

        for rec in m.road_divider:
            line = np.asarray(m.extract_line(rec["line_token"]).coords)
            local = (np.linalg.inv(ego2global) @ np.c_[line, np.zeros(len(line)), np.ones(len(line))].T).T
            ahead = np.nonzero((local[:, 0] > 10.0) & (local[:, 0] < 25.0) & (np.abs(local[:, 1]) < 6.0))[0]
            if ahead.size == 0:
                continue
            i = int(ahead[len(ahead) // 2])
            direction = line[min(i + 1, len(line) - 1)] - line[max(i - 1, 0)]
            normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
            result = looks_painted(line[i], normal)
            shifted = looks_painted(line[i] + 0.9 * normal, normal)
            if result is None or shifted is None:
                continue
            checked += 1
            on_line += result
            off_line += shifted
    assert checked >= 2
    assert on_line >= 0.8 * checked
    assert off_line <= 0.3 * checked


# --------------------------------------------------------------------------------------------------
# Statistics, determinism, atomicity
# --------------------------------------------------------------------------------------------------
def test_stats_report_variety(world):
    _, stats = world
    assert stats["splits"] == {"train": {"scenes": 2, "samples": 6}, "val": {"scenes": 1, "samples": 3}}
    inst = stats["instances_per_sample"]
    assert inst["boundary"]["min"] >= 1 and inst["divider"]["max"] >= 1
    assert 0 <= stats["share_of_samples"]["curve"] <= 1
    assert stats["brightness"]["min"] > 10 and stats["brightness"]["max"] < 245
    assert stats["floors"] == FLOORS and stats["floors_checked"] == "boundary_min only"
    json.dumps(stats)  # serializable as the stage's stats file


def test_stats_counts_match_the_devkit_ground_truth(world, nusc, maps):
    """The generator's own instance counts equal MapTR-style counts from the devkit's patch geometry."""
    from shapely.geometry import MultiLineString, box
    from shapely.ops import linemerge

    def parts(geom) -> int:
        return 0 if geom.is_empty else len(getattr(geom, "geoms", [geom]))

    inner = box(-14.8, -29.8, 14.8, 29.8)  # MapTR shrinks the patch so clip edges are no boundary
    totals = {"divider": 0, "ped_crossing": 0, "boundary": 0}
    for sample in nusc.sample:
        l2g = _lidar2global(nusc, sample)
        yaw = math.degrees(math.atan2(l2g[1, 0], l2g[0, 0]))
        layers = ["road_divider", "lane_divider", "ped_crossing", "road_segment", "lane"]
        geom = dict(maps[_location(nusc, sample)].get_map_geom((l2g[0, 3], l2g[1, 3], 60, 30), yaw, layers))
        totals["divider"] += sum(parts(g) for g in geom["road_divider"] + geom["lane_divider"])
        totals["ped_crossing"] += parts(unary_union(geom["ped_crossing"])) if geom["ped_crossing"] else 0
        road = unary_union(geom["road_segment"] + geom["lane"])
        rings = [r for p in getattr(road, "geoms", [road]) for r in [p.exterior, *p.interiors]]
        outline = MultiLineString([np.asarray(r.coords) for r in rings]).intersection(inner)
        totals["boundary"] += parts(linemerge(outline) if outline.geom_type == "MultiLineString" else outline)
    stats = world[1]["instances_per_sample"]
    for name, total in totals.items():
        assert stats[name]["mean"] == pytest.approx(total / len(nusc.sample), abs=0.12), name


def test_floor_check_flags_a_poor_world():
    good = {
        "instances_per_sample": {"boundary": {"min": 1, "mean": 2.5}, "divider": {"mean": 3.0}},
        "share_of_samples": {"ped_crossing": 0.4, "junction": 0.3, "curve": 0.5},
        "brightness": {"scene_spread": 90.0},
    }
    assert check_floors(good, num_samples=500) == []
    poor = json.loads(json.dumps(good))
    poor["share_of_samples"]["junction"] = 0.05
    poor["instances_per_sample"]["boundary"]["min"] = 0
    failures = check_floors(poor, num_samples=500)
    assert len(failures) == 2 and any("junction_share" in f for f in failures)
    assert len(check_floors(poor, num_samples=10)) == 1  # tiny worlds: only the per-sample floor


def test_same_seed_is_byte_identical_other_seed_differs(world, tmp_path):
    root, _ = world
    again = tmp_path / "again"
    generate_world(again, seed=0, workers=2, **TINY)  # other worker count, same bytes
    for name in ("sample_data", "ego_pose", "scene", "calibrated_sensor"):
        assert (again / VERSION / f"{name}.json").read_bytes() == (root / VERSION / f"{name}.json").read_bytes()
    for loc in LOCATIONS:
        rel = Path("maps") / "expansion" / f"{loc}.json"
        assert (again / rel).read_bytes() == (root / rel).read_bytes()
    files = sorted((root / "samples" / "CAM_FRONT").iterdir())
    assert (again / "samples" / "CAM_FRONT" / files[4].name).read_bytes() == files[4].read_bytes()

    other = tmp_path / "other"
    generate_world(other, seed=1, workers=1, **TINY)
    assert (other / VERSION / "ego_pose.json").read_bytes() != (root / VERSION / "ego_pose.json").read_bytes()
    other_files = sorted((other / "samples" / "CAM_FRONT").iterdir())
    assert other_files[4].read_bytes() != files[4].read_bytes()


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = scene_module.render_camera

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("renderer crashed")
        return original(*args, **kwargs)

    monkeypatch.setattr(scene_module, "render_camera", failing)
    out = tmp_path / "nuscenes"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        generate_world(out, seed=0, workers=1, **TINY)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_variety_floors_are_enforced(tmp_path, monkeypatch):
    monkeypatch.setattr("maptr.data.synthetic.world.check_floors", lambda stats, n: ["junction_share 0 < 0.2"])
    out = tmp_path / "nuscenes"
    with pytest.raises(WorldBelowFloorError, match="junction_share"):
        generate_world(out, seed=0, workers=1, **{**TINY, "train_scenes": 1, "val_scenes": 0, "samples_per_scene": 1})
    assert not out.exists()
