"""The GPU check's data: two portable packed sets (``maptr.data.portable``) and a manifest, in one folder.

- ``r50.npz``: a few samples of a synthetic world rendered at nuScenes' camera size (1600x900 JPEGs,
  ~1 MB per sample): what the r50 preset's steps and inference read, so the loader does the real work
  of a nuScenes sample (the 1/2-scale JPEG decode to 800x450, padding to 800x480, the targets).
- ``learn.npz``: the training samples of a small world at the pipeline's default camera size
  (``synth.image_width`` x ``synth.image_height``, 480x270, ~0.2 MB per sample) that nano is trained on
  until its train-set mAP passes the target.
- ``manifest.json``: what made them (seed, sizes, counts, SHA-256 of each file).

:func:`make_check_data` runs on the pipeline's machine (it needs the synthetic world's and the packer's
dependencies: nuscenes-devkit, shapely, lmdb); :func:`check_data` runs on the GPU machine with numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from maptr.atomic import write_text_atomic

NUSCENES_IMAGE_SIZE = (1600, 900)
FILES = ("r50.npz", "learn.npz")
FIX = "make it on the pipeline's machine with `make gpu-check-data` and bring the folder (device tool: carry it)"


class CheckDataError(RuntimeError):
    """The GPU check's data folder is missing or stale: names the file and the fix."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _world_and_pack(
    root: Path,
    name: str,
    *,
    seed: int,
    version: str,
    scenes: int,
    samples: int,
    size: tuple[int, int],
    jpeg_quality: int,
    pc_range: list[float],
) -> Path:
    """A synthetic world of ``scenes`` train scenes x ``samples`` key frames, packed; returns the packed root."""
    from maptr.data.packing import pack_nuscenes
    from maptr.data.synthetic import generate_world

    world = root / f"{name}_nuscenes"
    generate_world(
        world,
        seed=seed,
        version=version,
        train_scenes=scenes,
        val_scenes=1,  # pack refuses an empty split; the check reads the train split only
        samples_per_scene=samples,
        image_width=size[0],
        image_height=size[1],
        jpeg_quality=jpeg_quality,
        workers=1,
        check_variety=False,
        progress=False,
    )
    packed = root / f"{name}_packed"
    pack_nuscenes(dataroot=str(world), version=version, out=str(packed), pc_range=pc_range)
    shutil.rmtree(world)
    return packed


def make_check_data(
    out: str | Path,
    params: dict[str, Any],
    *,
    r50_samples: int = 4,
    learn_scenes: int = 2,
    learn_samples_per_scene: int = 8,
) -> dict[str, Any]:
    """Write ``r50.npz``, ``learn.npz`` and ``manifest.json`` into ``out`` (a few MB); returns the manifest.

    Args:
        out: folder (created; its two files and the manifest are replaced).
        params: loaded params.yaml (sections ``synth`` and ``pack``).
        r50_samples: key frames of the 1600x900 world (one scene).
        learn_scenes / learn_samples_per_scene: the learn set's world (train scenes only).
    """
    from maptr.config import PackConfig, SynthConfig, load_section
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.data.portable import write_portable

    synth = load_section(params, "synth", SynthConfig)
    pack = load_section(params, "pack", PackConfig)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "seed": synth.seed,
        "version": synth.version,
        "jpeg_quality": synth.jpeg_quality,
        "pc_range": pack.pc_range,
    }
    plans = {
        "r50.npz": {"scenes": 1, "samples": r50_samples, "size": NUSCENES_IMAGE_SIZE},
        "learn.npz": {
            "scenes": learn_scenes,
            "samples": learn_samples_per_scene,
            "size": (synth.image_width, synth.image_height),
        },
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
        for file, plan in plans.items():
            packed = _world_and_pack(Path(tmp), file.split(".")[0], **plan, **common)
            dataset = PackedMapDataset(packed, "train", DatasetOptions(pc_range=tuple(pack.pc_range)))
            write_portable(dataset, list(range(len(dataset))), out / file)
    return write_manifest(out, {"seed": synth.seed, "pc_range": pack.pc_range, "made_by": "make_check_data"})


def write_manifest(folder: str | Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Describe ``r50.npz`` and ``learn.npz`` of ``folder`` (samples, image size, bytes, SHA-256) in its
    ``manifest.json``, with ``extra`` entries; returns the manifest."""
    from maptr.data.dataset import DatasetOptions
    from maptr.data.portable import PortableMapDataset

    folder = Path(folder)
    manifest: dict[str, Any] = {**extra, "files": {}}
    for file in FILES:
        path = folder / file
        dataset = PortableMapDataset(path, DatasetOptions(pc_range=tuple(extra["pc_range"])))
        scenes = sorted({s["scene"] for s in dataset.samples})
        manifest["files"][file] = {
            "samples": len(dataset),
            "cameras": len(dataset.cams),
            "image_size": list(dataset.image_size),
            "scenes": scenes,
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
        }
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_data(folder: str | Path, require_nuscenes_size: bool = True) -> dict[str, Any]:
    """The manifest of a data folder after checking that its files are there and unchanged.

    Raises CheckDataError naming the missing or changed file. With ``require_nuscenes_size`` the r50
    set must hold 1600x900 images (the GPU run; the CPU smoke test packs smaller ones).
    """
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckDataError(f"{manifest_path}: GPU-check data not found; {FIX}")
    manifest = json.loads(manifest_path.read_text())
    for file in FILES:
        path = folder / file
        entry = manifest.get("files", {}).get(file)
        if entry is None or not path.is_file():
            raise CheckDataError(f"{path}: missing (or not in {manifest_path}); {FIX}")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise CheckDataError(f"{path}: differs from {manifest_path} (size or SHA-256); {FIX}")
    size = tuple(manifest["files"]["r50.npz"]["image_size"])
    if require_nuscenes_size and size != NUSCENES_IMAGE_SIZE:
        raise CheckDataError(
            f"{folder / 'r50.npz'}: images are {size[0]}x{size[1]}, the r50 figures need nuScenes' 1600x900; {FIX}"
        )
    return manifest
