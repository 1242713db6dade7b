"""A packed split in one ``.npz`` file that loads with numpy alone: no LMDB, no pickle.

The GPU check (``benchmarks/gpu_check.py``) runs on machines that have torch, numpy and OpenCV but not
lmdb, shapely or nuscenes-devkit, and that receive only a source tree. It reads its samples from this
file, written here on the pipeline's machine from a packed LMDB (``write_portable``). The file holds
the same records as the LMDB (the six JPEGs exactly as packed, the camera geometry) and the same metas
(ground-truth vectors and labels), so :class:`PortableMapDataset` is :class:`PackedMapDataset` with
another record store: decoding (including the reduced-scale JPEG decode), resizing, targets, augmentation
and the item cache are the same code.

Arrays of a file of S samples with Ncam cameras:

    format          () str, FORMAT
    metas           () str, JSON {"info": pack info + "source", "samples": metas (key = position), "cams"}
    tokens          (S,) str
    jpeg_data       (total bytes,) uint8, every JPEG one after the other (sample-major, camera-minor)
    jpeg_offsets    (S * Ncam + 1,) int64, JPEG i is jpeg_data[offsets[i]:offsets[i + 1]]
    image_sizes     (S, Ncam, 2) int64 [width, height]
    intrinsics      (S, Ncam, 3, 3) float32
    cam2ego         (S, Ncam, 4, 4) float32;  cam_ego2global (S, Ncam, 4, 4) float64
    lidar2ego       (S, 4, 4) float32;        ego2global (S, 4, 4) float64
    lidar2img       (S, Ncam, 4, 4) float32
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maptr.atomic import atomic_file
from maptr.data.dataset import DatasetOptions, PackedMapDataset
from maptr.data.records import CorruptRecordError, SampleRecord

FORMAT = "maptr-portable-v1"
_GEOMETRY = {  # record field -> dtype, as SampleRecord.decode gives them
    "image_sizes": np.int64,
    "intrinsics": np.float32,
    "cam2ego": np.float32,
    "cam_ego2global": np.float64,
    "lidar2ego": np.float32,
    "ego2global": np.float64,
    "lidar2img": np.float32,
}


def write_portable(dataset: PackedMapDataset, indices: Sequence[int], out: str | Path) -> dict[str, Any]:
    """Write samples ``indices`` of a packed split (records and metas, unchanged) to ``out`` atomically.

    Returns a summary: samples, cameras, image size of the first camera, file size in bytes.
    """
    if not indices:
        raise ValueError(f"{out}: no samples to write")
    records = [dataset.read_record(i) for i in indices]
    cams = records[0].cams
    for i, rec in zip(indices, records, strict=True):
        if rec.cams != cams:
            raise CorruptRecordError(f"{dataset.record_name(i)}: cameras {rec.cams} differ from {cams}")
    jpegs = [j for rec in records for j in rec.jpegs]
    offsets = np.cumsum([0, *(len(j) for j in jpegs)]).astype(np.int64)
    samples = [
        {**dataset.samples[i], "key": pos, "source_key": dataset.samples[i]["key"]} for pos, i in enumerate(indices)
    ]
    info = {**dataset.info, "source": f"{dataset.root} {dataset.split}", "num_samples": len(samples)}
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "metas": np.array(json.dumps({"info": info, "samples": samples, "cams": list(cams)})),
        "tokens": np.array([rec.token for rec in records]),
        "jpeg_data": np.frombuffer(b"".join(jpegs), dtype=np.uint8),
        "jpeg_offsets": offsets,
    }
    for name, dtype in _GEOMETRY.items():
        arrays[name] = np.stack([np.asarray(getattr(rec, name), dtype=dtype) for rec in records])
    with atomic_file(out) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **arrays)
    width, height = (int(v) for v in arrays["image_sizes"][0, 0])
    return {
        "samples": len(records),
        "cameras": len(cams),
        "image_size": [width, height],
        "bytes": Path(out).stat().st_size,
    }


class PortableMapDataset(PackedMapDataset):
    """:class:`PackedMapDataset` over a file of :func:`write_portable`, held in memory (a few MB).

    Args:
        path: the ``.npz`` file.
        opts: sizes and augmentation switches, as for the LMDB dataset.
    Items and batches: exactly those of :class:`PackedMapDataset` (see there).
    """

    def __init__(self, path: str | Path, opts: DatasetOptions) -> None:
        self.root = self.path = Path(path)
        self.split = "portable"
        self.opts = opts
        self.lmdb_path = self.path  # named in the parent's messages
        fix = "regenerate it with `make gpu-check-data` on the pipeline's machine"
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: portable packed set not found; {fix}")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CorruptRecordError(f"{self.path}: not a readable .npz ({exc}); {fix}") from None
        missing = sorted({"format", "metas", "tokens", "jpeg_data", "jpeg_offsets", *_GEOMETRY} - set(data))
        if missing or str(data["format"]) != FORMAT:
            found = str(data.get("format", "no format entry"))
            raise CorruptRecordError(f"{self.path}: not a {FORMAT} file ({found}; missing {missing}); {fix}")
        metas = json.loads(str(data["metas"]))
        self.cams: list[str] = metas["cams"]
        self._tokens = [str(t) for t in data["tokens"]]
        self._jpeg_data = data["jpeg_data"]
        self._offsets = data["jpeg_offsets"]
        self._geometry = {name: data[name] for name in _GEOMETRY}
        count, ncam = len(metas["samples"]), len(self.cams)
        if len(self._offsets) != count * ncam + 1 or self._offsets[-1] != len(self._jpeg_data):
            raise CorruptRecordError(f"{self.path}: JPEG offsets do not match {count} samples x {ncam} cameras; {fix}")
        for name, array in self._geometry.items():
            if len(array) != count:
                raise CorruptRecordError(f"{self.path}: {name} has {len(array)} rows for {count} samples; {fix}")
        self._setup(metas["info"], metas["samples"], opts, str(self.path))

    def record_name(self, index: int) -> str:
        return f"{self.path} sample {index}"

    def read_record(self, index: int) -> SampleRecord:
        ncam = len(self.cams)
        first = index * ncam
        jpegs = [self._jpeg_data[self._offsets[k] : self._offsets[k + 1]].tobytes() for k in range(first, first + ncam)]
        return SampleRecord(
            token=self._tokens[index],
            cams=list(self.cams),
            jpegs=jpegs,
            **{name: array[index] for name, array in self._geometry.items()},
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """[width, height] of the first camera of the first sample (the stored JPEGs' size)."""
        width, height = self._geometry["image_sizes"][0, 0]
        return int(width), int(height)
