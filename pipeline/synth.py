"""Stage `synth`: generate the synthetic nuScenes-format world and its statistics.

    python pipeline/synth.py --params params.yaml --out data/nuscenes --stats reports/synth_stats.json

Reads the `synth` section of params.yaml. Both outputs appear atomically: the world is written to a
temporary sibling folder and renamed into place, the stats file is written to a temporary file and
moved with os.replace, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import argparse
import json
import time

from maptr import cli
from maptr.training.run_group import open_stage_run, stage_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (section `synth`)")
    parser.add_argument("--out", default="data/nuscenes", help="dataroot to create (replaced if it exists)")
    parser.add_argument("--stats", default="reports/synth_stats.json", help="statistics JSON to write")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes rendering scenes (default: all cores); the output does not depend on it",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


@stage_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing: `--help` answers without loading the renderer.
    from maptr.atomic import write_text_atomic
    from maptr.config import SynthConfig, load_params, load_section
    from maptr.data.synthetic import generate_world

    cfg = load_section(load_params(args.params), "synth", SynthConfig)
    run = open_stage_run("synth", {"synth": vars(cfg)}, args.params)
    start = time.perf_counter()
    stats = generate_world(
        args.out,
        seed=cfg.seed,
        version=cfg.version,
        train_scenes=cfg.train_scenes,
        val_scenes=cfg.val_scenes,
        samples_per_scene=cfg.samples_per_scene,
        image_width=cfg.image_width,
        image_height=cfg.image_height,
        jpeg_quality=cfg.jpeg_quality,
        workers=args.workers,
        progress=not args.no_progress,
    )
    report = {"config": vars(cfg), **stats}
    write_text_atomic(args.stats, json.dumps(report, indent=2) + "\n")
    elapsed = time.perf_counter() - start
    splits = stats["splits"]
    run.log_metrics({f"{split}_samples": splits[split]["samples"] for split in splits} | {"seconds": elapsed})
    run.log_artifact(args.stats)
    print(
        f"synth: {splits['train']['samples']} train + {splits['val']['samples']} val samples "
        f"-> {args.out} in {elapsed:.1f} s; stats -> {args.stats}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)  # a bad param or an unwritable output: one `error:` line and exit code 2
