"""How a change of ground truth or metric moves mAP: one model's predictions scored 2 x 2.

The same predictions (the model sees the same images in both packs) are scored with an earlier
revision's metric and the current one, against an earlier pack's ground truth and the current one, so
the change splits into its metric part and its ground-truth part.

    python benchmarks/protocol_change.py --checkpoint models/float-checkpoint-best.pt \\
        --old-packed /path/to/old/packed --new-packed data/packed --old-metric-rev 4da1e2a \\
        --out reports/protocol_change.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METRIC_PATH = "maptr/evaluation/chamfer_ap.py"
CLASSES = ("divider", "ped_crossing", "boundary")


def gt_change(old: list[dict], new: list[dict]) -> dict:
    """Per class: instance counts, closed rings, and how far each new instance lies from the nearest old one
    of its class in the same sample (chamfer distance, meters)."""
    import numpy as np
    import torch

    from maptr.evaluation.chamfer_ap import chamfer_distance_matrix, resample_polylines

    def lines(gt: dict, cls: int) -> list[np.ndarray]:
        return [
            np.asarray(v, dtype=np.float64) for v, lab in zip(gt["vectors"], gt["labels"], strict=True) if lab == cls
        ]

    out = {}
    for cls, name in enumerate(CLASSES):
        shifts, counts, closed = [], [0, 0], [0, 0]
        for o, n in zip(old, new, strict=True):
            ol, nl = lines(o, cls), lines(n, cls)
            for side, group in enumerate((ol, nl)):
                counts[side] += len(group)
                closed[side] += sum(bool(np.allclose(v[0], v[-1])) for v in group)
            if ol and nl:
                stack = [resample_polylines(torch.from_numpy(v)[None])[0] for v in (*nl, *ol)]
                cd = chamfer_distance_matrix(torch.stack(stack[: len(nl)]), torch.stack(stack[len(nl) :]))
                shifts += cd.min(dim=1).values.tolist()
        s = np.asarray(shifts)
        out[name] = {
            "instances_old": counts[0], "instances_new": counts[1], "closed_old": closed[0], "closed_new": closed[1],
            "shift_m_median": float(np.median(s)), "shift_m_p90": float(np.percentile(s, 90)),
            "shift_m_max": float(s.max()),
        }  # fmt: skip
    return out


def metric_at_revision(rev: str):
    """The ``evaluate`` function of ``chamfer_ap.py`` as it was at git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:{METRIC_PATH}"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"chamfer_ap_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"chamfer_ap_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--checkpoint", default="models/float-checkpoint-best.pt")
    p.add_argument("--old-packed", required=True, help="a pack of the same world made with the earlier GT code")
    p.add_argument("--new-packed", default="data/packed")
    p.add_argument("--old-metric-rev", required=True, help="git revision holding the earlier metric")
    p.add_argument("--out", default=None, help="write the 2 x 2 table as JSON here")
    args = p.parse_args()

    import torch

    from maptr.config import load_model_config, load_params
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.evaluation import evaluate
    from maptr.evaluation.inference import predict_dataset, torch_predictor
    from maptr.evaluation.postprocess import build_postprocess
    from maptr.quant.quantizer import build_model_from_checkpoint
    from maptr.training.checkpoint import load_checkpoint

    model_cfg = load_model_config(load_params(args.params))
    model = build_model_from_checkpoint(model_cfg, load_checkpoint(args.checkpoint, expect_preset=model_cfg.preset))
    options = DatasetOptions.from_model(model_cfg)
    new_ds = PackedMapDataset(args.new_packed, "val", options)
    old_ds = PackedMapDataset(args.old_packed, "val", options)
    if len(new_ds) != len(old_ds):
        sys.exit(f"error: {args.old_packed} and {args.new_packed} hold different val splits; pack the same world")
    preds = predict_dataset(torch_predictor(model, torch.device("cpu")), new_ds, build_postprocess(model_cfg))
    gts = {
        "old_gt": [old_ds.ground_truth(d["index"]) for d in preds],
        "new_gt": [new_ds.ground_truth(d["index"]) for d in preds],
    }
    metrics = {"old_metric": metric_at_revision(args.old_metric_rev), "new_metric": evaluate}
    table = {f"{m}/{g}": fn(preds, gt) for m, fn in metrics.items() for g, gt in gts.items()}
    changes = gt_change(gts["old_gt"], gts["new_gt"])
    for name, row in changes.items():
        print(name, ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    keys = ("mAP", "AP_divider", "AP_ped_crossing", "AP_boundary")
    print(f"{'':24s}" + "".join(f"{k:>17s}" for k in keys))
    for name, row in table.items():
        print(f"{name:24s}" + "".join(f"{row[k]:17.4f}" for k in keys))
    if args.out:
        report = {"checkpoint": args.checkpoint, "old_packed": args.old_packed, "new_packed": args.new_packed,
                  "old_metric_rev": args.old_metric_rev, "scores": table, "gt_change": changes}  # fmt: skip
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
