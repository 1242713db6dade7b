"""What every entrypoint in ``pipeline/`` shares: the --params flag and user-facing error reporting.

Errors a user can fix (bad params, a broken dataset, a corrupt checkpoint) are printed as one line that
names the file and the fix, with a non-zero exit code, instead of a traceback wall.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from maptr.config import ParamsError


class UserError(RuntimeError):
    """An error caused by input the user controls; its message names the file and the fix."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from maptr.data.packing import PackError
    from maptr.data.records import CorruptRecordError
    from maptr.training.checkpoint import CheckpointError
    from maptr.training.tracking import TrackingError
    from maptr.training.trainer import TrainingDiverged

    return (
        ParamsError, UserError, PackError, CorruptRecordError, CheckpointError, TrackingError, TrainingDiverged,
        FileNotFoundError,
    )  # fmt: skip


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


def run(main: Callable[[], object]) -> None:
    """Call ``main``; a user error becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        main()
    except user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output was marked finished", file=sys.stderr)
        sys.exit(130)
