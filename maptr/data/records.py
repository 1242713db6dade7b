"""The binary layout of one packed sample in the LMDB: a JSON header and the six JPEGs, checksummed.

Layout: ``b"MTR1"`` | header length (uint32, little endian) | header (UTF-8 JSON) | JPEG bytes, one after
the other. The header holds the camera names, the byte length of each JPEG, a CRC32 of the JPEG payload
and the camera geometry as nested lists. No pickle anywhere: a record is data, never code.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"MTR1"


class CorruptRecordError(ValueError):
    """A packed record that cannot be decoded: names the LMDB, the key and the problem."""


@dataclass
class SampleRecord:
    """One key frame: six JPEGs and the geometry that places them.

    Attributes:
        token: nuScenes sample token.
        cams: (Ncam,) camera channel names, in the order of every per-camera array.
        jpegs: (Ncam,) encoded JPEG bytes as stored in the nuScenes folder.
        image_sizes: (Ncam, 2) original image [width, height] in pixels.
        intrinsics: (Ncam, 3, 3) camera matrices K for the original images.
        cam2ego: (Ncam, 4, 4) camera -> ego (calibrated_sensor).
        cam_ego2global: (Ncam, 4, 4) ego -> global at each camera's timestamp.
        lidar2ego: (4, 4) LiDAR -> ego; ego2global: (4, 4) ego -> global at the LiDAR timestamp.
        lidar2img: (Ncam, 4, 4) LiDAR -> pixels of the original images, (x, y, z, 1) -> (u d, v d, d, 1).
    """

    token: str
    cams: list[str]
    jpegs: list[bytes]
    image_sizes: np.ndarray
    intrinsics: np.ndarray
    cam2ego: np.ndarray
    cam_ego2global: np.ndarray
    lidar2ego: np.ndarray
    ego2global: np.ndarray
    lidar2img: np.ndarray

    def encode(self) -> bytes:
        payload = b"".join(self.jpegs)
        header = {
            "token": self.token,
            "cams": self.cams,
            "jpeg_sizes": [len(j) for j in self.jpegs],
            "crc32": zlib.crc32(payload),
            "image_sizes": np.asarray(self.image_sizes).tolist(),
            "intrinsics": np.asarray(self.intrinsics).tolist(),
            "cam2ego": np.asarray(self.cam2ego).tolist(),
            "cam_ego2global": np.asarray(self.cam_ego2global).tolist(),
            "lidar2ego": np.asarray(self.lidar2ego).tolist(),
            "ego2global": np.asarray(self.ego2global).tolist(),
            "lidar2img": np.asarray(self.lidar2img).tolist(),
        }
        head = json.dumps(header).encode()
        return MAGIC + struct.pack("<I", len(head)) + head + payload

    @classmethod
    def decode(cls, blob: bytes, where: str) -> SampleRecord:
        """Parse and verify a record; ``where`` (e.g. ``"data/packed/val_lmdb key 12"``) names it in errors."""
        if len(blob) < 8 or blob[:4] != MAGIC:
            raise CorruptRecordError(f"{where}: not a maptr record (bad magic); re-run the pack stage")
        (head_len,) = struct.unpack("<I", blob[4:8])
        try:
            header = json.loads(blob[8 : 8 + head_len])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptRecordError(f"{where}: header is not valid JSON ({exc}); re-run the pack stage") from None
        payload = blob[8 + head_len :]
        sizes = header.get("jpeg_sizes", [])
        if sum(sizes) != len(payload) or zlib.crc32(payload) != header.get("crc32"):
            raise CorruptRecordError(
                f"{where}: image payload fails its checksum (truncated or corrupted); re-run the pack stage"
            )
        offsets = np.cumsum([0, *sizes])
        jpegs = [payload[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
        f32 = np.float32
        return cls(
            token=header["token"],
            cams=header["cams"],
            jpegs=jpegs,
            image_sizes=np.asarray(header["image_sizes"], dtype=np.int64),
            intrinsics=np.asarray(header["intrinsics"], dtype=f32),
            cam2ego=np.asarray(header["cam2ego"], dtype=f32),
            cam_ego2global=np.asarray(header["cam_ego2global"], dtype=np.float64),
            lidar2ego=np.asarray(header["lidar2ego"], dtype=f32),
            ego2global=np.asarray(header["ego2global"], dtype=np.float64),
            lidar2img=np.asarray(header["lidar2img"], dtype=f32),
        )
