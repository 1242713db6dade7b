"""Where bf16 autocast stops (``float.bf16``): the model runs only its image side in bfloat16.

The convolutions of the backbone and the neck hold most of a training step's time on the CPU (~55 % of
the default's) and gain the most from native bf16; they lose nothing that matters at 8 bits of mantissa.
The BEV encoder and the map head do geometry: bf16 moves a projected image coordinate of ~1000 px by up
to ~4 px and a point in logit space by ~0.02 (~0.3 m of the 60 m BEV range). Measured on the default
(docs/training.md, "Precision"): the whole forward in bf16 lost 0.03-0.06 val mAP in 3 epochs, float32
islands for the projection and the points alone still 0.03. So :class:`maptr.models.maptr.MapTR` runs
everything after the neck inside :func:`float32_region` on float32 features (:func:`as_float32`).

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
