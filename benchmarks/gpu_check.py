"""The GPU check: one command on a CUDA machine that runs the pipeline's r50 and nano code on the GPU.

    PYTHONPATH=. python3 benchmarks/gpu_check.py          # or: make gpu-check   (budget: < 6 min on one H100)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu-smoke   # the same code path on a CPU, nano, a few steps

1. r50 float-train steps under ``torchrun --nproc_per_node=<GPUs>`` (nccl; DDP and SyncBatchNorm when
   there is more than one GPU): samples/s, step time split (data wait / to device / forward / loss /
   backward / optimizer / other), peak memory per GPU, float32 vs bf16 autocast (maptr/gpucheck/train_bench.py).
2. r50 inference FPS at batch 1 (six 800x480 images), PyTorch fp32 and bf16, float and fake-quant QAT
   model (maptr/gpucheck/infer_bench.py), beside MapTRv2 R50's 14.1 FPS (RTX 3090) and Horizon's 26.68
   FPS (J6E).
3. Does it learn: nano trained through float-train's trainer on the 16-sample learn set until its train-set
   mAP passes 0.3 within 1000 steps (maptr/gpucheck/learn.py).

Writes reports/gpu_check.json (every figure, the device, the data's manifest, the modules imported) and
reports/gpu_check.md (the short table, also printed). Exit 0: all phases ran and nano learned; 1: a phase
failed or nano did not reach the target (the report says which); 2: no CUDA without --cpu-smoke, or
no data (a one-line ``error: ...``).

Data (git-ignored, ~7 MB + the ~9 MB shapely wheel below; maptr/gpucheck/data.py): data/gpu_check/{r50.npz,
learn.npz, manifest.json, site/}.
Make it on the pipeline's machine, which has the packer's lmdb / shapely / nuscenes-devkit:
``make gpu-check-data``. Bring it with the source tree: the device tool's ``carry`` is
``["data/gpu_check"]``; with scp / rsync, copy the folder to the same place.

What the GPU machine needs: Python 3.12 with torch (CUDA), torchvision, numpy (1 or 2), OpenCV, SciPy,
PyYAML, tqdm and onnxscript, all in the device image. It needs no lmdb, nuscenes-devkit, MLflow or DVC:
the report lists the third-party modules the run imported. One wheel is brought: the chamfer metric's
exact buffer test (the pairs its vectorized test cannot decide) needs shapely, so ``make gpu-check-data``
unpacks shapely 2.0.7 for CPython 3.12 / manylinux x86_64 into data/gpu_check/site; it is used only
where ``import shapely`` fails (the report's ``data.site_packages_brought`` says so).

Budgets (SIZES below; ``--set KEY=INT`` changes one): the run is sized to end within 6 minutes on one
H100 including start-up (imports, CUDA context, the torchrun job's start: ~20-40 s). ``--budget-s``
(default 300 s) is the deadline the three phases share:
- train: 3 warm-up + 10 timed steps per precision at batch 4 per GPU, within a soft 100 s for both
  precisions (each stops at its share) and a hard 200 s for the whole torchrun job (then killed);
- infer: 10 warm-up + 50 timed frames per configuration (4), within 50 s (at least one frame each);
- learn: what is left of the deadline, at most 160 s, checked at each validation (every 50 steps, at
  most 1000 steps); it stops at the first validation at or above the target. These settings on the
  pipeline's shared 2-core CPU (1 thread, 2026-12-07, the map GT and chamfer metric of 2c2c0ff, shapely
  unimportable): train-set mAP 0.02 / 0.19 / 0.35 at steps 50 / 100 / 150, passed at step 150 (1-4 s
  per step on the loaded machine); a GPU step of nano takes a fraction of that.
A phase that runs out of time stops early and says so in the report.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the source tree is the install (PYTHONPATH=. does the same)

try:
    import torch
except ImportError:  # e.g. `make gpu-check` with a python that has no torch
    print(
        f"error: {sys.executable} cannot import torch; run with the python that has it (GPU_PYTHON=...)",
        file=sys.stderr,
    )
    sys.exit(2)

from maptr.config import ParamsError, load_params  # noqa: E402
from maptr.gpucheck.data import CheckDataError, check_data  # noqa: E402
from maptr.gpucheck.report import format_table, not_on_gpu_machine, sync_note, third_party_modules  # noqa: E402
from maptr.training.device import describe_device  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    # the GPU run: r50 at the guide's size, nano's learning run to the target
    "gpu": {
        "bench_preset": "r50",
        "train_batch": 4,
        "train_warmup": 3,
        "train_steps": 10,
        "train_budget_s": 100,
        "train_timeout_s": 200,
        "infer_warmup": 10,
        "infer_runs": 50,
        "infer_budget_s": 50,
        "learn_max_steps": 1000,
        "learn_eval_every": 50,
        "learn_batch": 4,
        "learn_budget_s": 160,
    },
    # --cpu-smoke: the same code on a CPU, nano everywhere, a handful of steps (~30-50 s on 2 cores)
    "smoke": {
        "bench_preset": "nano",
        "train_batch": 2,
        "train_warmup": 1,
        "train_steps": 2,
        "train_budget_s": 20,
        "train_timeout_s": 120,
        "infer_warmup": 1,
        "infer_runs": 1,
        "infer_budget_s": 10,
        "learn_max_steps": 2,
        "learn_eval_every": 2,
        "learn_batch": 2,
        "learn_budget_s": 20,
    },
}
LEARN_PRESET, LEARN_TARGET = "nano", 0.3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="run the same code on the CPU: nano, a few steps")
    p.add_argument("--data", default=str(REPO / "data" / "gpu_check"), help="folder of make gpu-check-data")
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="params file (presets, float section)")
    p.add_argument(
        "--out",
        default=None,
        help="report JSON (default reports/gpu_check.json; "
        "reports/gpu_check_cpu_smoke.json with --cpu-smoke); the table goes beside it as .md",
    )
    p.add_argument("--nproc", type=int, default=None, help="torchrun processes (default: the GPU count; 1 on a CPU)")
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds for the three phases (start-up excluded)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "infer", "learn"], help="phases to skip")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a size, e.g. --set learn_max_steps=3000 (keys: SIZES in this file)",
    )
    p.add_argument("--worker", choices=["train"], help=argparse.SUPPRESS)  # the torchrun child
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def chosen_sizes(args: argparse.Namespace) -> dict[str, Any]:
    """SIZES of the run's kind with the --set overrides; an unknown key or a non-integer is a ValueError."""
    sizes = dict(SIZES["smoke" if args.cpu_smoke else "gpu"])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in sizes or key == "bench_preset" or not value.lstrip("-").isdigit():
            raise ValueError(
                f"--set {item}: expected KEY=INT with KEY one of {sorted(k for k in sizes if k != 'bench_preset')}"
            )
        sizes[key] = int(value)
    return sizes


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _configure_device(cpu_smoke: bool) -> None:
    """Fixed input shapes: let cuDNN pick the fastest convolution algorithms once. The CPU smoke run uses
    one thread: its tensors are small, and on a shared machine a second thread waits for a busy core."""
    torch.backends.cudnn.benchmark = True
    if cpu_smoke:
        torch.set_num_threads(1)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)[-3000:]}


# --------------------------------------------------------------------------------------------------
# Phase 1 runs in a torchrun job: this same script with --worker train on every rank.
# --------------------------------------------------------------------------------------------------
def train_worker(args: argparse.Namespace) -> int:
    from maptr.distributed import cleanup, init_distributed
    from maptr.gpucheck.train_bench import train_bench

    _configure_device(args.cpu_smoke)
    sizes = chosen_sizes(args)
    ctx = init_distributed()
    cores = os.cpu_count() or 2
    workers = 0 if args.cpu_smoke else min(8, max(2, (cores - 2) // ctx.world_size))
    try:
        result = train_bench(
            load_params(args.params),
            Path(args.data) / "r50.npz",
            ctx,
            preset=sizes["bench_preset"],
            batch_size=sizes["train_batch"],
            warmup=sizes["train_warmup"],
            steps=sizes["train_steps"],
            num_workers=workers,
            time_budget_s=sizes["train_budget_s"],
        )
        document: dict[str, Any] = {"result": result, "device": describe_device(ctx.device)}
        status = 0
    except Exception as exc:  # reported, not raised: the parent puts it in the report
        document, status = _error(exc), 1
        print(document["traceback"], file=sys.stderr)
    if ctx.is_main:
        document["modules"] = third_party_modules()
        Path(args.result).write_text(json.dumps(document, default=str))
    cleanup(ctx)
    return status


def run_train_phase(args: argparse.Namespace, sizes: dict[str, Any], nproc: int) -> dict[str, Any]:
    """torchrun --nproc_per_node=nproc this script --worker train; the rank-0 result."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        result_path = Path(tmp) / "train.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(Path(__file__).resolve()),
            "--worker",
            "train",
            "--result",
            str(result_path),
            "--data",
            args.data,
            "--params",
            args.params,
            *(f"--set={item}" for item in args.set),
        ]
        cmd += ["--cpu-smoke"] if args.cpu_smoke else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if args.cpu_smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run's ranks use the CPU (gloo) even beside a GPU
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=sizes["train_timeout_s"])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"torchrun job killed after its hard limit of {sizes['train_timeout_s']} s"}
        if not result_path.is_file():
            return {"error": f"torchrun job exited with status {status} and wrote no result (its output is above)"}
        return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------------------------
def bring_site_packages(data: Path) -> list[str]:
    """Make the unpacked wheels of ``<data>/site`` (``make gpu-check-data``: shapely for Python 3.12)
    importable, for the modules this machine lacks; returns those now taken from there. Appended after
    the machine's own paths, so an installed copy always wins."""
    site, brought = data / "site", []
    if not site.is_dir():
        return brought
    for name in sorted(p.name for p in site.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        try:
            importlib.import_module(name)
        except ImportError:
            brought.append(name)
    if brought:
        sys.path.append(str(site))
    return brought


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "train":
        return train_worker(args)
    started, t0 = datetime.datetime.now(datetime.UTC), time.perf_counter()
    if not args.cpu_smoke and not torch.cuda.is_available():
        return _fail(
            f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); run this on "
            "a GPU machine, or add --cpu-smoke to run the same code path on the CPU"
        )
    try:
        chosen_sizes(args)
        params = load_params(args.params)
        manifest = check_data(args.data, require_nuscenes_size=not args.cpu_smoke)
    except (ParamsError, CheckDataError, json.JSONDecodeError, ValueError) as exc:
        return _fail(str(exc))
    manifest = {**manifest, "site_packages_brought": bring_site_packages(Path(args.data))}
    _configure_device(args.cpu_smoke)
    sizes = chosen_sizes(args)
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    nproc = args.nproc or (1 if args.cpu_smoke else torch.cuda.device_count())
    out = Path(args.out or REPO / "reports" / ("gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json"))
    deadline = t0 + args.budget_s
    report: dict[str, Any] = {
        "cpu_smoke": args.cpu_smoke,
        "started": started.isoformat(timespec="seconds"),
        "command": sys.argv,
        "device": describe_device(device),
        "data": manifest,
        "sizes": sizes,
        "budget_s": args.budget_s,
        "phases": {},
    }
    data = Path(args.data)

    def phase(name: str, fn) -> None:
        if name in args.skip:
            report["phases"][name] = {"skipped": True}
            return
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            report["phases"][name] = fn()
        except Exception as exc:  # one failing phase must not lose the others' figures
            report["phases"][name] = _error(exc)
            print(report["phases"][name]["traceback"], file=sys.stderr)
        report["phases"][name]["seconds"] = round(time.perf_counter() - start, 1)

    phase("train", lambda: run_train_phase(args, sizes, nproc))

    def infer() -> dict[str, Any]:
        from maptr.gpucheck.infer_bench import infer_bench

        budget = min(sizes["infer_budget_s"], max(deadline - time.perf_counter() - 30, 5))
        return {
            "result": infer_bench(
                params,
                data / "r50.npz",
                device,
                preset=sizes["bench_preset"],
                warmup=sizes["infer_warmup"],
                runs=sizes["infer_runs"],
                time_budget_s=budget,
                allow_cpu_bf16=args.cpu_smoke,
            )
        }

    phase("infer", infer)

    def learn() -> dict[str, Any]:
        from maptr.gpucheck.learn import learn_check

        budget = min(sizes["learn_budget_s"], max(deadline - time.perf_counter(), 10))
        return {
            "result": learn_check(
                params,
                data / "learn.npz",
                device,
                preset=LEARN_PRESET,
                target=LEARN_TARGET,
                max_steps=sizes["learn_max_steps"],
                eval_every=sizes["learn_eval_every"],
                batch_size=sizes["learn_batch"],
                time_budget_s=budget,
            )
        }

    phase("learn", learn)
    return finish(report, out, t0)


def finish(report: dict[str, Any], out: Path, t0: float) -> int:
    """Verdict, multi-GPU note, modules; write the JSON and the table; print the table."""
    phases = report["phases"]
    problems = [f"{name}: {p['error']}" for name, p in phases.items() if "error" in p]
    learned = phases.get("learn", {}).get("result", {})
    if learned and not learned["passed"] and not report["cpu_smoke"]:
        problems.append(
            f"learn: train-set mAP {learned['best_mAP']:.3f} < {learned['target']} after {learned['steps']} steps"
        )
    report["multi_gpu_sync"] = sync_note(phases.get("train", {}).get("result"))
    report["modules"] = sorted(set(third_party_modules()) | set(phases.get("train", {}).pop("modules", [])))
    report["modules_not_on_gpu_machine"] = not_on_gpu_machine(report["modules"])
    report["verdict"] = {"ok": not problems, "problems": problems}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    table = format_table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"gpu_check: {'ok' if not problems else 'PROBLEMS: ' + '; '.join(problems)} -> {out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
