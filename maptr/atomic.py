"""Atomic outputs: every stage writes into a temporary sibling and renames it into place when done.

An interrupted stage (an exception, Ctrl-C or SIGKILL) therefore never leaves an output that looks
finished: either the old output is still there untouched, or the new one is complete. An output that
cannot be written (no such folder, no permission, disk full) is an :class:`OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

# errno values that say "this output cannot be written here", as opposed to a bug or a missing input
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST, errno.EFBIG}  # fmt: skip


class OutputError(RuntimeError):
    """An output that cannot be written: names the path, the reason and the fix."""


def output_error(path: Path, exc: OSError) -> OutputError:
    """The one-line error for an OSError met while writing ``path`` (named by its final name when it is one
    of our temporaries, possibly nested: the user knows the output, not its temporary sibling)."""
    path = Path(re.sub(r"(\.tmp-\d+)+$", "", str(path)))
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space and re-run"
    else:
        fix = "make the folder writable (a file may stand where a folder should be) or choose another output path"
    return OutputError(f"{path}: cannot write ({reason}); {fix}. Nothing was replaced")


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    """Remove a file or folder, ignoring errors: cleanup must never hide the error that caused it."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _prepare(path: Path) -> Path:
    """Create ``path``'s folder and remove temporaries a killed earlier run left beside it; returns the
    temporary sibling to write."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc) from None
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            _remove(stale)
    return _tmp_sibling(path)


@contextlib.contextmanager
def _replacing(path: Path, tmp: Path, clear: bool = False) -> Iterator[None]:
    """Run the write of ``tmp``; on success rename it onto ``path`` (removing what stands there first when
    ``clear``: a folder cannot be renamed over one), on any failure remove it. An OSError that says the
    output cannot be written becomes an OutputError naming ``path``."""
    try:
        yield
        if clear and (path.exists() or path.is_symlink()):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise output_error(path, exc) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = _prepare(path)
    with _replacing(path, tmp, clear=True):
        try:
            tmp.mkdir()
        except OSError as exc:
            raise output_error(path, exc) from None
        yield tmp


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = _prepare(path)
    with _replacing(path, tmp):
        yield tmp


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
