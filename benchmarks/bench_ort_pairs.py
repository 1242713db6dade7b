"""Deployed / float latency of several (float ONNX, deployed ONNX) pairs, timed in the same rounds.

A model change (say nano's decoder points) changes both models, and the VM's speed drifts by more than
the change; timing the old and the new pair one after the other compares two machine states. Here every
round times each of the models in turn (a fresh 2-thread session, untimed warm-up runs, then timed
runs) on the same packed val frame, and the ratio of each pair is the median over rounds of that round's
deployed / float median, as the compile report's paired figure.

    python benchmarks/bench_ort_pairs.py \\
        --pair dp4=OLD_FLOAT.onnx,OLD_DEPLOY.onnx --pair dp8=models/maptr_float.onnx,models/maptr_deploy.onnx

An earlier run's models are in the DVC cache: `git show REV:dvc.lock` gives their md5, and the file is
`.dvc/cache/files/md5/<first 2 hex digits>/<the other 30>`.
"""

from __future__ import annotations

import argparse
import time


def parse_pair(text: str) -> tuple[str, str, str]:
    name, _, paths = text.partition("=")
    float_path, _, deploy_path = paths.partition(",")
    if not (name and float_path and deploy_path):
        raise argparse.ArgumentTypeError(f"--pair {text!r}: expected NAME=FLOAT.onnx,DEPLOYED.onnx")
    return name, float_path, deploy_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=parse_pair, action="append", required=True, help="NAME=FLOAT.onnx,DEPLOYED.onnx")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--packed", default="data/packed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--runs", type=int, default=4, help="timed runs per model per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per session")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    from maptr.config import load_model_config, load_params
    from maptr.data.dataset import DatasetOptions, PackedMapDataset

    cfg = load_model_config(load_params(args.params))
    item = PackedMapDataset(args.packed, "val", DatasetOptions.from_model(cfg))[0]
    feeds = {"img": item["img"][None].numpy(), "lidar2img": item["lidar2img"][None].numpy().astype(np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1

    models = [(f"{name}/{kind}", path) for name, f, d in args.pair for kind, path in (("float", f), ("deployed", d))]
    round_medians: dict[str, list[float]] = {key: [] for key, _ in models}
    for _ in range(args.rounds):
        for key, path in models:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            for _ in range(args.warmup):
                session.run(None, feeds)
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            round_medians[key].append(float(np.median(times)) * 1e3)
            del session  # one session alive at a time
    print(f"{args.threads} threads, {args.rounds} rounds x {args.runs} runs per model")
    for name, _, _ in args.pair:
        flt, dep = np.array(round_medians[f"{name}/float"]), np.array(round_medians[f"{name}/deployed"])
        ratio = dep / flt  # (rounds,)
        print(
            f"  {name}: float {np.median(flt):.1f} ms, deployed {np.median(dep):.1f} ms, deployed / float "
            f"{np.median(ratio):.3f} (p25 - p75 {np.percentile(ratio, 25):.3f} - {np.percentile(ratio, 75):.3f})"
        )


if __name__ == "__main__":
    main()
