"""Shared, expensive fixtures: one tiny synthetic nuScenes world and its packed form per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from maptr.data.packing import pack_nuscenes
from maptr.data.synthetic import generate_world

PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
CLASSES = ["divider", "ped_crossing", "boundary"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """2 train + 1 val scenes x 4 key frames, 480x270 cameras (the default image size)."""
    root = tmp_path_factory.mktemp("world") / "nuscenes"
    generate_world(
        root, seed=0, version="v1.0-trainval", train_scenes=2, val_scenes=1, samples_per_scene=4,
        image_width=480, image_height=270, jpeg_quality=90, workers=1, check_variety=False, progress=False,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def packed_world(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "packed"
    pack_nuscenes(dataroot=str(tiny_world), version="v1.0-trainval", out=str(out), pc_range=PC_RANGE, classes=CLASSES)
    return out
