"""Element-wise and matrix operators as parameter-free modules, so that a quantizer can find them.

An ``a + b`` written inline in a forward is invisible to a module walk; ``self.residual_add(a, b)`` is a
named module that :mod:`maptr.quant.quantizer` can wrap with fake-quantization of its inputs (the idea
of torch.ao's ``FloatFunctional``). In the float model these modules are exactly the operator they name:
same result, no parameters, no buffers, so state dicts and float checkpoints are unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn


class Add(nn.Module):
    """``a + b`` (broadcasting)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class Mul(nn.Module):
    """``a * b`` (broadcasting)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class MatMul(nn.Module):
    """``a @ b`` (batched)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b
