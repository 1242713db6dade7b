"""Parameters and FLOPs of a model preset per module group (the guide's ``tools/calops.py``).

    python pipeline/count_ops.py --preset r50
    python pipeline/count_ops.py --params params.yaml --preset tiny --json reports/ops_tiny.json

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward at batch 1 (6 cameras),
on the meta device: only shapes are used, so even r50 takes about a second and no memory. Conventions:
- 1 multiply-add = 2 FLOPs (FlopCounterMode's convention for conv / matmul);
- ``grid_sample`` (deformable attention sampling) is added with 8 FLOPs per output value (4 bilinear
  taps x multiply-add), which FlopCounterMode does not count by itself;
- element-wise ops (norms, softmax, activations, additions) are not counted: they are small next to the
  convolutions and matmuls, and memory-bound rather than FLOP-bound.
The "eval" column is the deployed model (one2one queries only). The "train" column is the training
forward: it adds the one2many queries and the segmentation heads (backward not included, ~2x more).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from maptr import cli

ROOT = "MapTR"  # FlopCounterMode names modules "<root class>.<fqn>"
GROUPS = ("backbone", "neck", "encoder", "decoder", "map heads", "seg heads (train only)")


def grid_sample_flops(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    """8 FLOPs per output value: 4 bilinear taps, each a multiply-add (interpolation weights ignored)."""
    return 8 * math.prod(out_shape)


def _param_group(name: str) -> str:
    if name.startswith("head.decoder."):
        return "decoder"
    if name.startswith("head."):
        return "map heads"
    if name.startswith(("bev_seg_head.", "pv_seg_head.")):
        return "seg heads (train only)"
    return name.split(".", 1)[0]


def count_params(model) -> dict[str, int]:
    """Parameters per group of a MapTR model."""
    counts = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        counts[_param_group(name)] += p.numel()
    return counts


def count_flops(model, image_size: list[int], train: bool, batch: int = 1) -> dict[str, int]:
    """FLOPs per group of one forward of a MapTR model (meta tensors)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from maptr.models.maptr import NUM_CAMS

    width, height = image_size
    img = torch.empty(batch, NUM_CAMS, 3, height, width, device="meta")
    lidar2img = torch.empty(batch, NUM_CAMS, 4, 4, device="meta")
    model.train(train)
    counter = FlopCounterMode(
        display=False, depth=None, custom_mapping={torch.ops.aten.grid_sampler_2d: grid_sample_flops}
    )
    with counter:  # no torch.no_grad: the module tracker needs autograd (meta tensors cost nothing)
        model(img, lidar2img)
    raw = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    def get(path: str) -> int:
        return raw.get(f"{ROOT}.{path}", 0)

    # ModuleList containers are never called, so sum the layers themselves.
    decoder = sum(get(f"head.decoder.layers.{i}") for i in range(len(model.head.decoder.layers)))
    return {
        "backbone": get("backbone"),
        "neck": get("neck"),
        "encoder": get("encoder"),
        "decoder": decoder,
        # The class / point branches run inside the decoder's refinement loop; split them out here.
        "map heads": get("head") - decoder,
        "seg heads (train only)": get("bev_seg_head") + get("pv_seg_head"),
    }


def report(preset: str, params_path: str) -> dict:
    """Parameters and FLOPs per group of a preset (the params file's own by default)."""
    import torch

    from maptr.config import load_model_config, load_params
    from maptr.models.maptr import NUM_CAMS, build_maptr
    from maptr.models.spatial_cross_attention import use_dense_camera_attention

    params = load_params(params_path)
    if preset:
        params.setdefault("model", {})["preset"] = preset
    cfg = load_model_config(params)
    cfg.pretrained = ""  # shapes only: never read weight files here
    with torch.device("meta"):
        # Meta tensors have no values to find the visible camera pairs: count the dense path, an upper
        # bound (training and the exported graph sample only the visible pairs, ~1/5 of the spatial
        # cross-attention's grid_sample on the nuScenes rig).
        model = use_dense_camera_attention(build_maptr(cfg))
    param_counts = count_params(model)
    eval_flops = count_flops(model, cfg.image_size, train=False)
    train_flops = count_flops(model, cfg.image_size, train=True)
    rows = [
        {"group": g, "params": param_counts[g], "eval_flops": eval_flops[g], "train_flops": train_flops[g]}
        for g in GROUPS
    ]
    return {
        "preset": cfg.preset,
        "batch": 1,
        "num_cams": NUM_CAMS,
        "image_size": cfg.image_size,
        "bev": [cfg.bev_h, cfg.bev_w],
        "rows": rows,
        "total": {
            "params": sum(param_counts.values()),
            "eval_flops": sum(eval_flops.values()),
            "train_flops": sum(train_flops.values()),
        },
    }


def format_table(result: dict) -> str:
    w, h = result["image_size"]
    lines = [
        f"preset {result['preset']}: batch 1 x {result['num_cams']} cameras {w}x{h}, BEV {result['bev'][0]}x"
        f"{result['bev'][1]} (GFLOPs, 1 MAC = 2 FLOPs; train = training forward incl. one2many + seg)",
        f"{'group':<24}{'params (M)':>12}{'eval GFLOPs':>14}{'train GFLOPs':>14}",
    ]
    for row in [*result["rows"], {"group": "total", **result["total"]}]:
        lines.append(
            f"{row['group']:<24}{row['params'] / 1e6:>12.3f}{row['eval_flops'] / 1e9:>14.3f}"
            f"{row['train_flops'] / 1e9:>14.3f}"
        )
    return "\n".join(lines)


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="", help="model preset; empty: model.preset of the params file")
    p.add_argument("--json", default="", help="also write the figures to this JSON file; empty: print only")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from maptr.atomic import write_text_atomic

    result = report(args.preset, args.params)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
