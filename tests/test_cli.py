"""What every entrypoint shares (maptr/cli.py): user errors as one line with exit code 2, and the wall
time of a finished run."""

from __future__ import annotations

import re
import sys
import time

import pytest

from maptr import cli
from maptr.config import ParamsError


def test_finished_run_prints_its_wall_time(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline/float_train.py"])
    cli.run(lambda: time.sleep(0.01))
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"float_train: done in \d+ min \d+ s", err), err
    minutes, seconds = map(int, re.findall(r"\d+", err))
    assert 0 <= seconds < 60 and minutes * 60 + seconds <= cli.process_seconds() + 1


def test_process_seconds_counts_from_the_process_start():
    before = cli.process_seconds()
    time.sleep(0.05)
    after = cli.process_seconds()
    assert after - before >= 0.04
    # the process started before this module (and pytest) was imported, and not hours ago
    assert time.perf_counter() - cli._IMPORTED <= after + 0.02 < 24 * 3600


def test_user_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline/pack.py"])

    def main():
        raise ParamsError("params.yaml: float.lr: expected a number, got 'x'")

    with pytest.raises(SystemExit) as exc:
        cli.run(main)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: params.yaml: float.lr: expected a number, got 'x'\n"
