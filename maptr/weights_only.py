"""Reading torch files with ``weights_only=True``: tensors and plain containers, never an arbitrary pickle.

Checkpoints and backbone weights are read the same way; each caller names, in its own words, what a
missing or unreadable file means for the user.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# What torch.load raises on a truncated or corrupt file, or on a pickle that weights_only refuses.
_UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError)


def load_weights_only(path: Path, missing: Exception, unreadable: Callable[[str], Exception]) -> Any:
    """The object stored in ``path``, on the CPU.

    Raises ``missing`` when there is no such file, and ``unreadable(why)`` (``why``: the first line of
    torch's reason, at most 200 characters) when torch cannot read it.
    """
    if not path.is_file():
        raise missing
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as exc:
        raise unreadable((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]) from None
