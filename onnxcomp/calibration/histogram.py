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
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += finite.size
        magnitude = max(abs(lo), abs(hi))
        self._grow_to(magnitude)
        if self.width == 0.0:  # all zeros so far: they go to the first bin
            self.positive[0] += finite.size
            return
        top = self.bins - 1
        pos = finite[finite >= 0]
        neg = -finite[finite < 0]
        for hist, part in ((self.positive, pos), (self.negative, neg)):
            if part.size:
                index = np.minimum((part / self.width).astype(np.int64), top)
                hist += np.bincount(index, minlength=self.bins)

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
