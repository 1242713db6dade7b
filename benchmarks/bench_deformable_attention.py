"""Vectorized deformable attention sampling vs the per-point loop, and its cost at the presets' sizes.

    python benchmarks/bench_deformable_attention.py [--threads 2]     # tiny sizes, ~7 s
    python benchmarks/bench_deformable_attention.py --presets tiny r50  # + the r50 rows, ~1.5-2 min

1. Small problem (Lq = 200 queries, 8 heads, 1 level 25x50, 4 points): ``deformable_sample`` (one
   grid_sample per level) against ``deformable_sample_reference`` (a Python loop per batch, query, head,
   level and point), with the max difference between them.
2. The vectorized sampler forward and forward+backward at the sizes the models use it: BEV
   self-attention, spatial cross-attention (6 cameras) and the decoder cross-attention, tiny and r50.
3. The spatial cross-attention module, forward+backward, sampling only the visible (query, camera)
   pairs (training) vs the dense masked path (export), on a nuScenes-like rig of six cameras.
"""

from __future__ import annotations

import argparse
import time

import torch

from maptr.config import load_model_config, load_params
from maptr.models.camera_projection import pillar_points, project_to_cameras
from maptr.models.deformable_attention import deformable_sample
from maptr.models.deformable_attention_reference import deformable_sample_reference
from maptr.models.spatial_cross_attention import SpatialCrossAttention

# nuScenes' camera yaws (front, front-right, front-left, back, back-left, back-right; 0 = forward, degrees
# towards +x) and focal lengths as a fraction of the image width (1266 / 1600 px; the back camera 800 / 1600).
RIG = [(0, 0.79), (55, 0.79), (-55, 0.79), (180, 0.5), (-110, 0.79), (110, 0.79)]


def _inputs(n: int, num_query: int, heads: int, dims: int, shape: tuple[int, int], points: int, grad: bool):
    h, w = shape
    value = torch.randn(n, h * w, heads, dims, requires_grad=grad)
    locations = torch.rand(n, num_query, heads, 1, points, 2, requires_grad=grad)
    weights = torch.rand(n, num_query, heads, 1, points).softmax(-1).requires_grad_(grad)
    return value, [shape], locations, weights


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def compare_with_loop() -> None:
    torch.manual_seed(0)
    value, shapes, locations, weights = _inputs(1, 200, 8, 32, (50, 25), 4, grad=False)
    fast = _best_of(lambda: deformable_sample(value, shapes, locations, weights), 20)
    start = time.perf_counter()
    slow_out = deformable_sample_reference(value, shapes, locations, weights)
    slow = time.perf_counter() - start
    diff = (deformable_sample(value, shapes, locations, weights) - slow_out).abs().max().item()
    print("1. Lq=200, 8 heads x 32 dims, 1 level 50x25, 4 points, float32")
    print(f"   vectorized (grid_sample)  {fast * 1e3:10.3f} ms")
    print(f"   per-point Python loop     {slow * 1e3:10.1f} ms   ({slow / fast:,.0f}x slower), max |diff| {diff:.2e}")


def preset_sizes(preset: str) -> list[tuple[str, tuple]]:
    params = load_params("params.yaml")
    params["model"]["preset"] = preset
    cfg = load_model_config(params)
    heads, dims = cfg.num_heads, cfg.embed_dims // cfg.num_heads
    bev = (cfg.bev_h, cfg.bev_w)
    feat = (cfg.image_size[1] // cfg.feature_stride, cfg.image_size[0] // cfg.feature_stride)
    lq = cfg.bev_h * cfg.bev_w
    decoder_q = (cfg.num_vec_one2one + cfg.num_vec_one2many) * cfg.num_pts_per_vec
    return [
        (f"{preset} BEV self-attn      Lq={lq}", (1, lq, heads, dims, bev, cfg.encoder_tsa_points)),
        (f"{preset} spatial cross-attn 6x Lq={lq}", (6, lq, heads, dims, feat, cfg.encoder_sca_points)),
        (f"{preset} decoder cross-attn Lq={decoder_q}", (1, decoder_q, heads, dims, bev, cfg.decoder_points)),
    ]


def preset_timings(presets: list[str], repeats: int) -> None:
    print("2. vectorized sampler at the presets' sizes (train: one2one + one2many decoder queries)")
    print(f"   {'call':<42}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for preset in presets:
        for name, (n, lq, heads, dims, shape, points) in preset_sizes(preset):
            torch.manual_seed(0)
            reps = repeats if preset == "tiny" else 1
            value, shapes, locations, weights = _inputs(n, lq, heads, dims, shape, points, grad=True)
            with torch.no_grad():
                fwd = _best_of(lambda: deformable_sample(value, shapes, locations, weights), reps)  # noqa: B023
            both = _best_of(
                lambda: deformable_sample(value, shapes, locations, weights).sum().backward(),  # noqa: B023
                reps,
            )
            print(f"   {name:<42}{fwd * 1e3:>12.2f}{both * 1e3:>12.2f}")


def nuscenes_like_rig(image_size: tuple[int, int], batch: int) -> torch.Tensor:
    """lidar2img (B, 6, 4, 4) of six level pinhole cameras at the LiDAR origin, nuScenes' yaws and FOVs."""
    width, height = image_size
    mats = []
    for yaw_deg, focal_fraction in RIG:
        yaw = torch.tensor(yaw_deg * torch.pi / 180.0)
        focal = focal_fraction * width
        intrinsics = torch.tensor([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        lidar2cam = torch.eye(4)
        forward = torch.stack([torch.sin(yaw), torch.cos(yaw), torch.tensor(0.0)])  # x right, y forward
        right = torch.stack([torch.cos(yaw), -torch.sin(yaw), torch.tensor(0.0)])
        lidar2cam[:3, :3] = torch.stack([right, torch.tensor([0.0, 0.0, -1.0]), forward])  # rows: right, down, fwd
        mats.append(intrinsics @ lidar2cam)
    return torch.stack(mats)[None].repeat(batch, 1, 1, 1)


def camera_attention_timings(presets: list[str], repeats: int) -> None:
    print("3. spatial cross-attention module fwd+bwd, batch 2: visible pairs (training) vs dense (export)")
    print(f"   {'preset':<8}{'visible pairs':>15}{'visible ms':>12}{'dense ms':>12}{'speed-up':>10}")
    for preset in presets:
        params = load_params("params.yaml")
        params["model"]["preset"] = preset
        cfg = load_model_config(params)
        torch.manual_seed(0)
        feat = (cfg.image_size[1] // cfg.feature_stride, cfg.image_size[0] // cfg.feature_stride)
        lidar2img = nuscenes_like_rig((cfg.image_size[0], cfg.image_size[1]), batch=2)
        points = pillar_points(cfg.bev_h, cfg.bev_w, cfg.num_points_in_pillar, cfg.pc_range)
        ref, visible = project_to_cameras(points, lidar2img, (cfg.image_size[0], cfg.image_size[1]))
        sca = SpatialCrossAttention(cfg.embed_dims, cfg.num_heads, cfg.encoder_sca_points, cfg.num_points_in_pillar)
        query = torch.randn(2, cfg.bev_h * cfg.bev_w, cfg.embed_dims, requires_grad=True)
        features = torch.randn(12, feat[0] * feat[1], cfg.embed_dims, requires_grad=True)
        reps = repeats if preset == "tiny" else 2
        timings = []
        for gather_visible in (True, False):
            sca.gather_visible = gather_visible
            timings.append(
                _best_of(lambda: sca(query, features, feat, ref, visible).sum().backward(), reps)  # noqa: B023
            )
        print(
            f"   {preset:<8}{visible.mean().item():>14.1%}{timings[0] * 1e3:>12.1f}{timings[1] * 1e3:>12.1f}"
            f"{timings[1] / timings[0]:>9.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--presets", nargs="+", choices=["tiny", "r50"], default=["tiny"],
        help="sizes of parts 2 and 3 (r50 adds ~1-1.5 min on 2 cores: one repeat each, 1-15 s per call)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (best of {args.repeats} runs)")
    compare_with_loop()
    preset_timings(args.presets, args.repeats)
    camera_attention_timings(args.presets, args.repeats)


if __name__ == "__main__":
    main()
