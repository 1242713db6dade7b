"""Stage `sensitivity` (the guide's quant_analysis): rank the quantized operators by quantization damage.

Reads sections `sensitivity` and `calibrate` (observer settings, so that the ranked 8-bit scales are the
ones calibrate will use) and `model`. From the float checkpoint: fold BatchNorm, insert fake-quant, run
`calibration_batches` training batches through the observers, then quantize one operator's inputs at a
time and measure the output error on `num_batches` validation batches (see maptr.quant.sensitivity).

Writes reports/sensitivity.json (the ranked table, which calibrate reads for its int16 top-k) and a bar
chart of the most sensitive operators; both also go to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

from maptr import cli
from maptr.training.run_group import open_stage_run, stage_main

CHART_ROWS = 40  # operators shown in the bar chart


def build_parser():
    p = cli.parser(__doc__)
    cli.add_quantization_inputs(p)
    p.add_argument("--out", default="reports/sensitivity.json", help="ranked table")
    p.add_argument("--plot", default="reports/sensitivity.png", help="bar chart")
    return p


@stage_main
def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing: `--help` answers without loading torch.
    import time
    from dataclasses import asdict

    import torch

    from maptr.atomic import write_text_atomic
    from maptr.config import CalibrateConfig, SensitivityConfig, load_model_config, load_params, load_section
    from maptr.data.dataset import DatasetOptions, PackedMapDataset
    from maptr.models.maptr import build_maptr
    from maptr.quant.calibration import calibrate, calibration_loader
    from maptr.quant.quantizer import QuantConfig, quantize_model
    from maptr.quant.sensitivity import (
        excluded,
        int16_topk_for_params,
        rank_operators,
        sensitivity_report,
        top_operators,
    )
    from maptr.training.checkpoint import load_checkpoint
    from maptr.training.lineage import log_dataset

    params = load_params(args.params)
    cfg = load_section(params, "sensitivity", SensitivityConfig)
    cal_cfg = load_section(params, "calibrate", CalibrateConfig)
    model_cfg = load_model_config(params)
    stage_params = {"sensitivity": asdict(cfg), "calibrate": asdict(cal_cfg), "model": {"preset": model_cfg.preset}}
    run = open_stage_run("sensitivity", stage_params, args.params)
    log_dataset(run, args.packed, "calibration")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()

    model = build_maptr(model_cfg)
    model.load_state_dict(load_checkpoint(args.float_checkpoint, expect_preset=model_cfg.preset)["model"])
    quant_cfg = QuantConfig.from_calibrate(cal_cfg)
    quantize_model(model, quant_cfg)
    options = DatasetOptions.from_model(model_cfg)
    train_set = PackedMapDataset(args.packed, "train", options)
    val_set = PackedMapDataset(args.packed, "val", options)
    calibrate(model, calibration_loader(train_set, cfg.calibration_batches, cfg.batch_size, cfg.seed))
    batches = list(calibration_loader(val_set, cfg.num_batches, cfg.batch_size, cfg.seed))
    rows = rank_operators(model, batches, model_cfg.pc_range, with_weights=cfg.with_weights)
    seconds = time.perf_counter() - start

    k = int16_topk_for_params(params, cal_cfg.int16_topk, cal_cfg.int16_topk_preset)
    # No run time in the report: calibrate reads it, and a new time would make DVC rerun everything after.
    report = sensitivity_report(
        rows, preset=model_cfg.preset, num_operators=len(rows), int16_topk=k,
        float_checkpoint=args.float_checkpoint, quant=quant_cfg.to_dict(), sensitivity=asdict(cfg),
        int16_exclude=cal_cfg.int16_exclude,
    )  # fmt: skip
    int16_ops = top_operators(report, k, cal_cfg.int16_exclude)
    report["int16_operators"] = int16_ops
    write_text_atomic(args.out, json.dumps(report, indent=2))
    title = f"quantization sensitivity ({model_cfg.preset}, {len(rows)} operators)"
    bar_chart(rows, set(int16_ops), cal_cfg.int16_exclude, Path(args.plot), title=title)
    print(f"sensitivity: {len(rows)} operators ranked in {seconds:.0f} s; {k} get int16 in calibrate (*), "
          f"none under {cal_cfg.int16_exclude} (calibrate.int16_exclude, x):")  # fmt: skip
    last = max(rows.index(row) for row in rows if row.name in int16_ops) if int16_ops else 9
    for row in rows[: max(last + 1, 10)]:
        mark = "*" if row.name in int16_ops else "x" if excluded(row.name, cal_cfg.int16_exclude) else " "
        print(f"{mark} {row.rank:3d}. {row.name:<60} {row.kind:<8} NSR {row.activation_nsr:.2e}  "
              f"{row.pts_error_m:.3f} m")  # fmt: skip

    run.log_metrics({"seconds": seconds, "num_operators": len(rows), "int16_topk": k,
                     "top1_activation_nsr": rows[0].activation_nsr})  # fmt: skip
    run.log_artifact(args.out)
    run.log_artifact(args.plot)


def bar_chart(rows: list, int16_ops: set[str], exclude: list[str], path: Path, title: str) -> None:
    """Horizontal bars (log scale) of the most sensitive operators (``rows``: OperatorSensitivity, ranked);
    the int16 ones red, the excluded grey."""
    import matplotlib

    from maptr.atomic import atomic_file
    from maptr.quant.sensitivity import excluded

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    shown = rows[:CHART_ROWS]
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(shown) + 1.5))
    values = [max(row.activation_nsr, 1e-12) for row in shown]
    colours = ["tab:red" if row.name in int16_ops else "tab:gray" if excluded(row.name, exclude) else "tab:blue"
               for row in shown]  # fmt: skip
    positions = range(len(shown))
    ax.barh(positions, values, color=colours)
    weights = [row.weight_nsr for row in shown]
    if any(w is not None for w in weights):
        ax.scatter([w if w is not None else float("nan") for w in weights], positions, marker="|", color="black",
                   s=60, label="int8 weights alone", zorder=3)  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(positions))
    ax.set_yticklabels([f"{row.name} ({row.kind})" for row in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(
        "output noise-to-signal ratio with this operator's inputs quantized to 8 bits\n"
        "(red: int16 in calibrate; grey: never int16, calibrate.int16_exclude)"
    )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
