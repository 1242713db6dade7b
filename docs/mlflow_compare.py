"""The README's MLflow picture: a tiny chain run by DVC, then a headless Chromium screenshot of MLflow's
compare view with the ladder's four runs (float-train, calibrate, qat, validate) ticked.

    python docs/mlflow_compare.py              # ~10 min on 2 busy cores -> docs/images/mlflow_compare.png

1. This repository's HEAD is cloned into a temporary folder and given a params.yaml with the test suite's
   micro preset (tests/conftest.py) and a small synthetic world.
2. ``dvc exp run -n <name>`` runs the whole chain there (a real chain run: one MLflow group named after the
   experiment, the stages nested in it) into a sqlite store in that folder.
3. ``mlflow ui`` serves the store on 127.0.0.1 (a free port); Chromium (headless, driven over the DevTools
   pipe, docs/browser.py) opens the compare view of the group's four ladder runs in the "Model training"
   workflow, closes the assistant panel, folds the long parameters table and shows every metric row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "docs"), str(REPO / "tests")]

from browser import Browser  # noqa: E402
from conftest import write_micro_params  # noqa: E402

LADDER = ("float-train", "calibrate", "qat", "validate")
DEMO = {  # small enough for minutes on a CPU, large enough that the micro model learns something
    "synth": {"train_scenes": 4, "val_scenes": 1, "samples_per_scene": 8},
    "float": {"epochs": 6, "warmup_steps": 5, "num_workers": 0, "log_every_steps": 2, "cache_mb": 512},
    "sensitivity": {"calibration_batches": 2, "num_batches": 2},
    "calibrate": {"steps": 4},
    "qat": {"epochs": 2, "samples_per_epoch": 16, "num_workers": 0, "log_every_steps": 2},
    "compile": {"threads": 1, "thread_sweep": [1], "warmup": 2, "runs": 20, "rounds": 2, "profile_runs": 2},
    "validate": {"top_k": 10},  # the micro preset has 12 queries
}


def run_chain(work: Path, name: str) -> str:
    """Clone HEAD into ``work/project``, `dvc exp run -n name` there; returns the sqlite tracking URI."""
    project, uri = work / "project", f"sqlite:///{work / 'mlflow.db'}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
    write_micro_params(project, **DEMO)
    venv = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(project),
           "MLFLOW_TRACKING_URI": uri, "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    env.pop("MAPTR_RUN_GROUP", None)
    subprocess.run([str(venv / "dvc"), "exp", "run", "-n", name], cwd=project, env=env, check=True)
    return uri


def ladder_run_ids(uri: str, name: str) -> tuple[str, list[str]]:
    """The experiment id and the ids of the ladder's runs in the group of DVC experiment ``name``."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("maptr-pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.dvc_experiment = '{name}'")
    by_stage = {r.data.tags.get("stage"): r.info.run_id for r in runs if "stage" in r.data.tags}
    missing = [s for s in LADDER if s not in by_stage]
    if missing:
        raise SystemExit(f"group {name!r} has no run of {missing}; did the chain finish?")
    return experiment.experiment_id, [by_stage[s] for s in LADDER]


def serve(uri: str, work: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on 127.0.0.1 at a free port; returns the process and its address once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    log = open(work / "ui.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/health", timeout=2)
            return proc, address
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow ui did not start; see {work / 'ui.log'}") from None
            time.sleep(0.5)


def screenshot(address: str, experiment_id: str, run_ids: list[str], out: Path, width: int = 1200) -> Path:
    """The compare view of ``run_ids`` as a PNG: run details and every row of the metrics table (which the
    page shows in a scrolling box of a few rows: the box's slices are captured scrolled and stacked)."""
    from PIL import Image

    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id]),
                                    "workflowType": "machine_learning"})  # fmt: skip
    with Browser(width, 1000) as browser:
        browser.open(f"{address}/#/compare-runs?{query}", "document.body.innerText.includes('Run details')")
        browser.evaluate("document.querySelector('button[aria-label=Close]')?.click()")  # the assistant panel
        browser.evaluate("document.querySelector('button[aria-label=\"Toggle sidebar\"]')?.click()")
        for section in ("Visualizations", "Parameters", "Artifacts", "Tags"):
            browser.evaluate("Array.from(document.querySelectorAll('[role=button]'))"
                             f".find(e => e.innerText.trim() === '{section}')?.click()")  # fmt: skip
        browser.evaluate("document.querySelectorAll('[data-assistant-ui]').forEach(e => e.style.display = 'none')")
        time.sleep(1)
        # the metrics table: a grid of metric names beside a grid of values, scrolling together
        grids = "Array.from(document.querySelectorAll('.CompareRunView .ReactVirtualized__Grid'))"
        box = browser.evaluate(f"""(() => {{ const rs = {grids}.map(g => g.getBoundingClientRect());
            const x = Math.min(...rs.map(r => r.left)), right = Math.max(...rs.map(r => r.right));
            return {{x: x, y: rs[0].top, width: right - x, height: rs[0].height,
                     rows: Math.max(...{grids}.map(g => g.scrollHeight))}}; }})()""")
        top, height, total = int(box["y"]), int(box["height"]), int(box["rows"])
        browser.resize(width, top + height + 16)
        time.sleep(1)
        page = Image.open(io.BytesIO(browser.capture()))
        picture = Image.new("RGB", (page.width, page.height + total - height), "white")
        picture.paste(page.crop((0, 0, page.width, top + height)), (0, 0))  # not the page's bottom edge
        clip = {k: box[k] for k in ("x", "y", "width", "height")}
        for offset in range(height, total, height):
            scroll = min(offset, total - height)  # the last slice: the box stops at its end
            for grid in (-1, 0):  # the values, then the names (scrolling the values resets the names)
                browser.evaluate(f"{grids}.at({grid}).scrollTop = {scroll}")
                time.sleep(0.5)
            browser.wait(f"{grids}.every(g => g.scrollTop === {scroll})", what="metrics table")
            piece = Image.open(io.BytesIO(browser.capture(clip)))
            piece = piece.crop((0, offset - scroll, piece.width, piece.height))
            picture.paste(piece, (int(box["x"]), top + offset))
        out.parent.mkdir(parents=True, exist_ok=True)
        picture.crop((0, 0, picture.width, top + total + 16)).save(out, optimize=True)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "images" / "mlflow_compare.png"))
    p.add_argument("--work", default=None, help="folder for the clone and the store (default: a temporary one)")
    p.add_argument("--name", default="micro-ladder", help="the DVC experiment's name (and the MLflow group's)")
    p.add_argument("--skip-chain", action="store_true", help="reuse the store in --work (only the screenshot)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mlflow-compare-"))
    uri = f"sqlite:///{work / 'mlflow.db'}" if args.skip_chain else run_chain(work, args.name)
    experiment_id, run_ids = ladder_run_ids(uri, args.name)
    proc, address = serve(uri, work)
    try:
        print(f"wrote {screenshot(address, experiment_id, run_ids, Path(args.out))} (store: {uri})")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
