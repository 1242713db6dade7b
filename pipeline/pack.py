"""Stage `pack`: a nuScenes-format root -> LMDB (images + camera geometry) and metas (map ground truth).

Reads section `pack` of params.yaml. The same command packs the synthetic default and the real nuScenes
(`pack.dataroot` and `pack.version`, e.g. `v1.0-mini`).
"""

from __future__ import annotations

import time
from dataclasses import asdict

from maptr import cli
from maptr.config import PackConfig, load_params, load_section
from maptr.data.packing import pack_nuscenes
from maptr.training.lineage import log_dataset
from maptr.training.run_group import open_stage_run, stage_main


@stage_main
def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="data/packed", help="output folder (train_lmdb, val_lmdb, metas)")
    p.add_argument("--dataroot", default=None, help="override pack.dataroot (a nuScenes root)")
    args = p.parse_args()
    cfg = load_section(load_params(args.params), "pack", PackConfig)
    run = open_stage_run("pack", {"pack": asdict(cfg)}, args.params)
    start = time.perf_counter()
    info = pack_nuscenes(
        dataroot=args.dataroot or cfg.dataroot,
        version=cfg.version,
        out=args.out,
        pc_range=cfg.pc_range,
        classes=cfg.classes,
    )
    seconds = time.perf_counter() - start
    print(f"packed {info['num_samples']} samples into {args.out} in {seconds:.1f} s")
    run.log_metrics({f"{split}_samples": n for split, n in info["num_samples"].items()} | {"seconds": seconds})
    log_dataset(run, args.out, "packed")  # its digest is the hash DVC records for the folder in dvc.lock


if __name__ == "__main__":
    cli.run(main)
