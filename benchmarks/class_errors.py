"""How far a float checkpoint's predictions are from each GT element, per class: place, shape or rank?

Two views of the val split, per class, all in the metric's chamfer distance (polylines resampled to
100 points, as the metric does):

- nearest: for every GT element, the prediction of its class (score >= ``--min-score``) nearest to it,
  and that distance again after moving the prediction's centroid onto the GT's. A small aligned distance
  means the class is found in the wrong place; a large one, that its shape is wrong. Also the gap between
  the first and last point of predicted ped crossings (GT rings are closed).
- ranked: the class's predictions in score order, as many as it has GT elements; each is a hit (the
  first within 1.5 m of a GT element), a duplicate (within 1.5 m of a GT already hit), a near miss
  (1.5-3 m) or a false positive (farther).

What a perfect model of the ``num_pts_per_vec``-point target would still score: target_resolution.py.

    python benchmarks/class_errors.py                                    # models/float-checkpoint-best.pt
    python benchmarks/class_errors.py --checkpoint other.pt --params other_params.yaml
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/float-checkpoint-best.pt")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--packed", default="data/packed")
    parser.add_argument("--min-score", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from maptr.classes import CLASS_NAMES
    from maptr.config import load_model_config, load_params
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.evaluation.chamfer_ap import chamfer_distance_matrix, resample_polylines
    from maptr.evaluation.inference import evaluate_model, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    cfg = load_model_config(load_params(args.params))
    model = build_model_from_checkpoint(cfg, load_checkpoint(args.checkpoint, expect_preset=cfg.preset))
    val = PackedMapDataset(args.packed, "val", DatasetOptions.from_model(cfg))
    metrics, preds = evaluate_model(torch_predictor(model, torch.device("cpu")), val, build_postprocess(cfg))

    def resampled(vectors: list) -> torch.Tensor:  # K polylines -> (K, 100, 2)
        return torch.stack([resample_polylines(torch.as_tensor(np.asarray(v, np.float32))[None])[0] for v in vectors])

    classes = range(len(CLASS_NAMES))
    nearest: dict[int, list[tuple[float, float]]] = {c: [] for c in classes}
    num_gt = {c: 0 for c in classes}
    ranked: dict[int, list[tuple[float, int]]] = {c: [] for c in classes}  # (score, 0 hit .. 3 false positive)
    gaps = []
    for pred in preds:
        gt = val.ground_truth(pred["index"])
        keep = pred["scores"] >= args.min_score
        for cls in classes:
            gt_vec = [v for v, label in zip(gt["vectors"], gt["labels"], strict=True) if label == cls]
            gts = resampled(gt_vec) if gt_vec else None  # (G, 100, 2)
            num_gt[cls] += len(gt_vec)
            order = np.flatnonzero(pred["labels"] == cls)
            order = order[np.argsort(-pred["scores"][order], kind="stable")]
            if not len(order):
                continue
            if gts is None:
                ranked[cls] += [(float(pred["scores"][i]), 3) for i in order]
                continue
            ours = resampled(list(pred["vectors"][order]))  # (K, 100, 2), score order
            dist = chamfer_distance_matrix(ours, gts)  # (K, G)
            hit: set[int] = set()
            for k, i in enumerate(order):
                j = int(dist[k].argmin())
                d = float(dist[k, j])
                kind = (1 if j in hit else 0) if d < 1.5 else (2 if d < 3.0 else 3)
                hit |= {j} if kind == 0 else set()
                ranked[cls].append((float(pred["scores"][i]), kind))
            mine = keep[order]
            if not mine.any():
                continue
            for j in range(len(gt_vec)):
                i = int(torch.where(torch.as_tensor(mine), dist[:, j], torch.inf).argmin())
                moved = ours[i] - ours[i].mean(0) + gts[j].mean(0)
                aligned = float(chamfer_distance_matrix(moved[None], gts[j][None])[0, 0])
                nearest[cls].append((float(dist[i, j]), aligned))
        ped = keep & (pred["labels"] == CLASS_NAMES.index("ped_crossing"))
        gaps += [float(np.linalg.norm(v[0] - v[-1])) for v in pred["vectors"][ped]]

    print(f"{args.checkpoint}: val mAP {metrics['mAP']:.4f}")
    print(f"nearest prediction (score >= {args.min_score}) per GT")
    for cls, name in enumerate(CLASS_NAMES):
        d = np.array(nearest[cls]).reshape(-1, 2)  # (N, [chamfer, centroid-aligned chamfer])
        ap = " / ".join(f"{metrics[f'AP_{name}_{t}']:.3f}" for t in (0.5, 1.0, 1.5))
        near = "no prediction of its class"
        if len(d):
            near = (f"chamfer median {np.median(d[:, 0]):.2f} m, < 1.0 m {np.mean(d[:, 0] < 1):.2f}; "
                    f"centroid-aligned median {np.median(d[:, 1]):.2f} m")  # fmt: skip
        print(f"  {name:<13} n={len(d):4d}  {near}; AP at 0.5 / 1.0 / 1.5 m {ap}")
    print("top-ranked predictions, as many as the class has GT elements: hit / duplicate / near miss / false positive")
    for cls, name in enumerate(CLASS_NAMES):
        kinds = np.array([k for _, k in sorted(ranked[cls], key=lambda r: -r[0])][: num_gt[cls]])
        shares = " / ".join(f"{np.mean(kinds == k):.2f}" for k in range(4)) if len(kinds) else "-"
        print(f"  {name:<13} top {len(kinds):4d}: {shares}")
    if gaps:
        print(f"predicted ped crossing rings: first-to-last point gap median {np.median(gaps):.2f} m (n={len(gaps)})")


if __name__ == "__main__":
    main()
