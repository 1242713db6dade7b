"""Range observers: watch the values a tensor takes and choose the clipping range its quantizer covers.

An observer only answers "which real interval [lo, hi] should the integer grid span"; turning that
interval into a scale and a zero point for a given integer dtype is :func:`maptr.quant.fake_quant.
qparams_from_range`'s job. The interval always contains 0, so that 0 is exactly representable (zero
padding, ReLU outputs and masked values stay exact).

- :class:`MinMaxObserver`: the running minimum and maximum (per tensor). No clipping at all, so a
  single outlier stretches the grid for every other value.
- :class:`PercentileObserver`: the ``percentile`` of a histogram of the values (e.g. 99.99): clips the
  rare extreme values.
- :class:`MSEObserver`: searches the range that minimizes the expected squared quantization error over
  the histogram: clipping error of the values outside the range plus rounding noise (step^2 / 12) of
  the values inside it. It trades resolution against clipping for the dtype's number of steps.
- :class:`PerChannelAbsMaxObserver`: symmetric per-output-channel range of a weight (axis 0).
- :class:`FixedRangeObserver`: a range known in advance (the normalized 8-bit pixel grid of the camera
  images): no data needed, nothing learned from it.

Everything is deterministic: the same sequence of ``update`` calls gives the same range (histograms are
exact integer counts, the searches are exhaustive over fixed candidate grids). Symmetric ranges are
``[-t, t]``; asymmetric ranges are ``[lo, hi]`` with ``lo <= 0 <= hi``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor


class RangeObserver(ABC):
    """Accumulates statistics over ``update`` calls and returns a clipping range from them."""

    @abstractmethod
    def update(self, x: Tensor) -> None:
        """Adds the values of ``x`` (any shape) to the statistics; ``x`` is not modified."""

    @abstractmethod
    def compute_range(self, num_steps: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        """The clipping range (lo, hi), 0-D tensors (per tensor) or (C,) (per channel), float32.

        Args:
            num_steps: how many quantization steps the range will be divided into (255 for uint8,
                254 for symmetric int8 [-127, 127], 65534 for symmetric int16); only the MSE search
                needs it, to weigh rounding noise against clipping.
            symmetric: return ``[-t, t]`` instead of ``[lo, hi]``.
        """

    @abstractmethod
    def reset(self) -> None:
        """Forgets everything seen so far."""

    @property
    @abstractmethod
    def has_data(self) -> bool:
        """Whether ``update`` has seen at least one value since the last reset."""


def _finite_values(x: Tensor) -> Tensor:
    """``x`` flattened to float32 without NaN / inf (they carry no range information)."""
    values = x.detach().reshape(-1).float()  # (numel,)
    return values[torch.isfinite(values)]


def _quantile(cumulative: np.ndarray, edges: np.ndarray, target: float) -> float:
    """The value below which ``target`` counts lie, linear within a bin.

    Args:
        cumulative: (bins + 1,) counts below each edge (non-decreasing, flat over empty bins).
        edges: (bins + 1,) bin edges.
        target: a count in [0, cumulative[-1]].
    """
    # The first edge reaching the target; the bin before it then holds counts, so the linear
    # interpolation inside it never divides by zero (np.interp is undefined on flat stretches).
    index = int(np.searchsorted(cumulative, target, side="left"))
    if index == 0:
        return float(edges[0])
    index = min(index, len(edges) - 1)
    below, above = cumulative[index - 1], cumulative[index]
    fraction = (target - below) / (above - below) if above > below else 1.0
    return float(edges[index - 1] + fraction * (edges[index] - edges[index - 1]))


class MinMaxObserver(RangeObserver):
    """Running minimum and maximum of everything seen (per tensor), widened to contain 0."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.min_value = math.inf
        self.max_value = -math.inf

    @property
    def has_data(self) -> bool:
        return self.min_value <= self.max_value

    def update(self, x: Tensor) -> None:
        values = _finite_values(x)
        if values.numel() == 0:
            return
        self.min_value = min(self.min_value, values.min().item())
        self.max_value = max(self.max_value, values.max().item())

    def compute_range(self, num_steps: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        if not self.has_data:
            raise RuntimeError("MinMaxObserver has seen no values: run calibration data through it first")
        lo, hi = min(self.min_value, 0.0), max(self.max_value, 0.0)
        if symmetric:
            bound = max(-lo, hi)
            lo, hi = -bound, bound
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


class FixedRangeObserver(RangeObserver):
    """A clipping range fixed in advance, whatever the data (which it ignores).

    For tensors whose grid is known exactly: the camera images are 8-bit pixels normalized by
    ``(pixel - 128) / 128``, so the uint8 grid over [-1, 127 / 128] (step 1 / 128, zero point 128) holds
    every pixel value exactly, where a range estimated from calibration images would put the grid
    between pixel levels and round half of them.

    Args:
        lo, hi: the range, ``lo <= 0 <= hi``.
    """

    def __init__(self, lo: float, hi: float) -> None:
        if not lo <= 0.0 <= hi or lo == hi:
            raise ValueError(f"a fixed range needs lo <= 0 <= hi and lo < hi, got [{lo}, {hi}]")
        self.lo, self.hi = float(lo), float(hi)

    def reset(self) -> None:
        pass  # nothing is accumulated

    @property
    def has_data(self) -> bool:
        return True

    def update(self, x: Tensor) -> None:
        pass

    def compute_range(self, num_steps: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        lo, hi = self.lo, self.hi
        if symmetric:
            bound = max(-lo, hi)
            lo, hi = -bound, bound
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


class HistogramObserver(RangeObserver):
    """Histogram of all values seen, over a range that grows to contain every value and 0.

    When a batch falls outside the current range, the old counts are redistributed onto the wider
    range by interpolating their cumulative distribution (mass within a bin assumed uniform): exact in
    total count and deterministic, at the price of a slight smearing of the old counts.
    Subclasses choose the range from the histogram in ``compute_range``.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins to choose a range, got {bins}")
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros(self.bins, dtype=np.float64)
        self.lo = 0.0
        self.hi = 0.0

    @property
    def has_data(self) -> bool:
        return bool(self.counts.sum() > 0)

    @property
    def edges(self) -> np.ndarray:
        """(bins + 1,) bin edges from ``lo`` to ``hi``."""
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def update(self, x: Tensor) -> None:
        values = _finite_values(x)
        if values.numel() == 0:
            return
        new_lo = min(self.lo, values.min().item(), 0.0)
        new_hi = max(self.hi, values.max().item(), 0.0)
        if new_hi - new_lo < 1e-12:
            new_hi = new_lo + 1e-12  # all zeros: any tiny positive width keeps the bins well defined
        if self.has_data and (new_lo, new_hi) != (self.lo, self.hi):
            cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])  # (bins + 1,) at the old edges
            new_edges = np.linspace(new_lo, new_hi, self.bins + 1)
            self.counts = np.diff(np.interp(new_edges, self.edges, cumulative))
        self.lo, self.hi = new_lo, new_hi
        # histc counts exactly (integers below 2^24 per bin in float32), so its result does not depend
        # on the order of the additions, on CPU and GPU alike.
        batch_counts = torch.histc(values, bins=self.bins, min=self.lo, max=self.hi)  # (bins,)
        self.counts = self.counts + batch_counts.double().cpu().numpy()

    def _require_data(self) -> None:
        if not self.has_data:
            raise RuntimeError(f"{type(self).__name__} has seen no values: run calibration data through it first")

    def _abs_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of |x| on ``bins`` bins over [0, max |x|]: (counts (bins,), edges (bins + 1,))."""
        bound = max(-self.lo, self.hi)
        abs_edges = np.linspace(0.0, bound, self.bins + 1)
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])  # (bins + 1,)
        total = cumulative[-1]
        # Mass with |x| <= t is F(t) - F(-t); interp clamps outside [lo, hi] to 0 and the total.
        inside = np.interp(abs_edges, self.edges, cumulative, left=0.0, right=total) - np.interp(
            -abs_edges, self.edges, cumulative, left=0.0, right=total
        )
        return np.diff(inside), abs_edges

    @staticmethod
    def _as_range(lo: float, hi: float) -> tuple[Tensor, Tensor]:
        return torch.tensor(min(lo, 0.0), dtype=torch.float32), torch.tensor(max(hi, 0.0), dtype=torch.float32)


class PercentileObserver(HistogramObserver):
    """Clips at a percentile of the values: ``[P(100 - p), P(p)]`` or ``[-t, t]`` with t = P_p(|x|)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = percentile

    def compute_range(self, num_steps: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        self._require_data()
        fraction = self.percentile / 100.0
        if symmetric:
            counts, edges = self._abs_histogram()
            cumulative = np.concatenate([[0.0], np.cumsum(counts)])  # (bins + 1,)
            bound = _quantile(cumulative, edges, fraction * cumulative[-1])
            return self._as_range(-bound, bound)
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])  # (bins + 1,)
        total = cumulative[-1]
        lo = _quantile(cumulative, self.edges, (1.0 - fraction) * total)
        hi = _quantile(cumulative, self.edges, fraction * total)
        return self._as_range(lo, hi)


class MSEObserver(HistogramObserver):
    """Chooses the range minimizing the expected squared quantization error over the histogram.

    For a candidate range [a, b] split into ``num_steps`` steps of size ``d = (b - a) / num_steps``:
    ``error = sum_{c < a} n_c (c - a)^2 + sum_{c > b} n_c (c - b)^2 + d^2 / 12 * sum_{a <= c <= b} n_c``,
    with ``c`` the bin centres and ``n_c`` the counts. With prefix sums of n, n*c and n*c^2 each
    candidate costs O(1), so the search is exhaustive over up to ``candidates`` bin edges per side
    (asymmetric: every (a, b) pair with a <= 0 <= b; symmetric: every t on the |x| histogram).
    """

    def __init__(self, bins: int = 2048, candidates: int = 256) -> None:
        if candidates < 2:
            raise ValueError(f"candidates must be >= 2, got {candidates}")
        super().__init__(bins)
        self.candidates = candidates

    def compute_range(self, num_steps: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        self._require_data()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if symmetric:
            counts, edges = self._abs_histogram()
            # t is the upper edge; the lower end of the |x| histogram (0) is never clipped.
            upper = self._candidate_indices(np.arange(1, self.bins + 1))
            error = self._clip_error_above(counts, edges, upper) + self._rounding_noise(
                counts, np.zeros_like(upper), upper, 2.0 * edges[upper] / num_steps
            )
            bound = float(edges[upper[np.argmin(error)]])
            return self._as_range(-bound, bound)
        edges = self.edges
        # Bin edges at or below 0 are candidates for a, at or above 0 for b (0 lies on the range).
        lower = self._candidate_indices(np.flatnonzero(edges <= 0.0)[::-1])[::-1]  # (A,) from lo up to 0
        upper = self._candidate_indices(np.flatnonzero(edges >= 0.0))  # (B,) from 0 up to hi
        lower_grid, upper_grid = np.meshgrid(lower, upper, indexing="ij")  # (A, B) each
        lower_grid, upper_grid = lower_grid.reshape(-1), upper_grid.reshape(-1)  # (A*B,)
        error = (
            self._clip_error_below(self.counts, edges, lower_grid)
            + self._clip_error_above(self.counts, edges, upper_grid)
            + self._rounding_noise(
                self.counts, lower_grid, upper_grid, (edges[upper_grid] - edges[lower_grid]) / num_steps
            )
        )
        best = int(np.argmin(error))  # first minimum: ties resolve the same way every time
        return self._as_range(float(edges[lower_grid[best]]), float(edges[upper_grid[best]]))

    def _candidate_indices(self, indices: np.ndarray) -> np.ndarray:
        """At most ``candidates`` of ``indices``, evenly spaced, always keeping the last (the extreme)."""
        if len(indices) <= self.candidates:
            return indices
        picks = np.round(np.linspace(0, len(indices) - 1, self.candidates)).astype(np.int64)
        return indices[picks]

    @staticmethod
    def _prefix_moments(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums (bins + 1,) of n, n*c and n*c^2 over bins [0, k) for k = 0..bins."""
        centres = 0.5 * (edges[:-1] + edges[1:])  # (bins,)
        zero = np.zeros(1)
        return (
            np.concatenate([zero, np.cumsum(counts)]),
            np.concatenate([zero, np.cumsum(counts * centres)]),
            np.concatenate([zero, np.cumsum(counts * centres**2)]),
        )

    @classmethod
    def _clip_error_below(cls, counts: np.ndarray, edges: np.ndarray, index: np.ndarray) -> np.ndarray:
        """sum over bins below edge ``index`` of n_c (c - edge)^2, for each index (K,) -> (K,)."""
        s0, s1, s2 = cls._prefix_moments(counts, edges)
        a = edges[index]
        return np.maximum(s2[index] - 2.0 * a * s1[index] + a * a * s0[index], 0.0)

    @classmethod
    def _clip_error_above(cls, counts: np.ndarray, edges: np.ndarray, index: np.ndarray) -> np.ndarray:
        """sum over bins above edge ``index`` of n_c (c - edge)^2, for each index (K,) -> (K,)."""
        s0, s1, s2 = cls._prefix_moments(counts, edges)
        b = edges[index]
        m0, m1, m2 = s0[-1] - s0[index], s1[-1] - s1[index], s2[-1] - s2[index]
        return np.maximum(m2 - 2.0 * b * m1 + b * b * m0, 0.0)

    @staticmethod
    def _rounding_noise(counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, step: np.ndarray) -> np.ndarray:
        """(mass between edges lower and upper) * step^2 / 12, the rounding error of uniform values."""
        cumulative = np.concatenate([[0.0], np.cumsum(counts)])  # (bins + 1,)
        return (cumulative[upper] - cumulative[lower]) * step * step / 12.0


class PerChannelAbsMaxObserver(RangeObserver):
    """Symmetric per-channel range ``[-t_c, t_c]`` with t_c = max |x| over all but ``axis`` (weights)."""

    def __init__(self, axis: int = 0) -> None:
        self.axis = axis
        self.reset()

    def reset(self) -> None:
        self.abs_max: Tensor | None = None

    @property
    def has_data(self) -> bool:
        return self.abs_max is not None

    def update(self, x: Tensor) -> None:
        if x.dim() == 0:
            raise ValueError("a per-channel observer needs a tensor with a channel axis, got a scalar")
        channels_first = x.detach().float().movedim(self.axis, 0)  # (C, ...)
        abs_max = channels_first.abs().reshape(channels_first.shape[0], -1).amax(dim=1)  # (C,)
        self.abs_max = abs_max if self.abs_max is None else torch.maximum(self.abs_max, abs_max)

    def compute_range(self, num_steps: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        if self.abs_max is None:
            raise RuntimeError("PerChannelAbsMaxObserver has seen no values: run a weight through it first")
        if not symmetric:
            raise ValueError("PerChannelAbsMaxObserver gives symmetric ranges only (weights are symmetric)")
        return -self.abs_max, self.abs_max.clone()
