"""Pack a nuScenes-format root (real or synthetic) into LMDB + metas with nuscenes-devkit.

Output layout (written to a temporary sibling folder, renamed into place when complete)::

    <out>/train_lmdb, <out>/val_lmdb   one SampleRecord per key frame (six JPEGs + geometry), key = index
    <out>/metas/train.json, val.json   sample index + vectorized map ground truth (LiDAR frame, meters)
    <out>/metas/info.json              version, dataroot, pc_range, classes, counts

The split is decided by scene name with ``nuscenes.utils.splits``, so synthetic and real data are split
by the same code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import lmdb
import numpy as np
from tqdm import tqdm

from maptr.atomic import atomic_dir
from maptr.data import rigid
from maptr.classes import CLASS_NAMES
from maptr.data.map_vectors import MapGroundTruth
from maptr.data.records import SampleRecord

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
TABLES = (
    "attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
    "sample_annotation", "sample_data", "scene", "sensor", "visibility",
)  # fmt: skip
SPLITS = {
    "v1.0-trainval": ("train", "val"),
    "v1.0-mini": ("mini_train", "mini_val"),
}
LMDB_MAP_SIZE = 1 << 40  # virtual size only: LMDB grows the file as it is written


class PackError(RuntimeError):
    """A nuScenes root that cannot be packed: names the file and the problem."""


def resolve_version(dataroot: str | Path, version: str) -> str:
    """``version`` itself, or for ``auto`` the one ``v1.0-*`` table folder under ``dataroot``: a real nuScenes
    root then needs only ``-S pack.dataroot=...``, whether it holds v1.0-mini or v1.0-trainval."""
    if version != "auto":
        return version
    root = Path(dataroot)
    if not root.is_dir():
        raise PackError(f"{root}: nuScenes root not found (pack.dataroot in params.yaml)")
    found = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir())
    if len(found) != 1:
        held = f"holds {', '.join(found)}" if found else "holds no v1.0-* table folder"
        raise PackError(f"{root} {held}: set pack.version to the one to pack ({', '.join(sorted(SPLITS))})")
    return found[0]


def open_nuscenes(dataroot: str | Path, version: str):
    """``NuScenes(version, dataroot)`` with errors that name the missing or malformed table."""
    from nuscenes.nuscenes import NuScenes

    root = Path(dataroot)
    table_dir = root / version
    if not table_dir.is_dir():
        raise PackError(f"{table_dir}: nuScenes table folder not found (pack.dataroot / pack.version in params.yaml)")
    for name in TABLES:
        path = table_dir / f"{name}.json"
        if not path.is_file():
            raise PackError(f"{path}: table missing; a nuScenes root needs all 13 tables")
    try:
        return NuScenes(version=version, dataroot=str(root), verbose=False)
    except json.JSONDecodeError:
        for name in TABLES:  # only on failure: find which table is malformed
            path = table_dir / f"{name}.json"
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise PackError(f"{path}: malformed JSON table ({exc})") from None
        raise
    except (KeyError, AssertionError, IndexError) as exc:
        raise PackError(f"{table_dir}: nuScenes tables are inconsistent ({type(exc).__name__}: {exc})") from None


def sample_geometry(nusc, sample: dict) -> dict:
    """Camera and LiDAR geometry of one key frame (all (4, 4) or (3, 3) float64 arrays).

    Computed with :mod:`maptr.data.rigid`, not numpy's BLAS-backed products: the records hold these floats
    in full, so they must come out bit-identical on every CPU for DVC to see the same ``data/packed``.
    """
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    lidar_pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    lidar2ego = rigid.transform_matrix(lidar_cs["translation"], lidar_cs["rotation"])
    ego2global = rigid.transform_matrix(lidar_pose["translation"], lidar_pose["rotation"])
    lidar2global = rigid.chain(ego2global, lidar2ego)
    out: dict = {"lidar2ego": lidar2ego, "ego2global": ego2global, "lidar2global": lidar2global}
    cams = {k: [] for k in ("paths", "sizes", "intrinsics", "cam2ego", "cam_ego2global", "lidar2img")}
    for cam in CAMERAS:
        sd = nusc.get("sample_data", sample["data"][cam])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        cam2ego = rigid.transform_matrix(cs["translation"], cs["rotation"])
        cam_ego2global = rigid.transform_matrix(pose["translation"], pose["rotation"])
        lidar2cam = rigid.chain(rigid.inverse(rigid.chain(cam_ego2global, cam2ego)), lidar2global)
        k4 = np.eye(4)
        k4[:3, :3] = np.asarray(cs["camera_intrinsic"])
        cams["paths"].append(Path(nusc.dataroot) / sd["filename"])
        cams["sizes"].append([sd["width"], sd["height"]])
        cams["intrinsics"].append(np.asarray(cs["camera_intrinsic"]))
        cams["cam2ego"].append(cam2ego)
        cams["cam_ego2global"].append(cam_ego2global)
        cams["lidar2img"].append(rigid.matmul(k4, lidar2cam))
    out.update({k: (v if k == "paths" else np.asarray(v)) for k, v in cams.items()})
    return out


def _read_bytes(path: Path) -> bytes:
    """A camera image's bytes, checked to be a complete JPEG (a broken one must fail here, naming its file,
    not epochs later inside training where only the packed record can be named)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PackError(f"{path}: image listed in sample_data.json is missing") from None
    problem = jpeg_problem(data)
    if problem:
        raise PackError(f"{path}: corrupt camera image ({problem}); restore the file from the dataset "
                        "(re-run synth for the synthetic world), then re-run pack")  # fmt: skip
    return data


@contextlib.contextmanager
def _stderr_text() -> Iterator[list[str]]:
    """Collect what C libraries write to file descriptor 2 inside the block (libjpeg prints its warnings
    there and decodes on); the list holds the text after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    text: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace").strip())


def jpeg_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete, clean JPEG, or None.

    Checks the start and end markers, then decodes at 1/8 scale (the whole entropy-coded stream is still
    read) treating libjpeg's warnings as errors: for corrupt data libjpeg only warns ("Corrupt JPEG data:
    premature end of data segment") and fills the damaged blocks with grey.
    """
    if not data.startswith(b"\xff\xd8"):
        return "no JPEG start marker: not a JPEG file"
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):  # some writers pad after the end marker
        return "no JPEG end marker: the file is truncated"
    with _stderr_text() as warnings:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    if img is None:
        return "does not decode"
    if warnings[0]:
        return f"libjpeg: {warnings[0].splitlines()[0]}"
    return None


def _check_no_empty_split(nusc, split_of: dict[str, str], dataroot: str, version: str) -> None:
    """Both splits need scenes: an empty val split would train, score mAP 0.0 and fail at the end."""
    present = {split_of[s["name"]] for s in nusc.scene if s["name"] in split_of}
    for split, key in zip(("train", "val"), SPLITS[version], strict=True):
        if split not in present:
            raise PackError(
                f"{Path(dataroot) / version}: the {split} split is empty (no scene of nuscenes.utils.splits.{key}); "
                f"every stage needs both splits (synthetic world: set synth.{split}_scenes >= 1 and re-run synth)"
            )


def pack_nuscenes(*, dataroot: str, version: str, out: str, pc_range: list[float]) -> dict:
    """Pack ``dataroot`` into ``out`` atomically; returns the info dict (counts per split).

    Args:
        dataroot: nuScenes root holding ``<version>/``, ``samples/`` and ``maps/expansion/``.
        version: ``v1.0-trainval``, ``v1.0-mini`` or ``auto`` (:func:`resolve_version`).
        out: output folder (replaced when packing succeeds, untouched when it fails).
        pc_range: perception range in the LiDAR frame, [x0, y0, z0, x1, y1, z1].
    """
    from nuscenes.utils import splits

    version = resolve_version(dataroot, version)
    if version not in SPLITS:
        raise PackError(f"pack.version: {version!r} is not one of {sorted(SPLITS)}")
    nusc = open_nuscenes(dataroot, version)
    train_key, val_key = SPLITS[version]
    split_of = {name: "train" for name in getattr(splits, train_key)}
    split_of.update({name: "val" for name in getattr(splits, val_key)})
    _check_no_empty_split(nusc, split_of, dataroot, version)

    with atomic_dir(out) as tmp:
        (tmp / "metas").mkdir()
        metas = _pack_splits(nusc, dataroot, tmp, split_of, pc_range)
        info = {
            "version": version,
            "dataroot": str(dataroot),
            "pc_range": pc_range,
            "classes": list(CLASS_NAMES),
            "cameras": list(CAMERAS),
            "num_samples": {s: len(v) for s, v in metas.items()},
        }
        if not any(metas.values()):
            raise PackError(f"{dataroot}/{version}: no scene belongs to the official {SPLITS[version]} splits")
        for split, samples in metas.items():
            (tmp / "metas" / f"{split}.json").write_text(json.dumps({"info": info, "samples": samples}))
        (tmp / "metas" / "info.json").write_text(json.dumps(info, indent=2))
    return info


def _pack_splits(nusc, dataroot: str, tmp: Path, split_of: dict[str, str], pc_range: list[float]) -> dict:
    """Write every key frame of the split scenes into ``tmp/<split>_lmdb``; return the metas per split."""
    from nuscenes.map_expansion.map_api import NuScenesMap

    maps: dict[str, MapGroundTruth] = {}
    metas: dict[str, list] = {"train": [], "val": []}
    # lock=False: one writer in a private temporary folder needs no lock file, and LMDB's lock.mdb holds
    # process-specific bytes that would make two packings of the same data differ for DVC.
    envs = {s: lmdb.open(str(tmp / f"{s}_lmdb"), map_size=LMDB_MAP_SIZE, subdir=True, lock=False) for s in metas}
    scenes = [s for s in nusc.scene if s["name"] in split_of]
    bar = tqdm(total=sum(s.get("nbr_samples", 0) for s in scenes) or None, desc="pack", unit="sample")
    try:
        for scene in scenes:
            split = split_of[scene["name"]]
            location = nusc.get("log", scene["log_token"])["location"]
            if location not in maps:
                try:
                    maps[location] = MapGroundTruth(NuScenesMap(dataroot=dataroot, map_name=location), pc_range)
                except FileNotFoundError as exc:
                    raise PackError(f"{exc.filename}: map expansion missing for location {location!r}") from None
            token = scene["first_sample_token"]
            with envs[split].begin(write=True) as txn:
                while token:
                    sample = nusc.get("sample", token)
                    geo = sample_geometry(nusc, sample)
                    record = SampleRecord(
                        token=token,
                        cams=list(CAMERAS),
                        jpegs=[_read_bytes(p) for p in geo["paths"]],
                        image_sizes=geo["sizes"],
                        intrinsics=geo["intrinsics"],
                        cam2ego=geo["cam2ego"],
                        cam_ego2global=geo["cam_ego2global"],
                        lidar2ego=geo["lidar2ego"],
                        ego2global=geo["ego2global"],
                        lidar2img=geo["lidar2img"],
                    )
                    key = len(metas[split])
                    txn.put(str(key).encode(), record.encode())
                    instances = maps[location].instances(geo["lidar2global"])
                    metas[split].append(
                        {
                            "key": key,
                            "token": token,
                            "scene": scene["name"],
                            "location": location,
                            "timestamp": sample["timestamp"],
                            "labels": [inst.label for inst in instances],
                            "vectors": [np.round(inst.points, 3).tolist() for inst in instances],
                        }
                    )
                    token = sample["next"]
                    bar.update(1)
    finally:
        bar.close()
        for env in envs.values():
            env.close()
    return metas
