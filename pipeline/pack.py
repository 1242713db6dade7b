"""Stage `pack`: a nuScenes-format root -> LMDB (images + camera geometry) and metas (map ground truth).

Reads section `pack` of params.yaml. The same command packs the synthetic default and the real nuScenes
(`pack.dataroot` and `pack.version`, e.g. `v1.0-mini`).
"""

from __future__ import annotations

import time

from maptr import cli
from maptr.config import PackConfig, load_params, load_section
from maptr.data.packing import pack_nuscenes


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="data/packed", help="output folder (train_lmdb, val_lmdb, metas)")
    p.add_argument("--dataroot", default=None, help="override pack.dataroot (a nuScenes root)")
    args = p.parse_args()
    cfg = load_section(load_params(args.params), "pack", PackConfig)
    start = time.perf_counter()
    info = pack_nuscenes(
        dataroot=args.dataroot or cfg.dataroot,
        version=cfg.version,
        out=args.out,
        pc_range=cfg.pc_range,
        classes=cfg.classes,
    )
    print(f"packed {info['num_samples']} samples into {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main)
