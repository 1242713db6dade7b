"""Which range estimator for the 8-bit activations: min/max, percentile or MSE (calibrate.observer)?

Calibrates the same float checkpoint with each observer on the same training batches (the int16
operators of the sensitivity report, as the calibrate stage would), then measures on a few validation
batches how far the fake-quant outputs are from the float model's: the noise-to-signal ratio of the
scores and points (the sensitivity metric) and the score-weighted point displacement in meters. Also
prints the calibration time. The full-validation mAP of each choice comes from the calibrate stage
(`pipeline/calibrate.py --observer ...`), recorded in benchmarks/README.md.

    .venv/bin/python benchmarks/bench_calibration_observers.py --float-checkpoint models/float-checkpoint-best.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maptr.config import CalibrateConfig, load_model_config, load_params, load_section
from maptr.data.dataset import DatasetOptions, PackedMapDataset
from maptr.models.maptr import build_maptr
from maptr.quant import FakeQuantMode, set_fake_quant_mode
from maptr.quant.calibration import calibrate, calibration_loader
from maptr.quant.quantizer import QuantConfig, quantize_model
from maptr.quant.sensitivity import int16_topk_for_params, top_operators
from maptr.training.checkpoint import load_checkpoint

# (observer, percentile, with the int16 operators): the last row shows what int16 changes
OBSERVERS = [("minmax", 100.0, True), ("percentile", 99.9, True), ("percentile", 99.99, True), ("mse", 100.0, True),
             ("mse", 100.0, False)]  # fmt: skip


@torch.no_grad()
def output_error(model: torch.nn.Module, batches: list[dict], pc_range: list[float]) -> tuple[float, float]:
    """(output NSR of scores + points, score-weighted point displacement in meters) vs the same model with
    every fake-quant disabled."""
    x0, y0, _, x1, y1, _ = pc_range
    extent = torch.tensor([x1 - x0, y1 - y0])
    sums = {"err_s": 0.0, "var_s": 0.0, "err_p": 0.0, "var_p": 0.0, "disp": 0.0, "weight": 0.0}
    for batch in batches:
        set_fake_quant_mode(model, FakeQuantMode.DISABLED)
        ref = model(batch["img"], batch["lidar2img"])
        set_fake_quant_mode(model, FakeQuantMode.QUANTIZE)
        out = model(batch["img"], batch["lidar2img"])
        s_ref, s_out = ref["pred_logits"].sigmoid(), out["pred_logits"].sigmoid()
        p_ref, p_out = ref["pred_pts"], out["pred_pts"]
        sums["err_s"] += float(((s_out - s_ref) ** 2).sum())
        sums["var_s"] += float(((s_ref - s_ref.mean()) ** 2).sum())
        sums["err_p"] += float(((p_out - p_ref) ** 2).sum())
        sums["var_p"] += float(((p_ref - p_ref.mean()) ** 2).sum())
        confidence = s_ref.amax(-1)  # (B, Q)
        sums["disp"] += float((confidence * ((p_out - p_ref) * extent).norm(dim=-1).mean(-1)).sum())
        sums["weight"] += float(confidence.sum())
    nsr = sums["err_s"] / sums["var_s"] + sums["err_p"] / sums["var_p"]
    return nsr, sums["disp"] / sums["weight"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--packed", default="data/packed")
    parser.add_argument("--float-checkpoint", default="models/float-checkpoint-best.pt")
    parser.add_argument("--sensitivity", default="reports/sensitivity.json")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = load_params(args.params)
    model_cfg = load_model_config(params)
    cal_cfg = load_section(params, "calibrate", CalibrateConfig)
    state = load_checkpoint(args.float_checkpoint, expect_preset=model_cfg.preset)["model"]
    int16_ops: list[str] = []
    if Path(args.sensitivity).is_file():
        report = json.loads(Path(args.sensitivity).read_text())
        k = int16_topk_for_params(params, cal_cfg.int16_topk, cal_cfg.int16_topk_preset)
        int16_ops = top_operators(report, k, cal_cfg.int16_exclude)
    options = DatasetOptions.from_model(model_cfg)
    train_set = PackedMapDataset(args.packed, "train", options)
    val_set = PackedMapDataset(args.packed, "val", options)
    calibration = list(calibration_loader(train_set, args.calibration_batches, cal_cfg.batch_size, cal_cfg.seed))
    evaluation = list(calibration_loader(val_set, args.eval_batches, 2, seed=1))
    print(
        f"{model_cfg.preset}, {len(int16_ops)} int16 operators, {args.calibration_batches} x {cal_cfg.batch_size} "
        f"calibration samples, {args.eval_batches} x 2 val samples, {args.threads} thread(s)"
    )
    print(f"{'observer':<18} {'calibration s':>13} {'output NSR':>11} {'point error m':>14}")
    for observer, percentile, with_int16 in OBSERVERS:
        model = build_maptr(model_cfg)
        model.load_state_dict(state)
        int16 = tuple(int16_ops) if with_int16 else ()
        quantize_model(model, QuantConfig(int16_ops=int16, observer=observer, percentile=percentile))
        start = time.perf_counter()
        calibrate(model, calibration)
        seconds = time.perf_counter() - start
        nsr, displacement = output_error(model, evaluation, model_cfg.pc_range)
        name = f"{observer} {percentile:g}" if observer == "percentile" else observer
        name += "" if with_int16 or not int16_ops else ", no int16"
        print(f"{name:<18} {seconds:>13.1f} {nsr:>11.2e} {displacement:>14.4f}")


if __name__ == "__main__":
    main()
