"""The dataset over the LMDB: batch contract, targets, and camera geometry that matches the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate, decode_jpeg, decode_views
from maptr.data.records import CorruptRecordError
from maptr.data.seg_targets import ground_height
from maptr.data.transforms import fit_to_size
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


# 480x270 JPEGs decoded at full and at 1/2 scale. At 192 px a 0.7 m offset is about one pixel near the
# car, so paint and asphalt blur into each other more (contrast ~21 grey levels, the same with or
# without the reduced decoding); a projection off by a pixel would erase it.
@pytest.mark.parametrize(("image_size", "contrast"), [((352, 128), 25), ((192, 64), 12)])
def test_projected_ground_truth_lands_on_painted_markings(packed_world, image_size, contrast):
    """End-to-end geometry: pack's lidar2img, after resize + crop to the network input, puts divider
    points on paint (bright) and points 0.7 m beside them on asphalt (darker)."""
    ds = PackedMapDataset(packed_world, "train", DatasetOptions(image_size=image_size, augment=False))
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
    assert np.median(on_paint) > np.median(beside) + contrast, (np.median(on_paint), np.median(beside))


def test_reduced_scale_decoding_only_where_it_is_the_input_width(packed_world):
    """A 240-wide input decodes the 480x270 JPEGs at 1/2 scale: same projections after fitting, pixels
    within a few grey levels of decoding at full size and resizing. A 192-wide input (no exact
    reduction) and a 352-wide one decode at full size."""
    rec = PackedMapDataset(packed_world, "train", DatasetOptions()).read_record(0)
    full, full_mats = fit_to_size([decode_jpeg(j, "rec") for j in rec.jpegs], rec.lidar2img, 240, 96)
    views, mats = decode_views(rec.jpegs, rec.image_sizes, rec.lidar2img, 240, "rec")
    assert [v.shape for v in views] == [(135, 240, 3)] * 6
    small, small_mats = fit_to_size(views, mats, 240, 96)
    np.testing.assert_allclose(small_mats, full_mats, rtol=1e-6, atol=1e-3)
    assert np.abs(np.stack(small).astype(int) - np.stack(full).astype(int)).mean() < 3
    for out_w in (192, 352):
        views, mats = decode_views(rec.jpegs, rec.image_sizes, rec.lidar2img, out_w, "rec")
        assert views[0].shape == (270, 480, 3) and np.allclose(mats, rec.lidar2img)


def test_decoded_size_must_match_the_record(packed_world):
    rec = PackedMapDataset(packed_world, "train", DatasetOptions()).read_record(0)
    with pytest.raises(
        CorruptRecordError, match=r"rec 7 view 0: JPEG is 240x135 at 1/2 scale .* says 960x540; re-run the pack"
    ):
        decode_views(rec.jpegs, rec.image_sizes * 2, rec.lidar2img, 480, "rec 7")


def test_cached_items_equal_fresh_ones_within_the_budget(packed_world):
    """The cache holds what is the same every epoch; augmentation still changes per epoch, a caller
    editing an item cannot change the cache, and items beyond ``cache_mb`` are recomputed."""
    fresh = PackedMapDataset(packed_world, "train", DatasetOptions(augment=True, seed=2))
    cached = PackedMapDataset(packed_world, "train", DatasetOptions(augment=True, seed=2, cache_mb=1))
    for epoch in (0, 1, 1):
        fresh.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(3):
            a, b = fresh[index], cached[index]
            assert a["meta"] == b["meta"]
            for key in a.keys() - {"meta"}:
                assert torch.equal(a[key], b[key]), (epoch, index, key)
            b["gt_pts"] += 1.0
            b["meta"]["index"] = -1
    assert cached.cached_items == 1  # one 6 x 352 x 128 item is 0.8 MiB of the 1 MiB budget


def test_loader_workers_do_not_cache(packed_world):
    ds = PackedMapDataset(packed_world, "train", DatasetOptions(cache_mb=64))
    assert sum(len(b["meta"]) for b in DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)) == len(ds)
    assert ds.cached_items == 0  # a worker's memory ends with its epoch
    ds[0]
    assert ds.cached_items == 1
