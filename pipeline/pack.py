"""Stage `pack`: a nuScenes-format root -> LMDB (images + camera geometry) and metas (map ground truth).

    python pipeline/pack.py --params params.yaml --dataroot data/nuscenes --out data/packed

Reads section `pack` of params.yaml. The same command packs the synthetic default and the real nuScenes
(`-S pack.dataroot=/data/nuscenes`; `pack.version: auto` finds the root's one v1.0-* folder, e.g.
`v1.0-mini`). dvc.yaml passes `--dataroot ${pack.dataroot}`, so DVC hashes the root that is packed.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from maptr import cli
from maptr.training.lineage import log_dataset
from maptr.training.run_group import open_stage_run, stage_main


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--out", default="data/packed", help="output folder (train_lmdb, val_lmdb, metas)")
    # Required, not read from params.yaml here: dvc.yaml passes `--dataroot ${pack.dataroot}`, the same value,
    # and lists it as a dep, so the root that is packed is the one DVC hashes.
    p.add_argument("--dataroot", required=True, help="the nuScenes root to pack (pack.dataroot in dvc.yaml)")
    return p


@stage_main
def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading the packer.
    from maptr.config import PackConfig, load_params, load_section
    from maptr.data.packing import pack_nuscenes

    cfg = load_section(load_params(args.params), "pack", PackConfig)
    run = open_stage_run("pack", {"pack": asdict(cfg)}, args.params)
    start = time.perf_counter()
    info = pack_nuscenes(
        dataroot=args.dataroot,
        version=cfg.version,
        out=args.out,
        pc_range=cfg.pc_range,
    )
    seconds = time.perf_counter() - start
    print(f"packed {info['num_samples']} samples into {args.out} in {seconds:.1f} s")
    run.log_metrics({f"{split}_samples": n for split, n in info["num_samples"].items()} | {"seconds": seconds})
    log_dataset(run, args.out, "packed")  # its digest is the hash DVC records for the folder in dvc.lock


if __name__ == "__main__":
    cli.run(main)
