"""The GPU check's report: the JSON document's short table (Markdown) and the third-party modules a run
imported (so that a CPU run shows the check needs nothing the GPU machines lack)."""

from __future__ import annotations

import sys
from typing import Any

# What the GPU machines' image holds among the modules this code could import (device README / KINDS.md):
# the check must import nothing else. Top-level import names.
GPU_MACHINE_MODULES = frozenset(
    "torch torchvision numpy cv2 scipy yaml tqdm onnx onnxscript onnx_ir onnxruntime typing_extensions "
    "sympy mpmath networkx jinja2 markupsafe filelock fsspec PIL packaging ml_dtypes google triton pytest "
    "_pytest pluggy iniconfig pygments setuptools pkg_resources _distutils_hack opt_einsum psutil "
    "dateutil six nvidia cuda functorch torchgen _yaml attr attrs coverage colorama requests urllib3 idna "
    "certifi charset_normalizer".split()
)
# Imported only where installed (torch.fx's graph drawer tries pydot), or not a package (Cython's extension
# modules register cython_runtime): a machine without them runs the same code.
OPTIONAL_IMPORTS = frozenset({"pydot", "cython_runtime"})


def not_on_gpu_machine(modules: list[str]) -> list[str]:
    """The modules of a run that the GPU machines lack (a check that imports one would fail there)."""
    return sorted(set(modules) - GPU_MACHINE_MODULES - OPTIONAL_IMPORTS)


def third_party_modules() -> list[str]:
    """Top-level names of the imported modules that are neither built in nor in the standard library."""
    names = {name.split(".")[0] for name in list(sys.modules)}
    return sorted(n for n in names if n not in sys.stdlib_module_names and not n.startswith("_") and n != "maptr")


def sync_note(train: dict[str, Any] | None) -> str:
    """Whether the train phase exercised multi-GPU synchronisation, in words."""
    if not train:
        return "unknown: the train phase gave no result"
    world = train["world_size"]
    if world == 1:
        return "not exercised: world size 1 (one device), so no DDP all-reduce, SyncBatchNorm or nccl"
    if train["sync_bn"]:
        return f"exercised: world size {world}, DDP all-reduce over nccl, SyncBatchNorm"
    return f"partly exercised: world size {world} on CPUs, DDP all-reduce over gloo; SyncBatchNorm and nccl not"


def _ms(stats: dict[str, Any] | None) -> str:
    if not stats or not stats.get("n"):
        return "-"
    return f"{stats['median_ms']:.1f}"


def _mib(memory: dict[str, float] | None) -> str:
    return "-" if not memory else f"{memory['allocated']:.0f}"


def format_table(report: dict[str, Any]) -> str:
    """A short Markdown summary of a report (every figure is also in the JSON)."""
    dev = report["device"]
    lines = [
        f"# GPU check{' (CPU smoke run: plumbing only, no figures to quote)' if report['cpu_smoke'] else ''}",
        "",
        f"{dev.get('name', '?')}, torch {dev.get('torch')}, {report['started']}, {report['seconds']:.0f} s in all",
        "",
    ]
    train = report["phases"].get("train", {})
    if "result" in train:
        t = train["result"]
        lines += [
            f"## {t['preset']} float-train steps: batch {t['batch_size_per_rank']} per rank x {t['world_size']} "
            f"rank(s), {t['image_size'][0]}x{t['image_size'][1]} input from {t['stored_image_size'][0]}x"
            f"{t['stored_image_size'][1]} JPEGs, {t['num_workers']} loader workers per rank",
            "",
            "| precision | samples/s | step ms | data wait | to device | forward | loss | backward | optimizer "
            "| other | peak MiB per rank (allocated) | loss first -> last |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, p in t["precisions"].items():
            s = p["split"]
            memory = ", ".join(_mib(m) for m in p["peak_memory_mib_per_rank"])
            oom = p.get("out_of_memory_at_batch")
            note = f", batch {p['batch_size']} after out of memory at {oom}" if oom else ""
            lines.append(
                f"| {name} (autocast {p['autocast']}{note}) | {p['samples_per_s']:.2f} | {_ms(s['total'])} | "
                f"{_ms(p['data'])} | {_ms(s['to_device'])} | {_ms(s['forward'])} | {_ms(s['loss'])} | "
                f"{_ms(s['backward'])} | {_ms(s['optimizer'])} | {_ms(s['other'])} | {memory} | "
                f"{p['loss_first']:.2f} -> {p['loss_last']:.2f} |"
            )
        timed = ", ".join(f"{name} {p['timed_steps']}" for name, p in t["precisions"].items())
        lines += ["", f"Medians over the timed steps ({timed}), ms. Multi-GPU synchronisation: {sync_note(t)}.", ""]
    infer = report["phases"].get("infer", {})
    if "result" in infer:
        r = infer["result"]
        shape = r["frame"]["img"]
        lines += [
            f"## {r['preset']} inference, batch 1 ({shape[1]} x {shape[4]}x{shape[3]} images), PyTorch",
            "",
            "| model | fp32 FPS (median ms) | bf16 FPS (median ms) |",
            "|---|---|---|",
        ]
        for name, per in r["models"].items():
            cells = [
                f"{per[p]['fps']:.1f} ({per[p]['latency']['median_ms']:.1f})" if p in per else "-"
                for p in ("fp32", "bf16")
            ]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        refs = "; ".join(f"{x['what']}: {x['fps']} FPS on {x['device']}" for x in r["references"])
        lines += ["", f"For comparison (other hardware and software): {refs}.", ""]
    learn = report["phases"].get("learn", {})
    if "result" in learn:
        x = learn["result"]
        s = x["settings"]
        if x["passed"]:
            verdict = f"PASSED at step {x['steps_to_target']}"
        else:
            verdict = "not judged (a smoke run's steps are too few to learn)" if report["cpu_smoke"] else "NOT passed"
        verdict += f" (best train-set mAP {x['best_mAP']:.3f}, target {x['target']})"
        lines += [
            f"## Does it learn: {s['preset']} on {s['samples']} samples, batch {s['batch_size']}, at most "
            f"{s['max_steps']} steps",
            "",
            f"{verdict}; {x['steps']} steps in {x['seconds']:.0f} s, stopped: {x['stopped']}.",
            "",
        ]
        lines.append("mAP by step: " + ", ".join(f"{c['step']}: {c['mAP']:.3f}" for c in x["curve"]))
        lines.append("")
    for name, phase in report["phases"].items():
        if "error" in phase:
            lines += [f"**{name} failed**: {phase['error']}", ""]
    return "\n".join(lines)
