"""Make the GPU check's data on the pipeline's machine (its venv: synth and pack need nuscenes-devkit,
shapely and lmdb, which the GPU machines lack):

    make gpu-check-data          # = python benchmarks/make_gpu_check_data.py --out data/gpu_check

Writes data/gpu_check/{r50.npz, learn.npz, manifest.json}, ~7.5 MB, git-ignored, deterministic for a
given params.yaml (``synth.seed``). See maptr/gpucheck/data.py for what each file holds.
"""

from __future__ import annotations

import argparse
import sys
import time

from maptr.config import ParamsError, load_params
from maptr.gpucheck.data import make_check_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (sections synth and pack)")
    p.add_argument("--out", default="data/gpu_check", help="folder to write")
    p.add_argument("--r50-samples", type=int, default=4, help="1600x900 key frames for the r50 figures")
    p.add_argument("--learn-scenes", type=int, default=2, help="scenes of the learn set")
    p.add_argument("--learn-samples-per-scene", type=int, default=8, help="key frames per learn scene")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = make_check_data(
            args.out,
            load_params(args.params),
            r50_samples=args.r50_samples,
            learn_scenes=args.learn_scenes,
            learn_samples_per_scene=args.learn_samples_per_scene,
        )
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, entry in manifest["files"].items():
        width, height = entry["image_size"]
        print(f"{args.out}/{name}: {entry['samples']} samples, {width}x{height}, {entry['bytes'] / 2**20:.1f} MiB")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
