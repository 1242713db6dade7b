"""Model outputs -> scored map vectors in meters (the guide's MapTRPostProcess, NMS-free).

One code path for every stage: the torch model's outputs and ONNX Runtime's numpy outputs go through
the same :class:`MapTRPostProcess`, so float, QAT and deployed mAP are comparable.

Each query can yield several (class, score) candidates: the top ``max_num`` of the flattened
(query x class) sigmoid scores are kept, as MapTR does, so a query may appear twice with two labels.

Range filter: an instance is kept when ALL its points lie in ``post_center_range = [xmin, ymin, xmax,
ymax]`` (meters, bounds included). This is the same test as MapTR's filter on the instance's bounding
box (bbox min >= lower bounds and bbox max <= upper bounds), without building the box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from maptr.config import ModelConfig
from maptr.data.vectors import denormalize_points

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()


class MapTRPostProcess:
    """Top-k decoding of (B, Q, C) logits and (B, Q, P, 2) normalized points into per-sample vectors."""

    def __init__(
        self,
        pc_range: Sequence[float],
        num_classes: int,
        max_num: int = 50,
        post_center_range: Sequence[float] | None = None,
    ) -> None:
        if len(pc_range) != 6:
            raise ValueError(f"pc_range must be [x0, y0, z0, x1, y1, z1], got {list(pc_range)}")
        if num_classes < 1 or max_num < 1:
            raise ValueError(f"num_classes and max_num must be >= 1, got {num_classes}, {max_num}")
        if post_center_range is not None and len(post_center_range) not in (0, 4):
            raise ValueError(
                f"post_center_range must be [xmin, ymin, xmax, ymax] or empty, got {list(post_center_range)}"
            )
        self.pc_range = list(pc_range)
        self.num_classes = num_classes
        self.max_num = max_num
        self.post_center_range = list(post_center_range) if post_center_range else None

    @torch.no_grad()
    def __call__(self, pred_logits: ArrayLike, pred_pts: ArrayLike) -> list[dict[str, np.ndarray]]:
        """Decode a batch.

        Args:
            pred_logits: (B, Q, C) raw logits (torch tensor or numpy array, e.g. from ONNX Runtime).
            pred_pts: (B, Q, P, 2) points normalized to [0, 1] over pc_range.
        Returns:
            B dicts, each with
                vectors: (K, P, 2) float32 meters, LiDAR frame;
                scores: (K,) float32, descending;
                labels: (K,) int64 class ids;
                query_idx: (K,) int64, the query each vector came from;
            with K <= max_num (fewer after the range filter).
        """
        logits = _as_tensor(pred_logits).float().cpu()
        pts = _as_tensor(pred_pts).float().cpu()
        if logits.dim() != 3 or pts.dim() != 4 or pts.shape[-1] != 2 or logits.shape[:2] != pts.shape[:2]:
            raise ValueError(
                f"expected logits (B, Q, C) and points (B, Q, P, 2), got {tuple(logits.shape)} and {tuple(pts.shape)}"
            )
        batch, num_queries, num_classes = logits.shape
        if num_classes != self.num_classes:
            raise ValueError(f"logits have {num_classes} classes, post-process expects {self.num_classes}")
        k = min(self.max_num, num_queries * num_classes)
        scores, flat_idx = logits.sigmoid().reshape(batch, num_queries * num_classes).topk(k, dim=1)  # (B, k)
        labels = flat_idx % num_classes  # (B, k)
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")  # (B, k)
        gather_idx = query_idx[:, :, None, None].expand(-1, -1, pts.shape[2], 2)  # (B, k, P, 2)
        picked = torch.gather(pts, 1, gather_idx)  # (B, k, P, 2)
        vectors = denormalize_points(picked, self.pc_range)  # (B, k, P, 2) meters
        keep = torch.ones(batch, k, dtype=torch.bool)
        if self.post_center_range is not None:
            xmin, ymin, xmax, ymax = self.post_center_range
            inside = (
                (vectors[..., 0] >= xmin)
                & (vectors[..., 0] <= xmax)
                & (vectors[..., 1] >= ymin)
                & (vectors[..., 1] <= ymax)
            )  # (B, k, P)
            keep = inside.all(dim=2)  # (B, k)
        results = []
        for b in range(batch):
            m = keep[b]
            results.append(
                {
                    "vectors": vectors[b][m].numpy(),
                    "scores": scores[b][m].numpy(),
                    "labels": labels[b][m].numpy(),
                    "query_idx": query_idx[b][m].numpy(),
                }
            )
        return results


def build_postprocess(cfg: ModelConfig) -> MapTRPostProcess:
    """The post-process of a model preset (pc_range, classes, max_num, post_center_range)."""
    return MapTRPostProcess(
        pc_range=cfg.pc_range,
        num_classes=cfg.num_classes,
        max_num=cfg.max_num,
        post_center_range=cfg.post_center_range,
    )
