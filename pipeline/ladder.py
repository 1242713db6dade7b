"""Stage `ladder`: the figures people compare, gathered from the four evaluating stages, for DVC.

    python pipeline/ladder.py --float metrics/float.json \
        --calibration metrics/calibration.json --qat metrics/qat.json --deployed metrics/deployed.json \
        --compile reports/compile.json --out metrics/ladder.json --class-dir metrics/ladder \
        --plot reports/ladder.json

The val mAP and the AP of each class (`maptr/classes.py`) after float-train, calibrate, qat and on the
deployed model (validate), and the deployed / float latency ratio of compile (paired by round). These
are the only DVC metrics of the pipeline, laid out for DVC's two tables:

    metrics/ladder.json          {mAP: {float, calibration, qat, deployed}, latency: {deployed_over_float}}
    metrics/ladder/<class>.json  {AP: {float, calibration, qat, deployed}}

`dvc exp show` names a metric by its key alone when no other file has it: mAP.float ... mAP.deployed and
latency.deployed_over_float come first, side by side (`--drop /` hides the per-class and dependency
columns). `dvc metrics show` prints one row per file: the mAP row, then one AP row per class, each with
its four stages in adjacent columns. `--plot` gets the same figures as rows {class, stage, AP} for the
`dvc plots` bar chart of the ladder. Reads JSON only: no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from maptr import cli

STAGES = ("float", "calibration", "qat", "deployed")  # the ladder, in pipeline order


def build_parser():
    p = cli.parser(__doc__)
    for stage in STAGES:
        p.add_argument(f"--{stage}", required=True, help=f"metrics JSON of the {stage} model (mAP, AP_<class>)")
    p.add_argument("--compile", required=True, help="compile report (deployed_over_float_paired)")
    p.add_argument("--out", required=True, help="metric file: mAP per stage and the latency ratio")
    p.add_argument("--class-dir", required=True, help="folder of the per-class metric files (AP per stage)")
    p.add_argument("--plot", required=True, help="the ladder as rows for `dvc plots`")
    return p


def read_json(path: str, keys: list[str]) -> dict:
    """A stage's JSON output holding ``keys``; a missing file or key names the stage to run."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise cli.UserError(f"{path}: not found; run the stage that writes it (dvc repro)") from None
    except json.JSONDecodeError as exc:
        raise cli.UserError(f"{path}: not valid JSON ({exc}); run the stage that writes it again") from None
    absent = [k for k in keys if k not in data]
    if absent:
        raise cli.UserError(f"{path}: lacks {absent}; run the stage that writes it again")
    return data


def ladder_rows(per_stage: dict[str, dict], classes: list[str]) -> dict[str, dict[str, float]]:
    """{row: {stage: AP}}, rows ``mAP`` then the classes, stages in pipeline order."""
    keys = {"mAP": "mAP", **{name: f"AP_{name}" for name in classes}}
    return {row: {stage: float(per_stage[stage][key]) for stage in STAGES} for row, key in keys.items()}


def main() -> None:
    args = build_parser().parse_args()
    from maptr.atomic import write_text_atomic
    from maptr.classes import CLASS_NAMES as classes

    wanted = ["mAP", *(f"AP_{name}" for name in classes)]
    per_stage = {stage: read_json(getattr(args, stage), wanted) for stage in STAGES}
    ratio = float(read_json(args.compile, ["deployed_over_float_paired"])["deployed_over_float_paired"])
    rows = ladder_rows(per_stage, classes)
    summary = {"mAP": rows["mAP"], "latency": {"deployed_over_float": ratio}}
    write_text_atomic(args.out, json.dumps(summary, indent=2) + "\n")
    for name in classes:
        write_text_atomic(Path(args.class_dir) / f"{name}.json", json.dumps({"AP": rows[name]}, indent=2) + "\n")
    points = [{"class": row, "stage": stage, "AP": ap} for row, values in rows.items() for stage, ap in values.items()]
    write_text_atomic(args.plot, json.dumps(points, indent=2) + "\n")
    width = max(len(r) for r in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{s:>11}" for s in STAGES))
    for row, values in rows.items():
        print(f"{row:<{width}}  " + "  ".join(f"{values[s]:>11.4f}" for s in STAGES))
    print(f"deployed / float latency (paired by round): {ratio:.2f}")


if __name__ == "__main__":
    cli.run(main)
