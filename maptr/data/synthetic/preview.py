"""Six-camera mosaics of nuScenes-format samples (README figures, eyeballing a generated world).

Layout as nuScenes shows it: FRONT_LEFT, FRONT, FRONT_RIGHT on top, BACK_LEFT, BACK, BACK_RIGHT below
(the back row mirrors the car's left and right as seen from behind).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from nuscenes.nuscenes import NuScenes

MOSAIC_LAYOUT = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)


def sample_mosaic(nusc: NuScenes, sample_token: str, label: str = "") -> np.ndarray:
    """(2 H, 3 W, 3) uint8 BGR mosaic of one sample's six images, channel names written in."""
    sample = nusc.get("sample", sample_token)
    rows = []
    for row in MOSAIC_LAYOUT:
        tiles = []
        for channel in row:
            sd = nusc.get("sample_data", sample["data"][channel])
            image = cv2.imread(os.path.join(nusc.dataroot, sd["filename"]), cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f"cannot read {sd['filename']} under {nusc.dataroot}")
            cv2.putText(image, channel, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(image)
        rows.append(np.hstack(tiles))
    mosaic = np.vstack(rows)
    if label:
        cv2.putText(
            mosaic, label, (6, mosaic.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1, cv2.LINE_AA
        )
    return mosaic


def save_mosaics(dataroot: str | os.PathLike, version: str, out_png: str | os.PathLike, num_samples: int = 4) -> Path:
    """Stack the mosaics of ``num_samples`` samples spread over the world's scenes into one PNG."""
    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    scenes = nusc.scene[:: max(1, len(nusc.scene) // num_samples)][:num_samples]
    mosaics = []
    for i, scene in enumerate(scenes):
        token = scene["first_sample_token"]
        for _ in range(i * 3 % max(1, scene["nbr_samples"])):  # vary the position within the scene
            token = nusc.get("sample", token)["next"] or token
        mosaics.append(sample_mosaic(nusc, token, f"{scene['name']}: {scene['description']}"))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), np.vstack(mosaics)):
        raise OSError(f"could not write {out_png}")
    return out_png
