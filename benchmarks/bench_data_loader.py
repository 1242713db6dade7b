"""Data loader throughput: the packed LMDB dataset (num_workers 0 and 2; the second pass over an
in-memory cache, `float.cache_mb`) vs decoding the same JPEGs from the nuScenes folder (what a loader
without packing reads per sample), and JPEG decoding at full vs 1/2 scale in the DCT domain.

    python benchmarks/bench_data_loader.py --packed data/packed --dataroot data/nuscenes --samples 200
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from maptr.config import load_model_config, load_params
from maptr.data.dataset import DatasetOptions, PackedMapDataset, collate, decode_views
from maptr.data.packing import CAMERAS, open_nuscenes


def loader_rate(ds, n: int, workers: int, batch: int) -> float:
    loader = DataLoader(Subset(ds, range(n)), batch_size=batch, num_workers=workers, collate_fn=collate)
    start = time.perf_counter()
    count = sum(len(b["meta"]) for b in loader)
    return count / (time.perf_counter() - start)


def lmdb_decode_rate(ds: PackedMapDataset, n: int, reduced: bool = False) -> float:
    """Per sample: read the packed record (one LMDB get, checksum) and decode its six JPEGs, at full
    size or (``reduced``) at 1/2 scale in the DCT domain (what the loader does for an input of exactly
    half the JPEG width, e.g. r50's 800 px from nuScenes' 1600)."""
    start = time.perf_counter()
    for i in range(n):
        rec = ds.read_record(i)
        if reduced:
            decode_views(rec.jpegs, rec.image_sizes, rec.lidar2img, int(rec.image_sizes[0][0]) // 2, "bench")
            continue
        for jpeg in rec.jpegs:
            img = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
            cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return n / (time.perf_counter() - start)


def folder_rate(dataroot: str, version: str, n: int) -> float:
    """Per sample: resolve the six camera files through the devkit tables and decode them (no transforms)."""
    nusc = open_nuscenes(dataroot, version)
    start = time.perf_counter()
    for sample in nusc.sample[:n]:
        for cam in CAMERAS:
            path = Path(dataroot) / nusc.get("sample_data", sample["data"][cam])["filename"]
            img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
            cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--packed", default="data/packed")
    p.add_argument("--dataroot", default="data/nuscenes")
    p.add_argument("--version", default="v1.0-trainval")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_model_config(load_params(args.params))
    for augment in (False, True):
        opts = DatasetOptions.from_model(cfg, augment=augment)
        ds = PackedMapDataset(args.packed, "train", opts)
        n = min(args.samples, len(ds))
        for workers in (0, 2):
            rate = loader_rate(ds, n, workers, args.batch)
            print(f"packed LMDB, full item (decode+transforms+targets), augment={augment}, "
                  f"num_workers={workers}: {rate:.1f} samples/s")  # fmt: skip
        cached = PackedMapDataset(args.packed, "train", replace(opts, cache_mb=4096))
        loader_rate(cached, n, 0, args.batch)  # fills the cache
        rate = loader_rate(cached, n, 0, args.batch)
        print(f"packed LMDB, full item from the in-memory cache, augment={augment}, num_workers=0: "
              f"{rate:.1f} samples/s ({cached.cached_items} items cached)")  # fmt: skip
    print(f"packed LMDB, read + JPEG decode only: {lmdb_decode_rate(ds, n):.1f} samples/s")
    print("packed LMDB, read + JPEG decode at 1/2 scale in the DCT domain (an input of half the JPEG width): "
          f"{lmdb_decode_rate(ds, n, reduced=True):.1f} samples/s")  # fmt: skip
    rate = folder_rate(args.dataroot, args.version, n)
    print(f"nuScenes folder, devkit lookup + file read + JPEG decode only: {rate:.1f} samples/s")


if __name__ == "__main__":
    main()
