"""How closely one model reproduces another on the same inputs: the deployed ONNX model against the QAT
model it was exported from (the validate stage), compared on exactly the batches the metric saw.

:class:`RecordingPredictor` wraps any :data:`~maptr.evaluation.inference.Predictor` and keeps what it
returned; :func:`output_agreement` compares two such recordings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from maptr.evaluation.inference import Predictor


class RecordingPredictor:
    """Wraps a predictor and keeps what it returned: scores (sigmoid of the logits) and points, per batch.

    Used to compare two models on exactly the inputs the metric saw (:func:`output_agreement`).
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.scores: list[np.ndarray] = []  # per batch (B, Q, K)
        self.pts: list[np.ndarray] = []  # per batch (B, Q, P, 2)

    def __call__(self, img: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor]:
        logits, pts = self.predictor(img, lidar2img)
        self.scores.append(torch.sigmoid(logits.double()).numpy())
        self.pts.append(pts.double().numpy())
        return logits, pts

    def outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """All recorded outputs: scores (N, Q, K), pts (N, Q, P, 2), in call order."""
        return np.concatenate(self.scores), np.concatenate(self.pts)


def output_agreement(
    scores: np.ndarray,
    pts: np.ndarray,
    ref_scores: np.ndarray,
    ref_pts: np.ndarray,
    pc_range: list[float],
    top_k: int,
) -> dict[str, float]:
    """How closely a model (the deployed one) reproduces a reference (the QAT model) on the same inputs.

    Args:
        scores, ref_scores: (N, Q, K) class probabilities; pts, ref_pts: (N, Q, P, 2) normalized points.
        pc_range: [x0, y0, z0, x1, y1, z1], to express point differences in meters too.
        top_k: per sample, the ``top_k`` queries with the highest reference score are compared by class.
    Returns:
        scores_max_abs_diff / scores_mean_abs_diff; pts_max_abs_diff / pts_mean_abs_diff (normalized) and
        pts_max_abs_diff_m / pts_mean_abs_diff_m (Euclidean, meters, all queries) and
        topk_pts_mean_abs_diff_m (the top-k queries: the ones that become detections); topk_class_agreement:
        fraction of those top-k queries whose best class (argmax over K) is the same in both; samples.
    """
    if scores.shape != ref_scores.shape or pts.shape != ref_pts.shape or scores.shape[:2] != pts.shape[:2]:
        raise ValueError(
            f"shape mismatch: scores {scores.shape} vs {ref_scores.shape}, pts {pts.shape} vs {ref_pts.shape}"
        )
    num_queries = scores.shape[1]
    if not 1 <= top_k <= num_queries:
        raise ValueError(f"top_k must be in [1, {num_queries}], got {top_k}")
    score_diff = np.abs(scores - ref_scores)  # (N, Q, K)
    pts_diff = np.abs(pts - ref_pts)  # (N, Q, P, 2)
    extent = np.array([pc_range[3] - pc_range[0], pc_range[4] - pc_range[1]])  # (2,) meters per unit
    meters = np.linalg.norm((pts - ref_pts) * extent, axis=-1)  # (N, Q, P)
    top = np.argsort(-ref_scores.max(axis=2), axis=1, kind="stable")[:, :top_k]  # (N, top_k) query indices
    same = np.take_along_axis(scores.argmax(axis=2), top, 1) == np.take_along_axis(ref_scores.argmax(axis=2), top, 1)
    return {
        "scores_max_abs_diff": float(score_diff.max()),
        "scores_mean_abs_diff": float(score_diff.mean()),
        "pts_max_abs_diff": float(pts_diff.max()),
        "pts_mean_abs_diff": float(pts_diff.mean()),
        "pts_max_abs_diff_m": float(meters.max()),
        "pts_mean_abs_diff_m": float(meters.mean()),
        "topk_pts_mean_abs_diff_m": float(np.take_along_axis(meters, top[:, :, None], 1).mean()),
        "topk_class_agreement": float(same.mean()),
        "top_k": top_k,
        "samples": int(scores.shape[0]),
    }
