"""Checkpoints: written atomically, read with ``weights_only=True`` (tensors and plain containers only).

A checkpoint is a dict: ``model`` (state_dict), and for resumable ones ``optimizer``, ``scheduler``,
``epoch``, ``step``, ``step_in_epoch``, ``rng`` (torch CPU RNG state), ``best`` (best val mAP so far) and
``history`` (per-epoch metrics), plus ``stage`` and ``preset`` so a checkpoint of the wrong kind is
refused with a clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maptr.atomic import atomic_file
from maptr.weights_only import load_weights_only


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names the file and the fix."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save into a temporary file, then rename: a killed save never leaves a truncated checkpoint.

    Saved through a Python file object: a full disk then raises OSError(ENOSPC), which names the path as
    an OutputError, where torch's own path writer only says "unexpected pos"."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors (parameters and buffers alike) holding NaN or inf."""
    return [
        name for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]  # fmt: skip


def load_checkpoint(path: str | Path, expect_preset: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    state = load_weights_only(
        path,
        missing=CheckpointError(f"{path}: checkpoint not found; run the stage that writes it (dvc repro)"),
        unreadable=lambda why: CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {why}); re-run the stage that writes it"
        ),
    )
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a maptr checkpoint (no 'model' state_dict)")
    if expect_preset is not None and state.get("preset") not in (None, expect_preset):
        raise CheckpointError(
            f"{path}: written for model preset {state.get('preset')!r}, but params select {expect_preset!r}; "
            "re-run the stage or change model.preset"
        )
    return state
