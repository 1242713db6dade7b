"""The pack stage: devkit -> LMDB + map ground truth, atomic, with errors that name the broken file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import CLASSES, PC_RANGE

from maptr.data.dataset import DatasetOptions, PackedMapDataset
from maptr.data.packing import PackError, pack_nuscenes
from maptr.data.records import CorruptRecordError, SampleRecord

REPO = Path(__file__).resolve().parents[1]


def test_pack_layout_counts_and_split(packed_world):
    info = json.loads((packed_world / "metas" / "info.json").read_text())
    assert info["num_samples"] == {"train": 8, "val": 4}
    assert info["pc_range"] == PC_RANGE and info["classes"] == CLASSES
    from nuscenes.utils import splits

    for split, names in (("train", splits.train), ("val", splits.val)):
        metas = json.loads((packed_world / "metas" / f"{split}.json").read_text())["samples"]
        assert {s["scene"] for s in metas} <= set(names)
        assert [s["key"] for s in metas] == list(range(len(metas)))


def test_packing_twice_gives_identical_files(tiny_world, tmp_path):
    """DVC hashes data/packed: the same world must pack to the same bytes (and no LMDB lock file)."""
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        pack_nuscenes(dataroot=str(tiny_world), version="v1.0-trainval", out=str(out), pc_range=PC_RANGE)
        files = sorted(p for p in out.rglob("*") if p.is_file())
        digests.append({str(p.relative_to(out)): hashlib.md5(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
    assert set(digests[0]) == {"metas/info.json", "metas/train.json", "metas/val.json", "train_lmdb/data.mdb",
                               "val_lmdb/data.mdb"}  # fmt: skip


def test_records_hold_six_cameras_and_consistent_geometry(packed_world):
    ds = PackedMapDataset(packed_world, "train", DatasetOptions())
    rec = ds.read_record(0)
    assert rec.cams[0] == "CAM_FRONT" and len(rec.jpegs) == 6
    assert rec.lidar2img.shape == (6, 4, 4) and rec.intrinsics.shape == (6, 3, 3)
    # lidar2img must equal K @ inv(cam_ego2global @ cam2ego) @ ego2global @ lidar2ego
    for c in range(6):
        k4 = np.eye(4)
        k4[:3, :3] = rec.intrinsics[c]
        expect = k4 @ np.linalg.inv(rec.cam_ego2global[c] @ rec.cam2ego[c]) @ rec.ego2global @ rec.lidar2ego
        assert np.allclose(rec.lidar2img[c], expect, atol=1e-3)
    # a point 10 m ahead of the car on the ground is seen by CAM_FRONT near the image's middle column
    ahead = np.linalg.inv(rec.lidar2ego) @ np.array([10.0, 0.0, 0.0, 1.0])  # ego x forward -> LiDAR
    u, v, d = (rec.lidar2img[0] @ ahead)[:3]
    assert d > 0 and abs(u / d - rec.image_sizes[0][0] / 2) < 40 and v / d > rec.image_sizes[0][1] / 2


def test_ground_truth_in_range_and_classes_present(packed_world):
    for split in ("train", "val"):
        metas = json.loads((packed_world / "metas" / f"{split}.json").read_text())["samples"]
        labels = np.concatenate([s["labels"] for s in metas])
        assert set(labels.tolist()) <= {0, 1, 2} and (labels == 0).any() and (labels == 2).any()
        pts = np.concatenate([np.asarray(v) for s in metas for v in s["vectors"]])
        assert pts[:, 0].min() >= -15.0 - 1e-3 and pts[:, 0].max() <= 15.0 + 1e-3
        assert pts[:, 1].min() >= -30.0 - 1e-3 and pts[:, 1].max() <= 30.0 + 1e-3


def test_pack_cli_help_and_missing_root_error(tmp_path):
    out = subprocess.run([sys.executable, "pipeline/pack.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--out" in out.stdout
    res = subprocess.run(
        [sys.executable, "pipeline/pack.py", "--dataroot", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'none'}: nuScenes root not found (pack.dataroot in params.yaml)" in res.stderr
    assert not (tmp_path / "o").exists()


def copy_world(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_broken_table_is_named(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "w")
    table = root / "v1.0-trainval" / "ego_pose.json"
    table.write_text(table.read_text()[:-20])
    with pytest.raises(PackError, match=r"ego_pose.json: malformed JSON table"):
        pack_nuscenes(dataroot=str(root), version="v1.0-trainval", out=str(tmp_path / "o"), pc_range=PC_RANGE)
    (root / "v1.0-trainval" / "sensor.json").unlink()
    with pytest.raises(PackError, match=r"sensor.json: table missing"):
        pack_nuscenes(dataroot=str(root), version="v1.0-trainval", out=str(tmp_path / "o"), pc_range=PC_RANGE)
    assert not (tmp_path / "o").exists()


def test_missing_image_is_named_and_nothing_is_left(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "w")
    victim = sorted((root / "samples" / "CAM_BACK").glob("*.jpg"))[-1]
    victim.unlink()
    out = tmp_path / "packed"
    with pytest.raises(PackError, match=re.escape(f"{victim}: image listed in sample_data.json is missing")):
        pack_nuscenes(dataroot=str(root), version="v1.0-trainval", out=str(out), pc_range=PC_RANGE)
    assert not out.exists() and not list(tmp_path.glob("packed.tmp-*")), "a failed pack left output behind"


def test_corrupt_lmdb_record_is_named(packed_world, tmp_path):
    packed = copy_world(packed_world, tmp_path / "packed")
    env = lmdb.open(str(packed / "val_lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        blob = bytearray(txn.get(b"2"))
        blob[-100] ^= 0xFF  # flip bits inside a JPEG
        txn.put(b"2", bytes(blob))
    env.close()
    ds = PackedMapDataset(packed, "val", DatasetOptions())
    ds[1]  # an intact record still loads
    with pytest.raises(CorruptRecordError, match=r"val_lmdb record 2: image payload fails its checksum"):
        ds[2]
    with pytest.raises(CorruptRecordError, match="bad magic"):
        SampleRecord.decode(b"garbage!", "somewhere")
