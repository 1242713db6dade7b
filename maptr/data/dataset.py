"""The training / validation dataset over the packed LMDB (see ``maptr.data.packing``).

Each item decodes the six JPEGs once (in the DCT domain at 1/2, 1/4 or 1/8 scale when that is exactly
the network input width), applies the guide's transforms (keeping ``lidar2img`` exact), resamples the map
ground truth to a fixed number of points with its equivalent orders, and rasterizes the BEV and
per-camera segmentation targets of the auxiliary heads. Everything before the random augmentation is the
same in every epoch, so it can be kept in memory (``DatasetOptions.cache_mb``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from maptr.data.records import MAGIC, CorruptRecordError, SampleRecord
from maptr.data.seg_targets import bev_mask, pv_masks
from maptr.data.transforms import MultiViewImageTransform, fit_to_size
from maptr.data.vectors import equivalent_orders, is_closed, resample_polyline

if TYPE_CHECKING:  # lmdb is imported where an LMDB is opened: the GPU check's machines have no lmdb
    import lmdb


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
    cache_mb: int = 0  # keep up to this many MiB of decoded, resized items in memory (0: off)

    @classmethod
    def from_model(cls, model_cfg, augment: bool = False, seed: int = 0, cache_mb: int = 0) -> DatasetOptions:
        """Sizes from a ``maptr.config.ModelConfig``: input image, BEV grid, points per instance."""
        return cls(
            image_size=tuple(model_cfg.image_size),
            pc_range=tuple(model_cfg.pc_range),
            num_pts=model_cfg.num_pts_per_vec,
            bev_size=(model_cfg.bev_h, model_cfg.bev_w),
            augment=augment,
            seed=seed,
            cache_mb=cache_mb,
        )


_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def _open_readonly(path: Path, keys: list[int]) -> lmdb.Environment:
    """One read-only environment per LMDB and process: LMDB refuses to open the same file twice in a
    process, and an environment must not cross a fork (each DataLoader worker opens its own). Each fresh
    environment is checked to hold the records ``keys`` (:func:`check_lmdb`)."""
    import lmdb

    key = str(path.resolve())
    pid, env = _ENVS.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()  # inherited through fork: release this process's copy (lock=False: no lock state)
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
        except lmdb.Error as exc:
            raise CorruptRecordError(f"{path}: not a readable LMDB ({exc}); re-run pack") from None
        try:
            check_lmdb(env, path, keys)
        except CorruptRecordError:
            env.close()
            raise
        _ENVS[key] = (os.getpid(), env)
    return env


def check_lmdb(env: lmdb.Environment, path: Path, keys: list[int]) -> None:
    """Refuse a truncated or foreign LMDB before any read: the file is memory-mapped, and reading a page
    past its end kills the process with SIGBUS and no message. The page count comes from LMDB's meta
    pages (read with plain reads at open); then the record with the highest of ``keys`` is read."""
    data = path / "data.mdb"
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = data.stat().st_size
    if size < needed:
        raise CorruptRecordError(f"{data}: {size} bytes, but its index needs {needed} (truncated); re-run pack")
    entries = env.stat()["entries"]
    if entries < len(keys):
        raise CorruptRecordError(f"{path}: holds {entries} records, its metas list {len(keys)}; re-run pack")
    with env.begin() as txn:
        last = txn.get(str(max(keys)).encode())
    if last is None or not last.startswith(MAGIC):
        raise CorruptRecordError(f"{path}: record {max(keys)} missing or not a maptr record; re-run pack")


_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def decode_jpeg(data: bytes, where: str, reduce: int = 1) -> np.ndarray:
    """JPEG bytes -> (ceil(H / reduce), ceil(W / reduce), 3) uint8 RGB; undecodable bytes raise
    CorruptRecordError naming ``where``.

    ``reduce`` (1, 2, 4 or 8) decodes at that fraction of the size with libjpeg's scaled inverse DCT,
    which skips most of the decoding work. Output pixel ``i`` covers input pixels ``[i r, (i + 1) r)``,
    so pixel coordinates scale by exactly ``1 / reduce``.
    """
    if reduce not in _REDUCED_FLAGS:
        raise ValueError(f"reduce must be one of {sorted(_REDUCED_FLAGS)}, got {reduce}")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS[reduce])
    if img is None:
        raise CorruptRecordError(f"{where}: image bytes do not decode as JPEG; re-run the pack stage")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_views(
    jpegs: list[bytes], image_sizes: np.ndarray, lidar2img: np.ndarray, out_w: int, where: str
) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode each view at 1/2, 1/4 or 1/8 scale where that is exactly ``out_w`` wide, else at full size.

    Only an exact fit: a reduction followed by a second resize (480 -> 240 -> 192 px) gave lower val mAP
    than one INTER_AREA resize of the full image (nano, seed 0, 3 epochs: 0.2699 vs 0.3063 on a Xeon,
    0.2836 vs 0.3145 on an AMD EPYC; README), and with the item cache the decode is paid once anyway.
    For the guide's 1600 px nuScenes images and the r50 preset's 800 px input it halves the decode.

    Args:
        jpegs: Ncam JPEG byte strings; image_sizes: (Ncam, 2) their [width, height];
        lidar2img: (Ncam, 4, 4) projections into the full-size pixels.
    Returns:
        Ncam (h, w, 3) uint8 RGB images and the (Ncam, 4, 4) projections into their pixels.
    """
    images, mats = [], np.array(lidar2img, dtype=np.float64)  # (Ncam, 4, 4)
    for k, (jpeg, (width, height)) in enumerate(zip(jpegs, image_sizes, strict=True)):
        reduce = max(r for r in _REDUCED_FLAGS if (width % r == 0 and width // r == out_w) or r == 1)
        img = decode_jpeg(jpeg, f"{where} view {k}", reduce)
        expected = (-(-int(height) // reduce), -(-int(width) // reduce))
        if img.shape[:2] != expected:
            raise CorruptRecordError(
                f"{where} view {k}: JPEG is {img.shape[1]}x{img.shape[0]} at 1/{reduce} scale but the record "
                f"says {width}x{height}; re-run the pack stage"
            )
        mats[k, :2] /= reduce  # rows (u d, v d) of the full-size pixels -> the decoded pixels
        images.append(img)
    return images, mats


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
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._setup(metas["info"], metas["samples"], opts, str(meta_path))
        self._lmdb()  # checked now: a truncated LMDB must fail before any work, with its path

    def _setup(self, info: dict[str, Any], samples: list[dict[str, Any]], opts: DatasetOptions, where: str) -> None:
        """State shared with datasets over other record stores (``maptr.data.portable``): the metas, the
        transform, the epoch and the item cache. ``where`` names the metas' file in errors."""
        self.info = info
        self.samples = samples
        self.opts = opts
        if not self.samples:  # written by an older pack, which did not refuse an empty split
            split = getattr(self, "split", "this")
            raise CorruptRecordError(
                f"{where}: the {split} split is empty (0 samples); re-run pack on data with {split} scenes "
                f"(synthetic world: synth.{split}_scenes >= 1, then re-run synth and pack)"
            )
        if list(self.info["pc_range"]) != list(opts.pc_range):
            raise ValueError(
                f"{where}: packed with pc_range {self.info['pc_range']} but the model uses "
                f"{list(opts.pc_range)}; re-run pack with the same pack.pc_range"
            )
        self.transform = MultiViewImageTransform(augment=opts.augment, yuv=opts.yuv)
        self.epoch = 0
        self._cached: dict[int, dict] = {}  # index -> _prepare(index), up to opts.cache_mb
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cached_items(self) -> int:
        """How many items this process keeps in memory (``opts.cache_mb``)."""
        return len(self._cached)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream per epoch (the sampler's seed changes the order)."""
        self.epoch = epoch

    def _lmdb(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _open_readonly(self.lmdb_path, [s["key"] for s in self.samples]), os.getpid()
        return self._env

    def _txn_get(self, key: int) -> bytes:
        with self._lmdb().begin() as txn:
            blob = txn.get(str(key).encode())
        if blob is None:
            raise CorruptRecordError(f"{self.lmdb_path}: record {key} missing; re-run the pack stage")
        return blob

    def record_name(self, index: int) -> str:
        """Names sample ``index``'s record in errors (the store and the key)."""
        return f"{self.lmdb_path} record {self.samples[index]['key']}"

    def read_record(self, index: int) -> SampleRecord:
        key = self.samples[index]["key"]
        return SampleRecord.decode(self._txn_get(key), self.record_name(index))

    def ground_truth(self, index: int) -> dict:
        """Ground truth at full resolution for the metric: vectors list of (K_i, 2) meters, labels (N,)."""
        s = self.samples[index]
        return {
            "vectors": [np.asarray(v, dtype=np.float32) for v in s["vectors"]],
            "labels": np.asarray(s["labels"], dtype=np.int64),
        }

    def __getitem__(self, index: int) -> dict:
        item = self._cached.get(index)
        if item is None:
            item = self._prepare(index)
            self._remember(index, item)
        gen = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + self.epoch * 10_007 + index)
        out = {k: torch.from_numpy(v.copy()) for k, v in item.items() if k not in ("images", "meta")}
        out["img"] = self.transform(list(item["images"]), gen)  # (Ncam, 3, H, W)
        out["meta"] = dict(item["meta"])
        return out

    def _prepare(self, index: int) -> dict:
        """The epoch-independent part of an item, as numpy arrays: images (Ncam, H, W, 3) uint8 and the
        targets. Only the random augmentation and the tensor conversion come after it."""
        opts = self.opts
        record = self.read_record(index)
        where = self.record_name(index)
        width, height = opts.image_size
        images, lidar2img = decode_views(record.jpegs, record.image_sizes, record.lidar2img, width, where)
        images, lidar2img = fit_to_size(images, lidar2img, width, height)

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
        pv = pv_masks(vectors, lidar2img, record.lidar2ego, (height, width), opts.pv_stride)
        return {
            "images": np.stack(images),  # (Ncam, H, W, 3) uint8
            "lidar2img": lidar2img,
            "gt_labels": labels.astype(np.int64).reshape(n),
            "gt_pts": pts if pts is not None else np.zeros((0, opts.num_pts, 2), np.float32),
            "gt_orders": orders,
            "gt_orders_valid": valid,
            "bev_seg": bev_mask(vectors, list(opts.pc_range), bev_h, bev_w)[None].astype(np.float32),
            "pv_seg": pv[:, None].astype(np.float32),  # (Ncam, 1, H/s, W/s)
            "meta": {"index": index, "token": record.token, "scene": self.samples[index]["scene"]},
        }

    def _remember(self, index: int, item: dict) -> None:
        """Keep ``item`` while the cache is under ``opts.cache_mb``. Only in the main process: a DataLoader
        worker's memory dies with it at the end of the epoch, so caching there would only cost memory."""
        if self.opts.cache_mb <= 0 or get_worker_info() is not None:
            return
        size = sum(v.nbytes for k, v in item.items() if k != "meta")
        if self._cached_bytes + size <= self.opts.cache_mb * 2**20:
            self._cached[index] = item
            self._cached_bytes += size


def collate(items: list[dict]) -> dict:
    """Stack fixed-size tensors into a batch; ground truths of varying size stay per-sample lists.

    Returns img (B, Ncam, 3, H, W), lidar2img (B, Ncam, 4, 4), bev_seg (B, 1, bev_h, bev_w),
    pv_seg (B, Ncam, 1, h, w), and lists of B: gt_labels, gt_pts, gt_orders, gt_orders_valid, meta.
    """
    batch = {k: torch.stack([it[k] for it in items]) for k in ("img", "lidar2img", "bev_seg", "pv_seg")}
    for k in ("gt_labels", "gt_pts", "gt_orders", "gt_orders_valid", "meta"):
        batch[k] = [it[k] for it in items]
    return batch
