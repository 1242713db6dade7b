"""Float32 islands inside a bf16-autocast forward (``float.bf16``).

bfloat16 keeps 8 bits of mantissa: a projected image coordinate of ~1000 px is off by up to ~4 px, and a
point in logit space by ~0.02, which is ~0.3 m of the 60 m BEV range. Convolutions and attention
features lose nothing that matters at that precision; geometry does. The model computes its geometry
(camera projection, reference points, the point refinement) inside :func:`float32_region` on float32
inputs (:func:`as_float32`), whatever autocast does around it.

Without autocast (float32 training, inference, ONNX export) both are no-ops: no cast enters the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def float32_region(like: Tensor) -> Iterator[None]:
    """Autocast off for ``like``'s device type while inside, if it was on."""
    device_type = like.device.type  # "meta" (shape checks, operator counts) has no autocast
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def as_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a lower-precision float (a bf16 / fp16 activation), else ``x`` itself."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
