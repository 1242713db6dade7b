"""The training / validation dataset over the packed LMDB (see ``maptr.data.packing``).

Each item decodes the six JPEGs once, applies the guide's transforms (keeping ``lidar2img`` exact),
resamples the map ground truth to a fixed number of points with its equivalent orders, and rasterizes the
BEV and per-camera segmentation targets of the auxiliary heads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from maptr.data.records import CorruptRecordError, SampleRecord
from maptr.data.seg_targets import bev_mask, pv_masks
from maptr.data.transforms import MultiViewImageTransform, fit_to_size
from maptr.data.vectors import equivalent_orders, is_closed, resample_polyline


@dataclass
class DatasetOptions:
    """What the dataset needs to know about the model and the stage (built from params by the caller)."""

    image_size: tuple[int, int] = (352, 128)  # network input (W, H)
    pc_range: tuple[float, ...] = (-15.0, -30.0, -2.0, 15.0, 30.0, 2.0)
    num_pts: int = 20
    bev_size: tuple[int, int] = (50, 25)  # (bev_h, bev_w)
    pv_stride: int = 8
    augment: bool = False
    yuv: bool = False
    seed: int = 0

    @classmethod
    def from_model(cls, model_cfg, augment: bool = False, seed: int = 0) -> DatasetOptions:
        """Sizes from a ``maptr.config.ModelConfig``: input image, BEV grid, points per instance."""
        return cls(
            image_size=tuple(model_cfg.image_size),
            pc_range=tuple(model_cfg.pc_range),
            num_pts=model_cfg.num_pts_per_vec,
            bev_size=(model_cfg.bev_h, model_cfg.bev_w),
            augment=augment,
            seed=seed,
        )


_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def _open_readonly(path: Path) -> lmdb.Environment:
    """One read-only environment per LMDB and process: LMDB refuses to open the same file twice in a
    process, and an environment must not cross a fork (each DataLoader worker opens its own)."""
    key = str(path.resolve())
    pid, env = _ENVS.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()  # inherited through fork: release this process's copy (lock=False: no lock state)
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
        _ENVS[key] = (os.getpid(), env)
    return env


def decode_jpeg(data: bytes, where: str) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 RGB; undecodable bytes raise CorruptRecordError naming ``where``."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise CorruptRecordError(f"{where}: image bytes do not decode as JPEG; re-run the pack stage")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class PackedMapDataset(Dataset):
    """Samples of one split of a packed dataset.

    Args:
        packed_root: folder written by the pack stage (``<split>_lmdb`` and ``metas/``).
        split: ``train`` or ``val``.
        opts: sizes and augmentation switches.
    Item (dict):
        img (Ncam, 3, H, W) float32; lidar2img (Ncam, 4, 4) float32 for those pixels;
        gt_labels (N,) int64; gt_pts (N, P, 2) float32 meters; gt_orders (N, S, P, 2);
        gt_orders_valid (N, S) bool; bev_seg (1, bev_h, bev_w) float32; pv_seg (Ncam, 1, H/s, W/s);
        meta: token, scene, index and the ground truth at its original resolution (for the metric).
    """

    def __init__(self, packed_root: str | Path, split: str, opts: DatasetOptions) -> None:
        self.root = Path(packed_root)
        self.split = split
        self.opts = opts
        self.lmdb_path = self.root / f"{split}_lmdb"
        meta_path = self.root / "metas" / f"{split}.json"
        if not meta_path.is_file() or not self.lmdb_path.is_dir():
            raise FileNotFoundError(f"{meta_path}: packed split not found; run the pack stage (dvc repro pack)")
        try:
            metas = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptRecordError(f"{meta_path}: malformed metas ({exc}); re-run the pack stage") from None
        self.info = metas["info"]
        self.samples = metas["samples"]
        if list(self.info["pc_range"]) != list(opts.pc_range):
            raise ValueError(
                f"{meta_path}: packed with pc_range {self.info['pc_range']} but the model uses "
                f"{list(opts.pc_range)}; re-run pack with the same pack.pc_range"
            )
        self.transform = MultiViewImageTransform(augment=opts.augment, yuv=opts.yuv)
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream per epoch (the sampler's seed changes the order)."""
        self.epoch = epoch

    def _txn_get(self, key: int) -> bytes:
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _open_readonly(self.lmdb_path), os.getpid()
        with self._env.begin() as txn:
            blob = txn.get(str(key).encode())
        if blob is None:
            raise CorruptRecordError(f"{self.lmdb_path}: record {key} missing; re-run the pack stage")
        return blob

    def read_record(self, index: int) -> SampleRecord:
        key = self.samples[index]["key"]
        return SampleRecord.decode(self._txn_get(key), f"{self.lmdb_path} record {key}")

    def ground_truth(self, index: int) -> dict:
        """Ground truth at full resolution for the metric: vectors list of (K_i, 2) meters, labels (N,)."""
        s = self.samples[index]
        return {
            "vectors": [np.asarray(v, dtype=np.float32) for v in s["vectors"]],
            "labels": np.asarray(s["labels"], dtype=np.int64),
        }

    def __getitem__(self, index: int) -> dict:
        opts = self.opts
        record = self.read_record(index)
        where = f"{self.lmdb_path} record {self.samples[index]['key']}"
        images = [decode_jpeg(j, f"{where} {cam}") for j, cam in zip(record.jpegs, record.cams, strict=True)]
        images, lidar2img = fit_to_size(images, record.lidar2img, *opts.image_size)
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + self.epoch * 10_007 + index)
        img = self.transform(images, gen)  # (Ncam, 3, H, W)

        gt = self.ground_truth(index)
        vectors = [v for v in gt["vectors"] if len(v) >= 2]
        labels = np.asarray([lab for v, lab in zip(gt["vectors"], gt["labels"], strict=True) if len(v) >= 2])
        pts = np.stack([resample_polyline(v, opts.num_pts) for v in vectors]) if vectors else None
        n, slots = len(vectors), 2 * (opts.num_pts - 1)
        orders = np.zeros((n, slots, opts.num_pts, 2), dtype=np.float32)
        valid = np.zeros((n, slots), dtype=bool)
        for i, v in enumerate(vectors):
            orders[i], valid[i] = equivalent_orders(pts[i], is_closed(v))
        bev_h, bev_w = opts.bev_size
        width, height = opts.image_size
        return {
            "img": img,
            "lidar2img": torch.from_numpy(lidar2img),
            "gt_labels": torch.from_numpy(labels.astype(np.int64)).reshape(n),
            "gt_pts": torch.from_numpy(pts if pts is not None else np.zeros((0, opts.num_pts, 2), np.float32)),
            "gt_orders": torch.from_numpy(orders),
            "gt_orders_valid": torch.from_numpy(valid),
            "bev_seg": torch.from_numpy(bev_mask(vectors, list(opts.pc_range), bev_h, bev_w)[None].astype(np.float32)),
            "pv_seg": torch.from_numpy(
                pv_masks(vectors, lidar2img, record.lidar2ego, (height, width), opts.pv_stride)[:, None].astype(
                    np.float32
                )
            ),
            "meta": {"index": index, "token": record.token, "scene": self.samples[index]["scene"]},
        }


def collate(items: list[dict]) -> dict:
    """Stack fixed-size tensors into a batch; ground truths of varying size stay per-sample lists.

    Returns img (B, Ncam, 3, H, W), lidar2img (B, Ncam, 4, 4), bev_seg (B, 1, bev_h, bev_w),
    pv_seg (B, Ncam, 1, h, w), and lists of B: gt_labels, gt_pts, gt_orders, gt_orders_valid, meta.
    """
    batch = {k: torch.stack([it[k] for it in items]) for k in ("img", "lidar2img", "bev_seg", "pv_seg")}
    for k in ("gt_labels", "gt_pts", "gt_orders", "gt_orders_valid", "meta"):
        batch[k] = [it[k] for it in items]
    return batch
