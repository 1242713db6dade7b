"""The dataset over the LMDB: batch contract, targets, and camera geometry that matches the pixels."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate
from maptr.data.seg_targets import ground_height
from maptr.data.vectors import resample_polyline


def test_item_and_batch_contract(packed_world):
    ds = PackedMapDataset(packed_world, "train", DatasetOptions(augment=True))
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["img"].shape == (2, 6, 3, 128, 352) and batch["img"].dtype == torch.float32
    assert batch["lidar2img"].shape == (2, 6, 4, 4)
    assert batch["bev_seg"].shape == (2, 1, 50, 25) and batch["pv_seg"].shape == (2, 6, 1, 16, 44)
    for labels, pts, orders, valid in zip(
        batch["gt_labels"], batch["gt_pts"], batch["gt_orders"], batch["gt_orders_valid"], strict=True
    ):
        n = labels.shape[0]
        assert n > 0 and pts.shape == (n, 20, 2) and orders.shape == (n, 38, 20, 2) and valid.shape == (n, 38)
        assert torch.equal(orders[:, 0], pts)  # the first order is the stored one
        closed = (pts[:, 0] - pts[:, -1]).norm(dim=-1) < 1e-3
        assert (valid.sum(1) == torch.where(closed, 38, 2)).all()
    assert batch["bev_seg"].sum() > 0 and batch["pv_seg"].sum() > 0


def test_items_are_reproducible_per_seed_and_epoch(packed_world):
    ds = PackedMapDataset(packed_world, "train", DatasetOptions(augment=True, seed=1))
    a, b = ds[3]["img"], ds[3]["img"]
    ds.set_epoch(1)
    c = ds[3]["img"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def _brightness_at(img: torch.Tensor, lidar2img: np.ndarray, lidar2ego: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Mean RGB (0..255) of the pixels where ground points xy (K, 2) project in each camera they hit."""
    pts = np.concatenate([xy, ground_height(lidar2ego, xy)[:, None], np.ones((len(xy), 1))], axis=1)
    values = []
    pixels = (img.numpy() * 128 + 128).mean(1)  # (Ncam, H, W)
    for cam in range(img.shape[0]):
        p = pts @ lidar2img[cam].T  # (K, 4)
        ok = p[:, 2] > 1.0
        u, v = p[ok, 0] / p[ok, 2], p[ok, 1] / p[ok, 2]
        inside = (u >= 0) & (u < img.shape[3] - 1) & (v >= 0) & (v < img.shape[2] - 1)
        values.append(pixels[cam, np.round(v[inside]).astype(int), np.round(u[inside]).astype(int)])
    return np.concatenate(values)


def test_projected_ground_truth_lands_on_painted_markings(packed_world):
    """End-to-end geometry: pack's lidar2img, after resize + crop to the network input, puts divider
    points on paint (bright) and points 0.7 m beside them on asphalt (darker)."""
    ds = PackedMapDataset(packed_world, "train", DatasetOptions(augment=False))
    on_paint, beside = [], []
    for index in range(len(ds)):
        item, rec, gt = ds[index], ds.read_record(index), ds.ground_truth(index)
        for vec, label in zip(gt["vectors"], gt["labels"], strict=True):
            if label != 0:
                continue
            length = np.linalg.norm(np.diff(vec, axis=0), axis=1).sum()
            dense = resample_polyline(vec, max(2, int(length / 0.25))).astype(np.float64)
            dense = dense[np.linalg.norm(dense, axis=1) < 14]  # near the car: a few pixels wide
            if len(dense) < 4:
                continue
            tangent = np.gradient(dense, axis=0)
            normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) / (
                np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
            )
            l2i = item["lidar2img"].numpy().astype(np.float64)
            on_paint.append(_brightness_at(item["img"], l2i, rec.lidar2ego, dense))
            for side in (-0.7, 0.7):
                beside.append(_brightness_at(item["img"], l2i, rec.lidar2ego, dense + side * normal))
    on_paint, beside = np.concatenate(on_paint), np.concatenate(beside)
    assert len(on_paint) > 200
    assert np.median(on_paint) > np.median(beside) + 25, (np.median(on_paint), np.median(beside))
