"""Post-processing: top-k over (query x class), decoding, denormalization, range filter, numpy input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import model_config

from maptr.evaluation import MapTRPostProcess, build_postprocess

PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]


def test_topk_order_and_label_query_decoding() -> None:
    # 2 samples, 4 queries, 3 classes; scores chosen so the flattened ranking is known.
    logits = torch.full((2, 4, 3), -10.0)
    logits[0, 2, 1] = 3.0  # flat index 7 -> query 2, label 1
    logits[0, 0, 2] = 2.0  # flat index 2 -> query 0, label 2
    logits[0, 3, 0] = 1.0  # flat index 9 -> query 3, label 0
    logits[1, 1, 0] = 0.5
    pts = torch.rand(2, 4, 5, 2)
    out = MapTRPostProcess(PC_RANGE, num_classes=3, max_num=3)(logits, pts)
    assert len(out) == 2
    np.testing.assert_array_equal(out[0]["labels"], [1, 2, 0])
    np.testing.assert_array_equal(out[0]["query_idx"], [2, 0, 3])
    np.testing.assert_allclose(out[0]["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])).numpy(), rtol=1e-6)
    assert out[1]["labels"][0] == 0 and out[1]["query_idx"][0] == 1
    assert np.all(np.diff(out[1]["scores"]) <= 0)
    assert out[0]["vectors"].shape == (3, 5, 2) and out[0]["vectors"].dtype == np.float32
    assert out[0]["labels"].dtype == np.int64


def test_points_are_denormalized_to_meters() -> None:
    logits = torch.tensor([[[5.0, -5.0, -5.0]]])  # one query, one confident class
    pts = torch.tensor([[[[0.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.25, 0.75]]]])
    out = MapTRPostProcess(PC_RANGE, num_classes=3, max_num=1)(logits, pts)
    np.testing.assert_allclose(out[0]["vectors"][0], [[-15, -30], [0, 0], [15, 30], [-7.5, 15]], atol=1e-5)


def test_range_filter_drops_instances_with_any_point_outside() -> None:
    logits = torch.tensor([[[4.0, -9.0], [3.0, -9.0], [2.0, -9.0]]])
    pts = torch.full((1, 3, 4, 2), 0.5)
    pts[0, 0, 2, 0] = 1.2  # x = 21 m > 20 m: dropped
    pts[0, 1, 3, 1] = -0.06  # y = -33.6 m, inside [-35, 35]: kept
    pts[0, 2, 0, 1] = 1.1  # y = 36 m > 35 m: dropped
    post = MapTRPostProcess(PC_RANGE, num_classes=2, max_num=6, post_center_range=[-20.0, -35.0, 20.0, 35.0])
    out = post(logits, pts)[0]
    # Of the 6 candidates (3 queries x 2 classes), only query 1 survives, with both labels.
    np.testing.assert_array_equal(out["query_idx"], [1, 1])
    np.testing.assert_array_equal(out["labels"], [0, 1])
    unfiltered = MapTRPostProcess(PC_RANGE, num_classes=2, max_num=6)(logits, pts)[0]
    assert len(unfiltered["labels"]) == 6


def test_numpy_input_matches_torch_and_max_num_caps() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 3, generator=gen)
    pts = torch.rand(3, 7, 20, 2, generator=gen)
    post = MapTRPostProcess(PC_RANGE, num_classes=3, max_num=50)  # 50 > 7 * 3 candidates
    from_torch = post(logits, pts)
    from_numpy = post(logits.numpy(), pts.numpy())
    for a, b in zip(from_torch, from_numpy, strict=True):
        assert len(a["scores"]) == 21
        for key in ("vectors", "scores", "labels", "query_idx"):
            np.testing.assert_array_equal(a[key], b[key])


def test_shape_errors_and_builder() -> None:
    post = build_postprocess(model_config())
    assert post.max_num == 50 and post.post_center_range == [-20.0, -35.0, 20.0, 35.0]
    with pytest.raises(ValueError, match="expected logits"):
        post(torch.zeros(1, 5, 3), torch.zeros(1, 4, 20, 2))
    with pytest.raises(ValueError, match="classes"):
        post(torch.zeros(1, 5, 4), torch.zeros(1, 5, 20, 2))
    with pytest.raises(ValueError, match="post_center_range"):
        MapTRPostProcess(PC_RANGE, num_classes=3, post_center_range=[1.0, 2.0])
