"""What every entrypoint in ``pipeline/`` shares: the --params flag and user-facing error reporting.

Errors a user can fix (bad params, a broken dataset, a corrupt checkpoint) are printed as one line that
names the file and the fix, with a non-zero exit code, instead of a traceback wall.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

_IMPORTED = time.perf_counter()


class UserError(RuntimeError):
    """An error caused by input the user controls; its message names the file and the fix."""


# User-facing error classes, by module and name. Matched by name instead of imported: importing them would
# load torch in every entrypoint before `--help` is answered, and would put the trainer and the packer in
# every stage's import closure (the code its dvc.yaml deps must cover). tests/test_cli.py resolves each.
USER_ERRORS = frozenset({
    "maptr.config.ParamsError", "maptr.cli.UserError", "maptr.data.packing.PackError",
    "maptr.data.records.CorruptRecordError", "maptr.training.checkpoint.CheckpointError",
    "maptr.training.tracking.TrackingError", "maptr.training.trainer.TrainingDiverged", "builtins.FileNotFoundError",
    "maptr.atomic.OutputError", "maptr.deploy.ort_runner.OnnxModelError",
})  # fmt: skip


def is_user_error(exc: BaseException) -> bool:
    """Is ``exc`` (or a base class of it) one of :data:`USER_ERRORS`?"""
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(exc).__mro__)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, torchrun stopping its workers): unwinds like Ctrl-C, so temporary outputs are
    removed and the MLflow run ends as KILLED instead of staying RUNNING."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the docstring's line breaks (its example commands stay readable)."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (one section per stage)")
    return p


def add_training_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    """The inputs and outputs every training stage (float-train, qat) takes, defaulting to ``stage``'s files."""
    p.add_argument("--packed", default="data/packed", help="packed dataset (pack stage output)")
    p.add_argument("--best", default=f"models/{stage}-checkpoint-best.pt", help="best checkpoint (by val mAP)")
    p.add_argument("--last", default=f"models/resume/{stage}-last.pt", help="resume checkpoint (not a DVC output)")
    p.add_argument("--metrics", default=f"metrics/{stage}.json", help="metrics of the best epoch")
    p.add_argument("--curve", default=f"metrics/{stage}_curve.json", help="per-epoch metrics (DVC plots)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same params")


def add_quantization_inputs(p: argparse.ArgumentParser) -> None:
    """The inputs of the stages that quantize the float model (sensitivity, calibrate)."""
    p.add_argument("--packed", default="data/packed", help="packed dataset (pack stage output)")
    p.add_argument("--float-checkpoint", default="models/float-checkpoint-best.pt", help="float model")


def process_seconds() -> float:
    """Wall seconds since this process started (imports included), from Linux's /proc; elsewhere since
    this module was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def run(main: Callable[[], object]) -> None:
    """Call ``main``; a user error becomes ``error: <message>`` on stderr and exit code 2.

    A run that finishes prints its wall time on stderr (``<entrypoint>: done in 5 min 36 s``), so a
    ``dvc repro`` log gives every stage's time.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
        seconds = round(process_seconds())
        print(f"{Path(sys.argv[0]).stem}: done in {seconds // 60} min {seconds % 60} s", file=sys.stderr)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print("interrupted: no output was marked finished", file=sys.stderr)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
