"""Gram-matrix observers: second moments of a layer's input, collected batch by batch.

* :class:`InputGram`: X^T X of a Gemm / MatMul input (K features) and the sum of its rows
  (low-rank's data-aware ranks and factors, pruning's whole-layer refit).
* :class:`ConvPatchGram`: the same for a Conv's im2col patches (C kh kw features) at random
  output positions per image (with replacement), float64.
* :class:`GroupedPatchGram`: one Gram matrix per conv group (GPTQ's H = E[x x^T]), from
  distinct random output positions per image; Gemm / MatMul rows as one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from onnxcomp.core.geometry import ConvGeometry, patches_at

# The matrices here are small (K <= a few thousand): OpenBLAS's threads only add contention
# with ONNX Runtime's (a 576 x 576 Cholesky went from 14 ms to 2.3 s on a busy 2-core machine).
ONE_BLAS_THREAD = {"limits": 1, "user_api": "blas"}


class InputGram:
    """Observer of a Gemm or MatMul input: the Gram matrix X^T X of its rows of K features."""

    def __init__(self, features: int, transposed: bool = False) -> None:
        self.transposed = transposed
        self.gram = np.zeros((features, features))
        self.total = np.zeros(features)  # sum of the rows (for a bias in a refit)
        self.rows = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float64)
        rows = x.T if self.transposed else x.reshape(-1, self.gram.shape[0])
        self.gram += rows.T @ rows
        self.total += rows.sum(axis=0)
        self.rows += len(rows)


class ConvPatchGram:
    """Observer of a Conv input: the Gram matrix of its im2col patches (C kh kw features).

    Per image, ``per_image`` output positions are drawn at random (all of them when there are
    no more); memory is the (C kh kw)^2 matrix and a bounded chunk of patches.
    """

    _CHUNK_VALUES = 1 << 21

    def __init__(
        self, geometry: ConvGeometry, channels: int, per_image: int, seed: int = 0
    ) -> None:
        self.geometry = geometry
        self.channels = channels
        features = channels * math.prod(geometry.kernel)
        self.gram = np.zeros((features, features))
        self.total = np.zeros(features)  # sum of the patches (for a bias in a refit)
        positions = math.prod(geometry.out_hw)
        self.per_image = min(per_image, positions)
        self.all_positions = per_image >= positions
        self.chunk = max(1, self._CHUNK_VALUES // (self.per_image * features))
        self.rng = np.random.default_rng(seed)
        self.rows = 0

    def update(self, values: np.ndarray) -> None:
        for start in range(0, len(values), self.chunk):
            images = np.asarray(values[start : start + self.chunk], np.float64)
            patches = self._patches(self.geometry.pad(images))
            self.gram += patches.T @ patches
            self.total += patches.sum(axis=0)
            self.rows += len(patches)

    def _patches(self, padded: np.ndarray) -> np.ndarray:
        ho, wo = self.geometry.out_hw
        count = len(padded)
        if self.all_positions:
            flat = np.tile(np.arange(ho * wo), count)
        else:
            flat = self.rng.integers(0, ho * wo, count * self.per_image)
        image = np.repeat(np.arange(count), self.per_image)
        return patches_at(padded, self.geometry, image, flat)


@dataclass
class GroupedPatchGram:
    """Streaming Gram matrix of a layer's input patches, one per group (float32 patches).

    For a Conv the rows are (input channel of the group, ky, kx) patches at ``positions``
    distinct output positions per image; for Gemm/MatMul the rows are the input vectors.
    """

    layer: str
    kind: str  # "conv" or "dense"
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1
    positions: int = 16
    seed: int = 0
    gram: np.ndarray | None = None
    rows: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def _conv_patches(self, x: np.ndarray) -> np.ndarray:
        geometry = ConvGeometry(
            (x.shape[2], x.shape[3]),
            self.kernel,
            self.strides,
            self.dilations,
            self.pads,  # type: ignore[arg-type]
        )
        oh, ow = geometry.out_hw
        count = min(self.positions, oh * ow)
        flat = np.stack([self._rng.choice(oh * ow, count, replace=False) for _ in range(len(x))])
        image = np.repeat(np.arange(len(x)), count)
        patches = patches_at(geometry.pad(x), geometry, image, flat.ravel())
        return patches.reshape(len(image), self.group, -1)  # (P, G, C/G*kh*kw)

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32)
        if self.kind == "conv":
            if x.ndim != 4 or len(self.kernel) != 2:
                return
            patches = self._conv_patches(x)
        else:
            patches = x.reshape(-1, 1, x.shape[-1])
        with threadpool_limits(**ONE_BLAS_THREAD):
            part = np.einsum("pgi,pgj->gij", patches, patches, optimize=True).astype(np.float64)
        self.gram = part if self.gram is None else self.gram + part
        self.rows += patches.shape[0]
