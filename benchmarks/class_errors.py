"""How far a float checkpoint's predictions are from each GT element, per class: place or shape?

For every val GT element, the prediction of its class (score >= ``--min-score``) nearest to it in the
metric's chamfer distance (both resampled to 100 points, as the metric does), and that distance again
after moving the prediction's centroid onto the GT's. A small aligned distance means the class is found
in the wrong place; a large one, that its shape is wrong. Also the gap between the first and last point of
predicted ped crossings (GT rings are closed).

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

    rows: dict[int, list[tuple[float, float]]] = {c: [] for c in range(len(CLASS_NAMES))}
    gaps = []
    for pred in preds:
        gt = val.ground_truth(pred["index"])
        keep = pred["scores"] >= args.min_score
        for cls in rows:
            gt_vec = [v for v, label in zip(gt["vectors"], gt["labels"], strict=True) if label == cls]
            mine = keep & (pred["labels"] == cls)
            if not gt_vec or not mine.any():
                continue
            gts, ours = resampled(gt_vec), resampled(list(pred["vectors"][mine]))  # (G, 100, 2), (K, 100, 2)
            dist = chamfer_distance_matrix(ours, gts)  # (K, G)
            for j in range(len(gt_vec)):
                i = int(dist[:, j].argmin())
                moved = ours[i] - ours[i].mean(0) + gts[j].mean(0)
                rows[cls].append((float(dist[i, j]), float(chamfer_distance_matrix(moved[None], gts[j][None])[0, 0])))
        ped = keep & (pred["labels"] == CLASS_NAMES.index("ped_crossing"))
        gaps += [float(np.linalg.norm(v[0] - v[-1])) for v in pred["vectors"][ped]]

    print(f"{args.checkpoint}: val mAP {metrics['mAP']:.4f}; nearest prediction (score >= {args.min_score}) per GT")
    for cls, name in enumerate(CLASS_NAMES):
        d = np.array(rows[cls]).reshape(-1, 2)  # (N, [chamfer, centroid-aligned chamfer])
        if not len(d):
            print(f"  {name}: no GT with a prediction of its class")
            continue
        ap = [f"{metrics[f'AP_{name}_{t}']:.3f}" for t in (0.5, 1.0, 1.5)]
        print(
            f"  {name:<13} n={len(d):4d}  chamfer median {np.median(d[:, 0]):.2f} m, "
            f"< 1.0 m {np.mean(d[:, 0] < 1):.2f}; "
            f"centroid-aligned median {np.median(d[:, 1]):.2f} m; AP at 0.5 / 1.0 / 1.5 m {' / '.join(ap)}"
        )
    if gaps:
        print(f"  predicted ped crossing rings: first-to-last point gap median {np.median(gaps):.2f} m (n={len(gaps)})")


if __name__ == "__main__":
    main()
