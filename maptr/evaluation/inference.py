"""Validation: run a model over a dataset, post-process, and score with the chamfer mAP.

The same function serves float-train's per-epoch validation, calibration, QAT and ``predict.py``; under
torchrun every rank predicts its share of the samples and rank 0 scores them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from maptr.data.dataset import PackedMapDataset, collate
from maptr.distributed import DistContext, broadcast_from_main, gather_to_main
from maptr.evaluation import evaluate
from maptr.evaluation.postprocess import MapTRPostProcess

Predictor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def torch_predictor(model: torch.nn.Module, device: torch.device) -> Predictor:
    """(img, lidar2img) -> (pred_logits (B, Q, C), pred_pts (B, Q, P, 2) normalized) of the one2one group."""

    def run(img: torch.Tensor, lidar2img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(img.to(device), lidar2img.to(device))
        return out["pred_logits"].float().cpu(), out["pred_pts"].float().cpu()

    return run


@torch.no_grad()
def predict_dataset(
    predictor: Predictor,
    dataset: PackedMapDataset,
    postprocess: MapTRPostProcess,
    *,
    batch_size: int = 4,
    num_workers: int = 0,
    ctx: DistContext | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> list[dict] | None:
    """Predictions for every sample (in dataset order) on rank 0; None on other ranks.

    Each prediction: {index, vectors (K, P, 2) meters, scores (K,), labels (K,)}.
    """
    ctx = ctx or DistContext()
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    mine = indices[ctx.rank :: ctx.world_size]
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    out: list[dict] = []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not (progress and ctx.is_main), leave=False):
        logits, pts = predictor(batch["img"], batch["lidar2img"])
        for meta, det in zip(batch["meta"], postprocess(logits, pts), strict=True):
            out.append({"index": meta["index"], **{k: np.asarray(v) for k, v in det.items()}})
    gathered = gather_to_main(out, ctx)
    if gathered is None:
        return None
    return sorted(gathered, key=lambda d: d["index"])


def score_predictions(predictions: list[dict], dataset: PackedMapDataset) -> dict[str, float]:
    """Chamfer mAP of predictions against the dataset's full-resolution ground truth."""
    gts = [dataset.ground_truth(p["index"]) for p in predictions]
    return evaluate(predictions, gts)


def evaluate_model(
    predictor: Predictor,
    dataset: PackedMapDataset,
    postprocess: MapTRPostProcess,
    *,
    ctx: DistContext | None = None,
    **options: Any,
) -> tuple[dict[str, float], list[dict] | None]:
    """(metrics, predictions) of :func:`predict_dataset` (``options``: its batch_size, num_workers, limit,
    progress); metrics are broadcast to every rank, predictions stay on rank 0."""
    ctx = ctx or DistContext()
    preds = predict_dataset(predictor, dataset, postprocess, ctx=ctx, **options)
    metrics = score_predictions(preds, dataset) if preds is not None else None
    return broadcast_from_main(metrics, ctx), preds
