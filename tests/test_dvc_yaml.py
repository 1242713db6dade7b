"""dvc.yaml and the code cannot drift: deps cover every imported module, the command line names every path,
and the only DVC metrics are the ladder's figures."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from import_closure import REPO, closure

from maptr.classes import CLASS_NAMES
from maptr.config import load_params
from maptr.yaml12 import parse_yaml

DVC_YAML = parse_yaml((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PARAMS = load_params(REPO / "params.yaml")


def entry_name(entry) -> str:
    """A deps / outs / metrics entry is a path or a one-key mapping {path: options}."""
    return entry if isinstance(entry, str) else next(iter(entry))


def interpolate(text: str) -> str:
    """DVC's ``${section.key}`` templating, from params.yaml."""

    def value(match: re.Match) -> str:
        node = PARAMS
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def stage_paths(stage: dict) -> tuple[list[str], list[str]]:
    """(deps, outs incl. metrics and plots) of a stage, templating applied."""
    deps = [interpolate(entry_name(e)) for e in stage.get("deps", [])]
    outs = [entry_name(e) for key in ("outs", "metrics", "plots") for e in stage.get(key, [])]
    return deps, outs


def script_of(stage: dict) -> Path:
    scripts = [t for t in shlex.split(interpolate(stage["cmd"])) if t.startswith("pipeline/") and t.endswith(".py")]
    assert len(scripts) == 1, stage["cmd"]
    return REPO / scripts[0]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_cover_the_stage_scripts_import_closure(name):
    """An edit to any module a stage can run must invalidate that stage's cached result."""
    stage = STAGES[name]
    deps, _ = stage_paths(stage)
    script = script_of(stage)
    needed = [str(script.relative_to(REPO))] + sorted(str(p.relative_to(REPO)) for p in closure(script))
    missing = [path for path in needed if not covered(path, deps)]
    assert not missing, f"stage {name}: add to its deps in dvc.yaml: {missing}"
    for dep in deps:  # and no dep that names nothing (a renamed module left behind)
        if dep.startswith(("maptr/", "pipeline/")):
            assert (REPO / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_import_closure_follows_lazy_and_package_imports(tmp_path):
    """The closure reads imports inside functions and runs every package's __init__ on the way."""
    script = REPO / "pipeline" / "float_train.py"
    files = {str(p.relative_to(REPO)) for p in closure(script)}
    # imported inside main() after argument parsing, and by the trainer it imports
    assert {"maptr/training/trainer.py", "maptr/data/dataset.py", "maptr/training/schedule.py"} <= files
    assert {"maptr/__init__.py", "maptr/training/__init__.py", "maptr/evaluation/__init__.py"} <= files
    assert not any(f.startswith(("maptr/deploy/", "maptr/data/synthetic/")) for f in files)


def parser_of(script: Path):
    """The script's argparse parser; importing an entrypoint loads no torch (tests/test_entrypoints.py)."""
    return runpy.run_path(str(script), run_name="not_main")["build_parser"]()


def path_options(parser) -> dict[str, str]:
    """{option string: dest} of the options that take a file or folder: default looks like a path, or the
    option is required (pipeline/ladder.py takes only paths)."""
    out = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "params") or action.nargs == 0:
            continue
        default = action.default
        if action.required or (isinstance(default, str) and "/" in default):
            out[action.option_strings[0]] = action.dest
    return out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_command_line_names_every_input_and_output(name):
    """No path comes from an argparse default, and the paths on the command line are the stage's deps and
    outs (plus the resume checkpoint, deliberately outside DVC's outputs)."""
    stage = STAGES[name]
    deps, outs = stage_paths(stage)
    tokens = shlex.split(interpolate(stage["cmd"]))
    script = script_of(stage)
    args = tokens[tokens.index(str(script.relative_to(REPO))) + 1 :]
    parser = parser_of(script)
    options = path_options(parser)
    absent = [opt for opt in options if opt not in args]
    assert not absent, f"stage {name}: put {absent} on its command line in dvc.yaml"
    parsed = vars(parser.parse_args(args))
    assert parsed["params"] == "params.yaml"
    given = {dest: parsed[dest] for dest in options.values()}
    data_deps = [d for d in deps if not d.startswith(("maptr/", "pipeline/"))]
    for dest, path in given.items():
        allowed = path.startswith("models/resume/") or path in deps or path in outs
        allowed = allowed or any(o.startswith(path.rstrip("/") + "/") for o in outs)  # an output folder
        assert allowed, f"stage {name}: --{dest} {path} is neither a dep nor an out in dvc.yaml"
    for path in data_deps + outs:
        assert covered(path, list(given.values())), f"stage {name}: {path} is not on its command line"


def test_only_the_ladder_is_a_dvc_metric():
    """A handful of compared figures, none of them a wall-clock time (dvc.lock stays clean on a rerun)."""
    declared = [entry_name(e) for stage in STAGES.values() for e in stage.get("metrics", [])]
    assert declared == ["metrics/ladder.json"] + [f"metrics/ladder/{c}.json" for c in CLASS_NAMES]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_can_enter_the_run_cache(name):
    """DVC saves no stage with a plain (not metric / plot) `cache: false` output to its run cache, and then
    reruns it, and everything after it, where it could have restored the earlier result."""
    uncached = [entry_name(e) for e in STAGES[name].get("outs", []) if isinstance(e, dict)
                and next(iter(e.values())).get("cache") is False]  # fmt: skip
    assert not uncached, f"stage {name}: {uncached} are `cache: false` outs"


def test_ladder_stage_writes_the_declared_metrics_and_plot(tmp_path):
    """pipeline/ladder.py on made-up stage metrics: one file per row, the four stages as keys, in order."""
    stage = STAGES["ladder"]
    tokens = shlex.split(stage["cmd"])
    inputs = {}
    for i, stage_name in enumerate(("float", "calibration", "qat", "deployed")):
        path = tmp_path / f"{stage_name}.json"
        path.write_text(json.dumps({"mAP": 0.3 + i / 100, "AP_divider": 0.4, "AP_ped_crossing": 0.01 * i,
                                    "AP_boundary": 0.5, "AP_boundary_0.5": 0.1}))  # fmt: skip
        inputs[f"--{stage_name}"] = str(path)
    (tmp_path / "compile.json").write_text(json.dumps({"deployed_over_float_paired": 0.57, "runs": 100}))
    inputs.update({"--compile": str(tmp_path / "compile.json"), "--out": str(tmp_path / "ladder.json"),
                   "--class-dir": str(tmp_path / "ladder"), "--plot": str(tmp_path / "plot.json"),
                   "--params": str(REPO / "params.yaml")})  # fmt: skip
    args = [inputs[tokens[i - 1]] if i and tokens[i - 1] in inputs else tok for i, tok in enumerate(tokens)]
    res = subprocess.run([sys.executable, *args[1:]], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    written = ["ladder.json"] + sorted(f"ladder/{p.name}" for p in (tmp_path / "ladder").iterdir())
    declared = sorted(entry_name(e).removeprefix("metrics/") for e in stage["metrics"])
    assert sorted(written) == declared
    summary = json.loads((tmp_path / "ladder.json").read_text())
    # the order `dvc exp show` keeps: mAP of the four stages side by side, in pipeline order, then latency
    assert list(summary) == ["mAP", "latency"] and list(summary["mAP"]) == ["float", "calibration", "qat", "deployed"]
    assert summary["mAP"]["qat"] == pytest.approx(0.32) and summary["latency"] == {"deployed_over_float": 0.57}
    boundary = json.loads((tmp_path / "ladder" / "boundary.json").read_text())
    assert boundary == {"AP": {"float": 0.5, "calibration": 0.5, "qat": 0.5, "deployed": 0.5}}
    points = json.loads((tmp_path / "plot.json").read_text())
    assert len(points) == 16 and points[0] == {"class": "mAP", "stage": "float", "AP": pytest.approx(0.3)}


def test_ladder_names_a_missing_stage_output(tmp_path):
    res = subprocess.run(
        [sys.executable, "pipeline/ladder.py", "--float", str(tmp_path / "none.json"), "--calibration", "x",
         "--qat", "x", "--deployed", "x", "--compile", "x", "--out", "o.json", "--class-dir", str(tmp_path),
         "--plot", "p.json"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'none.json'}: not found; run the stage that writes it (dvc repro)"
