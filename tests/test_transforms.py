"""Image transforms keep lidar2img exact; photometric augmentation is reproducible; seg targets land right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maptr.data.seg_targets import bev_mask, ground_height
from maptr.data.transforms import GridMask, MultiViewImageTransform, fit_to_size, rgb_to_yuv444
from maptr.data.vectors import equivalent_orders, resample_polyline


def project(mat: np.ndarray, pt: np.ndarray) -> np.ndarray:
    p = mat @ np.append(pt, 1.0)
    return p[:2] / p[2]


@pytest.mark.parametrize(("size", "crop"), [((352, 128), True), ((800, 480), False)])
def test_fit_to_size_moves_projection_with_pixels(size, crop):
    h, w = 270, 480
    img = np.zeros((h, w, 3), np.uint8)
    k = np.array([[380.0, 0, 240], [0, 380.0, 135], [0, 0, 1]])
    mat = np.eye(4)
    mat[:3, :3] = k
    pt = np.array([1.2, 1.0, 10.0])  # in front of the camera (z forward in this toy frame)
    u, v = project(mat, pt)
    img[int(v) - 2 : int(v) + 3, int(u) - 2 : int(u) + 3] = 255  # a white blob where the point projects
    out, mats = fit_to_size([img], mat[None], *size)
    assert out[0].shape == (size[1], size[0], 3) and mats.shape == (1, 4, 4)
    u2, v2 = project(mats[0].astype(np.float64), pt)
    assert out[0][int(round(v2)), int(round(u2))].max() > 100, "projected point misses the blob after resize"
    scale = size[0] / w
    if crop:  # resized height 198 > 128: the top 70 rows (sky) are cut
        assert v2 == pytest.approx(v * scale - (round(h * scale) - size[1]), abs=1e-3)
    else:  # 450 < 480: padded at the bottom, v only scales
        assert v2 == pytest.approx(v * scale, abs=1e-3) and out[0][460:].max() == 0


def test_augmentation_is_reproducible_and_changes_pixels():
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 255, (32, 64, 3), dtype=np.uint8) for _ in range(6)]
    tf = MultiViewImageTransform(augment=True)
    a = tf(views, torch.Generator().manual_seed(3))
    b = tf(views, torch.Generator().manual_seed(3))
    c = tf(views, torch.Generator().manual_seed(4))
    plain = MultiViewImageTransform(augment=False)(views, torch.Generator())
    assert a.shape == (6, 3, 32, 64) and torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, plain)
    assert plain.min() >= -1.0 and plain.max() <= 1.0


def test_grid_mask_hides_a_grid():
    img = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    out = GridMask(prob=1.0)(img, torch.Generator().manual_seed(0))
    hidden = (out == 0).all(0).float().mean()
    assert 0.05 < hidden < 0.95


def test_yuv_of_gray_is_centered():
    gray = torch.full((3, 2, 2), 100.0)
    yuv = rgb_to_yuv444(gray)
    assert torch.allclose(yuv[0], gray[0], atol=1e-3) and torch.allclose(
        yuv[1:], torch.full((2, 2, 2), 128.0), atol=1e-3
    )


def test_bev_mask_puts_a_line_at_its_cells():
    pc_range = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
    mask = bev_mask([np.array([[0.0, -30.0], [0.0, 30.0]])], pc_range, 50, 25)
    # x = 0 is the boundary between columns 11 and 12 of 25 (each 1.2 m wide)
    assert mask[:, 11:13].any(axis=1).mean() > 0.9 and mask[:, :10].sum() == 0 and mask[:, 14:].sum() == 0


def test_ground_height_matches_lidar_mount():
    lidar2ego = np.eye(4)
    lidar2ego[2, 3] = 1.84
    assert np.allclose(ground_height(lidar2ego, np.zeros((3, 2))), -1.84)


def test_equivalent_orders_of_ring_and_line():
    square = resample_polyline(np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], float), 5)
    orders, valid = equivalent_orders(square, closed=True)
    assert orders.shape == (8, 5, 2) and valid.all()
    assert np.allclose(orders[:, 0], orders[:, -1])  # every order is a closed ring again
    assert {tuple(o[0]) for o in orders} == {(0, 0), (1, 0), (1, 1), (0, 1)}
    line = resample_polyline(np.array([[0, 0], [4, 0]], float), 5)
    orders, valid = equivalent_orders(line, closed=False)
    assert valid.sum() == 2 and np.allclose(orders[1], line[::-1]) and (orders[2:] == -10000).all()
