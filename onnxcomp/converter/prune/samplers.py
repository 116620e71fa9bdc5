"""ThiNet's observers: per-channel contributions of a reading layer's input to its outputs,
sampled at random and kept in a bounded reservoir."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxcomp.core.geometry import ConvGeometry, patches_at
from onnxcomp.stats.gram import ConvPatchGram, InputGram
from onnxcomp.stats.histogram import ChannelMean


class _Reservoir:
    """At most ``cap`` rows, uniformly over all rows seen."""

    def __init__(self, columns: int, cap: int, rng: np.random.Generator) -> None:
        self.cap = cap
        self.rng = rng
        self.rows = np.zeros((0, columns))
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        free = max(0, min(self.cap - len(self.rows), len(rows)))
        if free:
            self.rows = np.concatenate([self.rows, rows[:free]])
        for offset, row in enumerate(rows[free:]):
            slot = int(self.rng.integers(0, self.seen + free + offset + 1))
            if slot < self.cap:
                self.rows[slot] = row
        self.seen += len(rows)


class ContributionSampler(_Reservoir):
    """Observer of a Conv's input: sampled per-channel contributions x_c to its outputs.

    For each image, ``per_image`` random (output channel, output position) pairs give a row
    x (length C) with x_c = sum_window W[o, c] * input[c, window]. ``classes`` (length C)
    optionally sums channels of the same class into one column.
    """

    def __init__(
        self,
        weight: np.ndarray,
        geometry: ConvGeometry,
        per_image: int,
        cap: int,
        seed: int,
        classes: np.ndarray | None = None,
    ) -> None:
        self.weight = np.asarray(weight, np.float64)
        self.geometry = geometry
        self.per_image = per_image
        self.merge = _Merge(classes, self.weight.shape[1])
        super().__init__(self.merge.columns, cap, np.random.default_rng(seed))

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        g = self.geometry.at_input(values.shape[2:])
        ho, wo = g.out_hw
        n = values.shape[0] * self.per_image
        image = np.repeat(np.arange(values.shape[0]), self.per_image)
        out_ch = self.rng.integers(0, self.weight.shape[0], n)
        oy, ox = self.rng.integers(0, ho, n), self.rng.integers(0, wo, n)
        weights = self.weight[out_ch]  # (n, C, kh, kw)
        patch = patches_at(g.pad(values), g, image, oy * wo + ox).reshape(weights.shape)
        self.add(self.merge(np.einsum("sckl,sckl->sc", patch, weights)))


class MatrixSampler(_Reservoir):
    """Observer of a Gemm/MatMul's 2-D input: rows x_k = input[n, k] * W[o, k] for random o."""

    def __init__(
        self, weight: np.ndarray, per_image: int, cap: int, seed: int, classes: np.ndarray | None
    ) -> None:
        self.weight = np.asarray(weight, np.float64)  # (outputs, K)
        self.per_image = per_image
        self.merge = _Merge(classes, self.weight.shape[1])
        super().__init__(self.merge.columns, cap, np.random.default_rng(seed))

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).reshape(len(values), -1)
        image = np.repeat(np.arange(len(values)), self.per_image)
        out = self.rng.integers(0, self.weight.shape[0], len(image))
        self.add(self.merge(values[image] * self.weight[out]))


class _Merge:
    """Sums the columns of the same class: (n, K) -> (n, classes)."""

    def __init__(self, classes: np.ndarray | None, width: int) -> None:
        if classes is None:
            classes = np.arange(width)
        self.order = np.argsort(classes, kind="stable")
        sorted_classes = classes[self.order]
        self.starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
        self.identity = len(self.starts) == width and np.array_equal(self.order, np.arange(width))
        self.columns = len(self.starts)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.identity:
            return rows
        return np.add.reduceat(rows[:, self.order], self.starts, axis=1)


@dataclass
class ReaderStats:
    """What one pass over the data learnt about a layer reading pruned channels: ThiNet's
    samples, its input's channel means (bias compensation), its input Gram (refit)."""

    consumer: str  # node name
    tensor: str
    classes: np.ndarray  # class root of each column of the sampler (unique, sorted)
    sampler: ContributionSampler | MatrixSampler | None = None
    mean: ChannelMean = field(default_factory=ChannelMean)
    gram: ConvPatchGram | InputGram | None = None
