"""Hungarian matcher: permutation-equivalent orders, chosen order index, cost definition, empty GT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import model_config

from maptr.data.vectors import equivalent_orders, normalize_points
from maptr.training.matcher import HungarianMatcher, build_matcher

PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
P = 6  # points per vector, small to keep the tests fast


def polyline(x: float) -> np.ndarray:
    """A bent open polyline near x, meters."""
    ys = np.linspace(-20, 20, P)
    return np.stack([x + 0.05 * ys, ys + 0.01 * ys**2], axis=1).astype(np.float32)


def ring(cx: float, cy: float) -> np.ndarray:
    """A closed, irregular hexagon-ish ring (first point repeated at the end), meters."""
    angles = np.linspace(0, 2 * np.pi, P)[:-1]
    radii = np.array([2.0, 3.0, 2.5, 4.0, 3.5])
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.concatenate([pts, pts[:1]]).astype(np.float32)


def gt_tensors(elements: list[tuple[np.ndarray, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    orders, valid = zip(*(equivalent_orders(pts, closed) for pts, closed in elements), strict=True)
    return torch.from_numpy(np.stack(orders)), torch.from_numpy(np.stack(valid))


def predictions_at(elements: list[np.ndarray], num_queries: int, slots: list[int]) -> torch.Tensor:
    """(1, Q, P, 2) normalized predictions: element k exactly at query slots[k], noise elsewhere."""
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(1, num_queries, P, 2, generator=gen)
    for k, slot in enumerate(slots):
        pts[0, slot] = normalize_points(torch.from_numpy(elements[k]), PC_RANGE)
    return pts


def test_recovers_the_assignment_and_order() -> None:
    elements = [polyline(-5.0), ring(5.0, 10.0), polyline(8.0)]
    closed = [False, True, False]
    orders, valid = gt_tensors(list(zip(elements, closed, strict=True)))
    # Queries predict element 0 reversed, element 1 from its 3rd vertex backwards, element 2 as is.
    preds_meters = [elements[0][::-1].copy(), orders[1, P - 1 + 2].numpy(), elements[2]]
    pts = predictions_at(preds_meters, num_queries=8, slots=[6, 1, 3])
    logits = torch.zeros(1, 8, 3)
    matcher = HungarianMatcher(PC_RANGE, cls_weight=2.0, pts_weight=5.0)
    ((q, g, o),) = matcher(logits, pts, [torch.tensor([0, 1, 2])], [orders], [valid])
    assignment = dict(zip(g.tolist(), zip(q.tolist(), o.tolist(), strict=True), strict=True))
    assert assignment[0] == (6, 1)  # reversed polyline -> order 1
    assert assignment[1] == (1, P - 1 + 2)  # reversed ring starting at vertex 2
    assert assignment[2] == (3, 0)
    assert q.tolist() == sorted(q.tolist()) and q.dtype == torch.long


@pytest.mark.parametrize("transform", ["reverse_polyline", "shift_ring", "reverse_ring"])
def test_invariant_to_equivalent_gt_orders(transform: str) -> None:
    line_pts, ring_pts = polyline(-3.0), ring(4.0, -8.0)
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(1, 10, P, 2, generator=gen)  # arbitrary predictions: the cost must not change
    logits = torch.randn(1, 10, 3, generator=gen)
    labels = [torch.tensor([0, 1])]
    matcher = HungarianMatcher(PC_RANGE)

    def match(a: np.ndarray, b: np.ndarray) -> tuple[list[int], list[int], torch.Tensor]:
        orders, valid = gt_tensors([(a, False), (b, True)])
        ((q, g, _),) = matcher(logits, pts, labels, [orders], [valid])
        cost, _ = matcher.points_cost(pts[0], orders, valid)
        return q.tolist(), g.tolist(), cost

    base = match(line_pts, ring_pts)
    if transform == "reverse_polyline":
        other = match(line_pts[::-1].copy(), ring_pts)
    elif transform == "shift_ring":
        shifted = np.concatenate([ring_pts[3:-1], ring_pts[:3], ring_pts[3:4]])  # start at vertex 3
        other = match(line_pts, shifted)
    else:
        other = match(line_pts, ring_pts[::-1].copy())
    assert base[0] == other[0] and base[1] == other[1]
    torch.testing.assert_close(base[2], other[2])


def test_point_cost_is_l1_sum_over_points_and_coordinates_min_over_valid_orders() -> None:
    elements = [polyline(0.0)]
    orders, valid = gt_tensors([(elements[0], False)])
    pred = torch.rand(3, P, 2)
    cost, best = HungarianMatcher(PC_RANGE).points_cost(pred, orders, valid)
    norm = normalize_points(orders[0], PC_RANGE)  # (S, P, 2)
    per_order = (pred[:, None] - norm[None]).abs().sum(dim=(2, 3))  # (3, S)
    per_order[:, ~valid[0]] = float("inf")  # padding slots are never chosen
    torch.testing.assert_close(cost[:, 0], per_order.min(dim=1).values)
    assert set(best[:, 0].tolist()) <= {0, 1}


def test_classification_cost_prefers_the_right_class() -> None:
    matcher = HungarianMatcher(PC_RANGE, cls_weight=1.0, pts_weight=0.0)
    logits = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]])  # query 0 says class 0, query 1 class 1
    cost = matcher.classification_cost(logits, torch.tensor([1, 0]))
    assert cost[1, 0] < cost[0, 0] and cost[0, 1] < cost[1, 1]
    orders, valid = gt_tensors([(polyline(0.0), False), (polyline(5.0), False)])
    ((q, g, _),) = matcher(logits[None], torch.rand(1, 2, P, 2), [torch.tensor([1, 0])], [orders], [valid])
    assert dict(zip(q.tolist(), g.tolist(), strict=True)) == {0: 1, 1: 0}


def test_empty_ground_truth_and_mixed_batch() -> None:
    matcher = build_matcher(model_config())
    orders, valid = gt_tensors([(polyline(1.0), False)])
    empty_orders = torch.zeros(0, orders.shape[1], P, 2)
    empty_valid = torch.zeros(0, orders.shape[1], dtype=torch.bool)
    out = matcher(
        torch.randn(2, 5, 3),
        torch.rand(2, 5, P, 2),
        [torch.zeros(0, dtype=torch.long), torch.tensor([2])],
        [empty_orders, orders],
        [empty_valid, valid],
    )
    assert [t.numel() for t in out[0]] == [0, 0, 0]
    assert [t.numel() for t in out[1]] == [1, 1, 1]
    with pytest.raises(ValueError, match="batch of 2"):
        matcher(torch.randn(2, 5, 3), torch.rand(2, 5, P, 2), [torch.tensor([2])], [orders], [valid])


def test_builder_reads_the_criterion_weights() -> None:
    cfg = model_config()
    cfg.criterion.match_cls_cost, cfg.criterion.match_pts_cost = 1.5, 7.0
    matcher = build_matcher(cfg)
    assert (matcher.cls_weight, matcher.pts_weight, matcher.pc_range) == (1.5, 7.0, cfg.pc_range)
    with pytest.raises(ValueError, match="pc_range"):
        HungarianMatcher([0.0, 1.0])


def test_repeated_matching_equals_matching_against_copies() -> None:
    gen = torch.Generator().manual_seed(2)
    orders, valid = gt_tensors([(polyline(-4.0), False), (ring(3.0, 5.0), True), (polyline(9.0), False)])
    labels = torch.tensor([0, 1, 2])
    logits, pts = torch.randn(1, 11, 3, generator=gen), torch.rand(1, 11, P, 2, generator=gen)
    matcher = HungarianMatcher(PC_RANGE)
    ((q, g, o),) = matcher(logits, pts, [labels], [orders], [valid], num_repeats=3)
    ((q_ref, g_ref, o_ref),) = matcher(
        logits, pts, [labels.repeat(3)], [orders.repeat(3, 1, 1, 1)], [valid.repeat(3, 1)]
    )
    assert len(q) == 9 and q.tolist() == q_ref.tolist()
    assert g.tolist() == (g_ref % 3).tolist() and o.tolist() == o_ref.tolist()
    assert torch.bincount(g, minlength=3).tolist() == [3, 3, 3]  # every element claimed k times
    with pytest.raises(ValueError, match="num_repeats"):
        matcher(logits, pts, [labels], [orders], [valid], num_repeats=0)
