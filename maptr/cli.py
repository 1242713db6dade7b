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


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (one section per stage)")
    return p


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
