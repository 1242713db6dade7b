"""params.yaml is read the way DVC writes it: YAML 1.2 numbers, every key required, and `dvc exp run -S`
changes one line of the file."""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from maptr.config import (
    ParamsError,
    QATConfig,
    TrainConfig,
    load_model_config,
    load_params,
    load_section,
)
from maptr.data.packing import PackError, resolve_version
from maptr.yaml12 import parse_yaml

PARAMS_TEXT = (REPO / "params.yaml").read_text()


def with_line(tmp_path: Path, old: str, new: str) -> Path:
    """The repository's params.yaml with one line's text replaced."""
    assert PARAMS_TEXT.count(old) == 1, old
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-06", 1e-6), ("1.0e-06", 1e-6), ("1e-3", 1e-3), ("5e-5", 5e-5), (".5", 0.5), ("1E-6", 1e-6),
     ("-1e-3", -1e-3), ("+2.5e-4", 2.5e-4), ("1", 1.0), ("0", 0.0), ("3.", 3.0)],
)  # fmt: skip
def test_every_numeric_form_dvc_can_write_is_a_number(tmp_path, text, value):
    """DVC writes `lr: 1e-06` for -S qat.lr=1e-6; PyYAML (YAML 1.1) read that as the string '1e-06'."""
    parsed = parse_yaml(f"lr: {text}\n")["lr"]
    assert isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and parsed == value
    if value > 0:  # lr <= 0 is parsed, then refused by the range check
        path = with_line(tmp_path, "  lr: 1.0e-5 ", f"  lr: {text} ")
        cfg = load_section(load_params(path), "qat", QATConfig)
        assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(value, rel=0, abs=0)


def test_yaml_1_1_booleans_are_strings_and_refused(tmp_path):
    path = with_line(tmp_path, "  augment: false            # colour", "  augment: yes            # colour")
    with pytest.raises(ParamsError, match=r"params.yaml: float.augment: expected true/false, got 'yes'"):
        load_section(load_params(path), "float", TrainConfig)


def test_a_missing_key_is_an_error_naming_it(tmp_path):
    path = with_line(tmp_path, "  weight_decay: 0.01\n  warmup_steps: 100\n", "  warmup_steps: 100\n")
    with pytest.raises(ParamsError, match=r"params.yaml: float: missing key\(s\) \['weight_decay'\]"):
        load_section(load_params(path), "float", TrainConfig)
    path = with_line(tmp_path, "      dropout: 0.0              # a short", "      # a short")
    with pytest.raises(ParamsError, match=r"model.presets.tiny: missing key\(s\) \['dropout'\]"):
        load_model_config(load_params(path))
    path = with_line(tmp_path, "  pretrained: ''", "  # pretrained: ''")
    with pytest.raises(ParamsError, match=r"model.pretrained: missing"):
        load_model_config(load_params(path))


def test_yaml_error_is_one_line(tmp_path):
    path = with_line(tmp_path, "  warmup_steps: 100", "  warmup_steps: [100")
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: not valid YAML")


def set_params(path: Path, *overrides: str) -> None:
    """What `dvc exp run -S` does to params.yaml (DVC's own function)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(path), list(overrides))


@pytest.mark.parametrize(
    ("override", "section", "key", "value"),
    [("qat.lr=1e-6", "qat", "lr", 1e-6), ("float.lr=5e-4", "float", "lr", 5e-4),
     ("calibrate.percentile=99.9", "calibrate", "percentile", 99.9),
     ("float.launcher='torchrun --nproc_per_node=8'", "float", "launcher", "torchrun --nproc_per_node=8"),
     ("pack.dataroot=/data/nuscenes", "pack", "dataroot", "/data/nuscenes"),
     ("compile.thread_sweep=[2]", "compile", "thread_sweep", [2])],
)  # fmt: skip
def test_dvc_set_param_changes_one_line_and_is_read_back(tmp_path, override, section, key, value):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    set_params(path, override)
    changed = [line for line in difflib.unified_diff(PARAMS_TEXT.splitlines(), path.read_text().splitlines(), n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]  # fmt: skip
    assert len(changed) == 2, "\n".join(changed)  # one line out, one line in
    assert load_params(path)[section][key] == value


def test_repo_params_are_in_the_layout_dvc_writes_back(tmp_path):
    """A no-op -S leaves the file byte-identical: nothing for the next real -S to reformat."""
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    set_params(path, "synth.seed=0")
    assert path.read_text() == PARAMS_TEXT


def test_pack_version_auto_finds_the_one_table_folder(tmp_path):
    (tmp_path / "mini" / "v1.0-mini").mkdir(parents=True)
    assert resolve_version(tmp_path / "mini", "auto") == "v1.0-mini"
    assert resolve_version(tmp_path / "mini", "v1.0-trainval") == "v1.0-trainval"  # named: taken as is
    (tmp_path / "both" / "v1.0-mini").mkdir(parents=True)
    (tmp_path / "both" / "v1.0-trainval").mkdir()
    with pytest.raises(PackError, match=r"both holds v1.0-mini, v1.0-trainval: set pack.version"):
        resolve_version(tmp_path / "both", "auto")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match=r"empty holds no v1.0-\* table folder"):
        resolve_version(tmp_path / "empty", "auto")


def test_pack_stage_command_with_only_the_dataroot(tiny_world, tmp_path):
    """`-S pack.dataroot=<root>` alone packs it: the repository's params say `version: auto`."""
    assert load_params(REPO / "params.yaml")["pack"]["version"] == "auto"
    out = tmp_path / "packed"
    res = subprocess.run(
        [sys.executable, "pipeline/pack.py", "--params", "params.yaml", "--dataroot", str(tiny_world), "--out",
         str(out)], cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "metas" / "info.json").read_text())["version"] == "v1.0-trainval"
