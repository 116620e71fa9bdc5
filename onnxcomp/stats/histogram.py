"""Streaming per-tensor statistics: min/max and magnitude histograms in fixed memory.

Each tensor keeps two histograms of magnitudes, one for x >= 0 and one for -x where x < 0,
with ``bins`` bins of a common width starting at 0. When a batch holds a magnitude beyond the
covered range, the width doubles and neighbouring bins merge pairwise: exact (no
interpolation), and memory stays ``2 x bins`` counts per tensor whatever the number of images.
The covered range is therefore between 1x and 2x the largest magnitude seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 2048


@dataclass
class TensorHistogram:
    """Min, max and sign-split magnitude histograms of one tensor, updated batch by batch."""

    bins: int = DEFAULT_BINS
    min: float = np.inf
    max: float = -np.inf
    width: float = 0.0
    positive: np.ndarray = field(default=None)  # type: ignore[assignment]
    negative: np.ndarray = field(default=None)  # type: ignore[assignment]
    count: int = 0

    def __post_init__(self) -> None:
        if self.bins % 2:
            raise ValueError("bins must be even")
        if self.positive is None:
            self.positive = np.zeros(self.bins, np.int64)
        if self.negative is None:
            self.negative = np.zeros(self.bins, np.int64)

    @property
    def max_abs(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.arange(self.bins + 1) * self.width

    def _grow_to(self, magnitude: float) -> None:
        """Double the bin width (merging bin pairs) until ``magnitude`` is covered."""
        if self.width == 0.0:
            self.width = magnitude / self.bins if magnitude > 0 else 0.0
            return
        while magnitude > self.width * self.bins:
            for hist in (self.positive, self.negative):
                merged = hist.reshape(-1, 2).sum(axis=1)
                hist[: self.bins // 2] = merged
                hist[self.bins // 2 :] = 0
            self.width *= 2.0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            values = values[np.isfinite(values)]
            if values.size == 0:
                return
            lo, hi = float(values.min()), float(values.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += values.size
        self._grow_to(max(abs(lo), abs(hi)))
        if self.width == 0.0:  # all zeros so far: they go to the first bin
            self.positive[0] += values.size
            return
        self._add(values, negative=lo < 0)

    def _add(self, values: np.ndarray, negative: bool) -> None:
        """Count values into the bins with one bincount (a few passes over the data).

        Signed values are laid out on 2 x bins slots: slot bins + floor(x / width), so slot
        bins + k holds positive magnitude bin k and slot bins - 1 - k negative bin k.
        """
        bins = self.bins
        scaled = np.multiply(values, np.float32(1.0 / self.width))
        if not negative:
            index = scaled.astype(np.intp)
            np.minimum(index, bins - 1, out=index)
            self.positive += np.bincount(index, minlength=bins)[:bins]
            return
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.intp)
        index += bins
        np.clip(index, 0, 2 * bins - 1, out=index)
        counts = np.bincount(index, minlength=2 * bins)
        self.positive += counts[bins:]
        self.negative += counts[:bins][::-1]

    def magnitudes(self) -> np.ndarray:
        """Histogram of |x| (both signs together)."""
        return self.positive + self.negative


@dataclass
class ChannelMean:
    """Running mean of a tensor per channel (axis 1), e.g. for bias correction."""

    total: np.ndarray | None = None
    count: int = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim < 2:
            return
        axes = tuple(i for i in range(values.ndim) if i != 1)
        part = values.sum(axis=axes)
        self.total = part if self.total is None else self.total + part
        self.count += values.size // values.shape[1]

    @property
    def mean(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            return np.zeros(0)
        return self.total / self.count
