"""Every entrypoint answers `--help` at once: argument parsing comes before any torch-heavy import."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from conftest import REPO

from maptr import cli

HELP_ALL = """
import json, runpy, sys, time
out = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    start = time.perf_counter()
    try:
        runpy.run_path(script, run_name="__main__")
        code = None
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in ("torch", "torchvision", "onnxruntime", "cv2", "mlflow", "shapely") if m in sys.modules)
    out[script] = {"code": code, "heavy": heavy, "seconds": time.perf_counter() - start}
print(json.dumps(out))
"""


def test_every_entrypoint_answers_help_without_importing_torch():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "pipeline").glob("*.py"))
    assert len(scripts) >= 13
    res = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for script, row in report.items():
        # one process for all: a script that imported torch would show it from there on, so the first
        # offender is the one named
        assert row["code"] == 0, f"{script} --help exited {row['code']}"
        assert row["heavy"] == [], f"{script} --help imported {row['heavy']}; import them after parse_args()"
        assert row["seconds"] < 2.0, f"{script} --help took {row['seconds']:.1f} s"


def test_user_error_names_resolve_to_exception_classes():
    """cli matches user errors by name (so it imports none of them): each name must still exist."""
    for name in cli.USER_ERRORS:
        module, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        assert isinstance(cls, type) and issubclass(cls, BaseException), name
    from maptr.data.packing import PackError

    assert cli.is_user_error(PackError("x")) and not cli.is_user_error(ValueError("x"))
