"""Chamfer-distance AP: geometry against references, hand-computed precision/recall cases, edge cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from shapely.geometry import LineString

from maptr.data.vectors import resample_polyline
from maptr.evaluation import evaluate, precision_recall_curves
from maptr.evaluation.buffer_overlap import buffers_intersect, sure_overlap
from maptr.evaluation.chamfer_ap import (
    _nearest,
    _squared_distances,
    average_precision,
    chamfer_distance_matrix,
    resample_polylines,
)


def line(x0: float, y0: float, x1: float, y1: float, num: int = 20) -> np.ndarray:
    return np.stack([np.linspace(x0, x1, num), np.linspace(y0, y1, num)], axis=1)


def sample(vectors: list[np.ndarray], labels: list[int], scores: list[float] | None = None) -> dict:
    out = {
        "vectors": np.array(vectors, dtype=np.float32).reshape(len(vectors), -1 if vectors else 20, 2),
        "labels": np.array(labels, dtype=np.int64),
    }
    if scores is not None:
        out["scores"] = np.array(scores, dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_vertices", [2, 5, 20])
def test_resample_matches_single_polyline_reference(num_vertices: int) -> None:
    rng = np.random.default_rng(num_vertices)
    polys = rng.normal(size=(4, num_vertices, 2)) * 10
    batched = resample_polylines(torch.from_numpy(polys), 100).numpy()
    for poly, got in zip(polys, batched, strict=True):
        np.testing.assert_allclose(got, resample_polyline(poly, 100), atol=1e-4)
    np.testing.assert_allclose(batched[:, 0], polys[:, 0], atol=1e-9)  # endpoints kept exactly
    np.testing.assert_allclose(batched[:, -1], polys[:, -1], atol=1e-9)


def test_resample_ignores_repeated_tail_and_handles_degenerate_lines() -> None:
    poly = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 10.0]], dtype=torch.float64)
    padded = torch.cat([poly, poly[-1:].expand(4, 2)])  # tail of repeated last vertices
    out = resample_polylines(torch.stack([poly, poly]), 11)
    out_padded = resample_polylines(padded[None], 11)
    torch.testing.assert_close(out[0], out_padded[0])
    # Evenly spaced along the length 5 + 6 = 11 m: arc 2.2 m is on the first leg, arc 5.5 m on the second.
    torch.testing.assert_close(out[0, 2], torch.tensor([0.6 * 2.2, 0.8 * 2.2], dtype=torch.float64))
    torch.testing.assert_close(out[0, 5], torch.tensor([3.0, 4.5], dtype=torch.float64))
    point = resample_polylines(torch.tensor([[[2.0, 5.0], [2.0, 5.0]]]), 7)  # zero length
    torch.testing.assert_close(point[0], torch.tensor([[2.0, 5.0]]).expand(7, 2))


def test_chamfer_matrix_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    pred = rng.uniform(-15, 15, size=(5, 100, 2))
    gt = rng.uniform(-15, 15, size=(3, 100, 2))
    got = chamfer_distance_matrix(torch.from_numpy(pred).float(), torch.from_numpy(gt).float()).numpy()
    expected = np.zeros((5, 3))
    for i in range(5):
        for j in range(3):
            d = cdist(pred[i], gt[j])
            expected[i, j] = (d.min(axis=1).mean() + d.min(axis=0).mean()) / 2
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_chamfer_of_parallel_offset_line_is_the_offset() -> None:
    gt = resample_polylines(torch.from_numpy(line(0, -20, 0, 20))[None]).float()
    pred = resample_polylines(torch.from_numpy(line(0.7, -20, 0.7, 20))[None]).float()
    assert chamfer_distance_matrix(pred, gt).item() == pytest.approx(0.7, abs=1e-4)
    assert chamfer_distance_matrix(gt, gt).item() == pytest.approx(0.0, abs=5e-3)


# --------------------------------------------------------------------------------------------------
# AP
# --------------------------------------------------------------------------------------------------
def test_average_precision_all_point_interpolation() -> None:
    # TP, FP, TP with 2 GT: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 0.5 * 1 + 0.5 * 2/3.
    ap = average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx(5 / 6)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def test_perfect_predictions_score_one() -> None:
    gts = [
        sample([line(-5, -20, -5, 20), line(0, 5, 4, 5), line(10, -30, 12, 30)], [0, 1, 2]),
        sample([line(3, -10, 3, 10), line(-8, 0, -8, 9)], [0, 2]),
    ]
    preds = [dict(g, scores=np.linspace(0.9, 0.5, len(g["labels"]))) for g in gts]
    metrics = evaluate(preds, gts)
    assert metrics["mAP"] == pytest.approx(1.0)
    for name in ("divider", "ped_crossing", "boundary"):
        for thr in ("0.5", "1.0", "1.5"):
            assert metrics[f"AP_{name}_{thr}"] == pytest.approx(1.0)


def test_offset_of_0_7_m_is_tp_at_1_and_1_5_only() -> None:
    gts = [sample([line(0, -20, 0, 20)], [0])]
    preds = [sample([line(0.7, -20, 0.7, 20)], [0], [0.8])]
    metrics = evaluate(preds, gts)
    assert metrics["AP_divider_0.5"] == 0.0
    assert metrics["AP_divider_1.0"] == pytest.approx(1.0)
    assert metrics["AP_divider_1.5"] == pytest.approx(1.0)
    assert metrics["AP_divider"] == pytest.approx(2 / 3)
    # Classes without GT anywhere score 0 and still count in the mean (MapTR).
    assert metrics["AP_ped_crossing"] == 0.0 and metrics["AP_boundary"] == 0.0
    assert metrics["mAP"] == pytest.approx(2 / 9)


def test_hand_computed_precision_recall_across_samples() -> None:
    # Dataset-wide score order: 0.9 (sample 0, on GT a: TP), 0.8 (sample 1, 10 m away: FP),
    # 0.7 (sample 1, on GT b: TP). Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP 5/6.
    gts = [sample([line(0, -20, 0, 20)], [0]), sample([line(5, -20, 5, 20)], [0])]
    preds = [
        sample([line(0.1, -20, 0.1, 20)], [0], [0.9]),
        sample([line(-5, -20, -5, 20), line(5, -20, 5, 20)], [0, 0], [0.8, 0.7]),
    ]
    curve = precision_recall_curves(preds, gts, thresholds=(0.5,))[0][0]
    np.testing.assert_allclose(curve.scores, [0.9, 0.8, 0.7], atol=1e-6)
    np.testing.assert_array_equal(curve.tp, [True, False, True])
    np.testing.assert_allclose(curve.precision, [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(curve.recall, [0.5, 0.5, 1.0])
    assert curve.num_gt == 2
    assert curve.ap == pytest.approx(5 / 6)
    assert evaluate(preds, gts, thresholds=(0.5,))["AP_divider"] == pytest.approx(5 / 6)


def test_duplicate_and_taken_nearest_gt_are_false_positives() -> None:
    # Two GT 1.2 m apart. Prediction A (0.9) sits on GT 0; prediction B (0.8) is nearest to GT 0 too
    # (0.4 m) but within 1.0 m of GT 1 (0.8 m): GT 0 is taken and MapTR does not fall back -> FP.
    gts = [sample([line(0, -20, 0, 20), line(1.2, -20, 1.2, 20)], [0, 0])]
    preds = [sample([line(0, -20, 0, 20), line(0.4, -20, 0.4, 20)], [0, 0], [0.9, 0.8])]
    curve = precision_recall_curves(preds, gts, thresholds=(1.0,))[0][0]
    np.testing.assert_array_equal(curve.tp, [True, False])
    assert curve.ap == pytest.approx(0.5)


def test_labels_and_samples_separate_matches() -> None:
    gts = [sample([line(0, -20, 0, 20)], [0]), sample([line(5, -20, 5, 20)], [1])]
    # Right place, wrong class; and a sample-1 geometry predicted in sample 0.
    preds = [sample([line(0, -20, 0, 20), line(5, -20, 5, 20)], [1, 1], [0.9, 0.8]), sample([], [], [])]
    metrics = evaluate(preds, gts)
    assert metrics["mAP"] == 0.0


def test_empty_cases() -> None:
    gts = [sample([line(0, -20, 0, 20)], [0])]
    # No predictions at all.
    assert evaluate([sample([], [], [])], gts)["AP_divider"] == 0.0
    # A sample without GT: its predictions are false positives (here scored above the true positive).
    preds = [sample([line(0, -20, 0, 20)], [0], [0.5]), sample([line(0, -20, 0, 20)], [0], [0.9])]
    metrics = evaluate(preds, [gts[0], sample([], [])], thresholds=(0.5,))
    assert metrics["AP_divider"] == pytest.approx(0.5)
    # Nothing anywhere: no crash, all zero; no samples at all as well.
    assert evaluate([sample([], [], [])], [sample([], [])])["mAP"] == 0.0
    assert evaluate([], [])["mAP"] == 0.0


def test_variable_length_gt_lists_and_tensors_are_accepted() -> None:
    gt_vectors = [np.array([[0.0, -20.0], [0.0, 20.0]]), line(5, -20, 5, 20, num=37)]
    gts = [{"vectors": gt_vectors, "labels": [0, 2]}]
    preds = [
        {
            "vectors": torch.from_numpy(np.stack([line(0, 20, 0, -20), line(5, -20, 5, 20)])),
            "labels": torch.tensor([0, 2]),
            "scores": torch.tensor([0.6, 0.4]),
        }
    ]
    metrics = evaluate(preds, gts)
    assert metrics["AP_divider"] == pytest.approx(1.0)  # direction does not matter for chamfer
    assert metrics["AP_boundary"] == pytest.approx(1.0)


def test_input_errors() -> None:
    gts = [sample([line(0, -20, 0, 20)], [0])]
    with pytest.raises(ValueError, match="prediction samples"):
        evaluate([], gts)
    with pytest.raises(ValueError, match="labels must be in"):
        evaluate([sample([line(0, -20, 0, 20)], [3], [0.5])], gts)
    with pytest.raises(ValueError, match="scores"):
        evaluate([sample([line(0, -20, 0, 20)], [0], [0.5, 0.4])], gts)


def _buffer(points: np.ndarray):
    return LineString(points).buffer(2.0, cap_style="flat", join_style="mitre")


def reference_ap(preds: list[dict], gts: list[dict], cls: int, thr: float) -> float:
    """MapTR's protocol written as loops over samples and pairs (float64, one shapely buffer test per
    pair, predictions with < 2 vertices dropped), then sorted over the dataset, for cross-checking."""
    flags, scores, num_gt = [], [], 0
    for p, g in zip(preds, gts, strict=True):
        gt_lines = [resample_polyline(v, 100) for v, lab in zip(g["vectors"], g["labels"], strict=True) if lab == cls]
        mine = [
            (s, resample_polyline(v, 100))
            for v, lab, s in zip(p["vectors"], p["labels"], p["scores"], strict=True)
            if lab == cls and len(v) >= 2
        ]
        mine = sorted(mine, key=lambda m: -m[0])
        num_gt += len(gt_lines)
        covered = [False] * len(gt_lines)
        for score, pts in mine:
            cds = [
                (cdist(pts, q).min(1).mean() + cdist(pts, q).min(0).mean()) / 2
                if _buffer(pts).intersects(_buffer(q))
                else np.inf
                for q in gt_lines
            ]
            j = int(np.argmin(cds)) if cds else -1
            tp = j >= 0 and cds[j] <= thr and not covered[j]
            if tp:
                covered[j] = True
            flags.append(tp)
            scores.append(score)
    order = np.argsort(-np.array(scores), kind="stable")
    tp = np.array(flags, dtype=float)[order]
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1 - tp)
    recall = tp_cum / max(num_gt, 1e-9)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1e-9)
    return average_precision(recall, precision)


def random_scenes(seed: int, num_samples: int, short: bool) -> tuple[list[dict], list[dict]]:
    """Noisy copies of random GT plus random lines. With ``short``: straight elements of 0.5-2 m, the
    copies slid along their GT past its end (gaps of 0-1 m, small lateral offsets), where the buffer
    rule decides."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(num_samples):
        num_gt = int(rng.integers(0, 6))
        src = rng.integers(0, max(num_gt, 1), size=8)
        if short and num_gt:
            start = rng.uniform(-15, 15, size=(num_gt, 1, 2))
            heading = rng.uniform(0, 2 * np.pi, size=(num_gt, 1, 1))
            unit = np.concatenate([np.cos(heading), np.sin(heading)], axis=2)  # (num_gt, 1, 2)
            length = rng.uniform(0.5, 2.0, size=(num_gt, 1, 1))
            gt_vec = start + unit * length * np.linspace(0, 1, 20)[None, :, None]
            slide = length[src] + rng.uniform(-0.2, 1.0, size=(8, 1, 1))
            normal = unit[src][..., ::-1] * np.array([-1.0, 1.0])
            noisy = gt_vec[src] + unit[src] * slide + normal * rng.normal(0, 0.3, size=(8, 1, 1))
        else:
            gt_vec = rng.uniform(-15, 15, size=(num_gt, 1, 2)) + np.cumsum(rng.normal(0, 1, size=(num_gt, 20, 2)), 1)
            noisy = gt_vec[src] + rng.normal(0, 0.6, size=(8, 1, 2)) if num_gt else rng.normal(0, 5, size=(8, 20, 2))
        gt_lab = rng.integers(0, 3, size=num_gt)
        pred_lab = gt_lab[src] if num_gt else rng.integers(0, 3, size=8)
        gts.append({"vectors": gt_vec, "labels": gt_lab})
        preds.append({"vectors": noisy, "labels": pred_lab, "scores": rng.random(8)})
    return preds, gts


@pytest.mark.parametrize("short", [False, True])
def test_matches_loop_reference_on_random_scenes(short: bool) -> None:
    preds, gts = random_scenes(3, 12 if not short else 40, short)
    metrics = evaluate(preds, gts)
    for cls, name in enumerate(("divider", "ped_crossing", "boundary")):
        for thr in (0.5, 1.0, 1.5):
            assert metrics[f"AP_{name}_{thr}"] == pytest.approx(reference_ap(preds, gts, cls, thr), abs=1e-6)
    assert 0.0 < metrics["mAP"] < 1.0  # a non-trivial case: some TPs, some FPs


# --------------------------------------------------------------------------------------------------
# MapTR's rules: buffers, degenerate predictions, thresholds, ties
# --------------------------------------------------------------------------------------------------
def test_short_elements_end_to_end_never_match() -> None:
    # GT 1 m long, the prediction 1 m long starting 0.5 m past its end: chamfer 1.0 m, but the 2 m
    # flat-capped buffers do not touch, so MapTR never scores the pair (AP 0/0/0, not 0/1/1).
    gts = [sample([line(0, 0, 0, 1)], [0])]
    preds = [sample([line(0, 1.5, 0, 2.5)], [0], [0.9])]
    cd = chamfer_distance_matrix(resample_polylines(torch.from_numpy(preds[0]["vectors"]).double()),
                                 resample_polylines(torch.from_numpy(gts[0]["vectors"]).double()))  # fmt: skip
    assert cd.item() == pytest.approx(1.0, abs=1e-9)
    metrics = evaluate(preds, gts)
    assert [metrics[f"AP_divider_{t}"] for t in ("0.5", "1.0", "1.5")] == [0.0, 0.0, 0.0]


def test_buffers_side_by_side_do_match() -> None:
    # The same two short elements side by side, 1 m apart: buffers overlap, a TP at 1.0 m and 1.5 m.
    gts = [sample([line(0, 0, 0, 1)], [0])]
    preds = [sample([line(1, 0, 1, 1)], [0], [0.9])]
    metrics = evaluate(preds, gts)
    assert [metrics[f"AP_divider_{t}"] for t in ("0.5", "1.0", "1.5")] == [0.0, 1.0, 1.0]


def test_nearest_gt_whose_buffer_misses_is_skipped_for_the_next() -> None:
    # GT a (end to end with the prediction, chamfer 1.0) is nearer than GT b (side by side, 1.2 m);
    # a's buffer misses, so the prediction is scored against b: a TP at 1.5 m only.
    gts = [sample([line(0, 0, 0, 1), line(1.2, 1.5, 1.2, 2.5)], [0, 0])]
    preds = [sample([line(0, 1.5, 0, 2.5)], [0], [0.9])]
    curves = precision_recall_curves(preds, gts, thresholds=(1.0, 1.5))[0]
    assert [bool(c.tp[0]) for c in curves] == [False, True]


def test_zero_length_prediction_is_a_false_positive() -> None:
    # A prediction collapsed to one point lying on the GT: chamfer 0.25 m, but its buffer is empty.
    gts = [sample([line(0, 0, 0, 1)], [0])]
    point = np.repeat([[0.0, 0.5]], 20, axis=0)
    preds = [sample([point, line(0, 0, 0, 1)], [0, 0], [0.9, 0.5])]
    curve = precision_recall_curves(preds, gts, thresholds=(0.5,))[0][0]
    np.testing.assert_array_equal(curve.tp, [False, True])
    assert curve.ap == pytest.approx(0.5)


def test_prediction_with_fewer_than_two_vertices_is_dropped() -> None:
    gts = [{"vectors": [line(0, -20, 0, 20)], "labels": [0]}]
    preds = [{"vectors": [np.array([[9.0, 9.0]]), line(0, -20, 0, 20)], "labels": [0, 0], "scores": [0.9, 0.5]}]
    curve = precision_recall_curves(preds, gts, thresholds=(0.5,))[0][0]
    assert len(curve.tp) == 1 and curve.tp[0]  # neither TP nor FP: the AP is 1, not 0.5
    assert evaluate(preds, gts)["AP_divider"] == pytest.approx(1.0)


@pytest.mark.parametrize(("x", "y0", "y1", "offset"), [(10, -26, 10, 0.5), (4, -6, 18, 1.0), (0, -20, 20, 1.5)])
def test_prediction_exactly_at_a_threshold_is_a_true_positive(x: float, y0: float, y1: float, offset: float) -> None:
    # float64 gives exactly the offset (MapTR: TP); on the first two lines float32 alone gives
    # 0.50000006 and 1.0000001 (a FP).
    gts = [sample([line(x, y0, x, y1)], [0])]
    preds = [sample([line(x + offset, y0, x + offset, y1)], [0], [0.9])]
    curve = precision_recall_curves(preds, gts, thresholds=(offset,))[0][0]
    assert curve.tp.tolist() == [True]


def test_prediction_of_exactly_100_vertices_is_used_as_given() -> None:
    # 100 vertices bunched at one end: MapTR scores them as given; resampled they would be spread out.
    ys = np.concatenate([np.linspace(0, 1, 99), [20.0]])
    bunched = np.stack([np.full(100, 0.3), ys], axis=1)
    gt_pts = resample_polyline(line(0, 0, 0, 20), 100)

    def chamfer(a: np.ndarray) -> float:
        d = cdist(a, gt_pts)
        return (d.min(1).mean() + d.min(0).mean()) / 2

    as_given, resampled = chamfer(bunched), chamfer(resample_polyline(bunched, 100))
    assert abs(as_given - resampled) > 0.5  # the rule matters for this line
    gts = [sample([line(0, 0, 0, 20)], [0])]
    preds = [{"vectors": bunched[None], "labels": [0], "scores": [0.9]}]
    curves = precision_recall_curves(preds, gts, thresholds=(as_given + 1e-3, as_given - 1e-3))[0]
    assert [bool(c.tp[0]) for c in curves] == [True, False]


def test_tied_scores_are_ordered_by_sample_then_position() -> None:
    # Equal scores: sample 0's FP ranks before sample 1's TP (precision 0 then 1/2), so AP = 0.5.
    gts = [sample([line(0, -20, 0, 20)], [0]), sample([line(0, -20, 0, 20)], [0])]
    preds = [sample([line(9, -20, 9, 20)], [0], [0.7]), sample([line(0, -20, 0, 20)], [0], [0.7])]
    curve = precision_recall_curves(preds, gts, thresholds=(0.5,))[0][0]
    np.testing.assert_array_equal(curve.tp, [False, True])
    swapped = precision_recall_curves(preds[::-1], gts[::-1], thresholds=(0.5,))[0][0]
    np.testing.assert_array_equal(swapped.tp, [True, False])


def test_one_input_gives_one_value_across_processes() -> None:
    code = (
        "import numpy as np, sys; sys.path.insert(0, 'tests');"
        "from test_chamfer_ap import random_scenes; from maptr.evaluation import evaluate;"
        "p, g = random_scenes(5, 30, True);"
        "[d.update(scores=np.round(d['scores'], 1)) for d in p];"  # many ties
        "print(repr(evaluate(p, g)['mAP']))"
    )
    repo = Path(__file__).resolve().parents[1]
    outs = {subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True).stdout
            for _ in range(2)}  # fmt: skip
    assert len(outs) == 1 and float(outs.pop()) > 0


def test_sure_overlap_never_claims_buffers_that_shapely_finds_apart() -> None:
    # The vectorized sufficient test may leave a pair undecided, never decide one wrongly: random lines
    # with sharp zigzags (mitre joins) and short ones (flat caps), against shapely on every pair.
    rng = np.random.default_rng(0)
    sure_total = 0
    for trial in range(60):
        k = int(rng.integers(2, 8))
        steps = rng.normal(0, rng.choice([0.3, 1.0, 3.0]), size=(12, k - 1, 2))
        steps[:, 1::2] *= -1.0 if trial % 2 else 1.0
        start = rng.uniform(-10, 10, size=(12, 1, 2))
        lines = resample_polylines(torch.from_numpy(np.concatenate([start, start + steps.cumsum(1)], 1)))
        a, b = lines[:6], lines[6:]
        shape = (6, 100, 6, 100)
        sq = _squared_distances(a.float(), b.float())
        pairs = torch.cartesian_prod(torch.arange(6), torch.arange(6))
        sure = sure_overlap(sq, *_nearest(sq, *shape), pairs, shape, 2.0).numpy()
        exact = buffers_intersect(a.numpy()[pairs[:, 0]], b.numpy()[pairs[:, 1]])
        assert not (sure & ~exact).any()
        sure_total += int(sure.sum())
    assert sure_total > 200  # and it decides most overlapping pairs itself
