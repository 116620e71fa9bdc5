"""The ways to factorize one layer (SVD, spatial SVD, Tucker-2), each as a chain of stages
with its ranks, MACs and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp.converter.lowrank.decompose import (
    ERROR_SLACK,
    RIDGE,
    Target,
    energy_rank,
    gram_roots,
    output_error,
    relative_error,
    smallest_rank,
    svd_factors,
)
from onnxcomp.core.geometry import ConvGeometry
from onnxcomp.core.macs import conv_macs, matmul_macs

# Mode energies tried by Tucker-2 under an output error budget, lowest first.
TUCKER_LADDER = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
Attributes = dict[str, Any]


@dataclass
class Stage:
    """One layer of a factorized chain: its weight (float64) and attributes."""

    weight: np.ndarray
    attributes: Attributes = field(default_factory=dict)


def ranks_text(ranks: tuple[int, ...]) -> str:
    return "/".join(map(str, ranks))


@dataclass
class Candidate:
    """One way to factorize a layer; ``output_error`` is known when there were statistics."""

    method: str
    ranks: tuple[int, ...]
    full_ranks: tuple[int, ...]
    stages: list[Stage]
    macs: int
    error: float
    output_error: float | None = None
    refit: bool = False

    def rank_text(self) -> str:
        noun = "ranks" if len(self.ranks) > 1 else "rank"
        return f"{noun} {ranks_text(self.ranks)} of {ranks_text(self.full_ranks)}"


def conv_attributes(geometry: ConvGeometry, only_axis: int | None = None) -> Attributes:
    """Conv attributes of the whole geometry, or of one axis only (0: vertical, 1: horizontal).

    With ``only_axis`` the other axis gets a kernel of 1, stride 1, dilation 1 and no padding.
    """
    kernel, strides = list(geometry.kernel), list(geometry.strides)
    dilations, pads = list(geometry.dilations), list(geometry.pads)
    if only_axis is not None:
        other = 1 - only_axis
        kernel[other], strides[other], dilations[other] = 1, 1, 1
        pads[other], pads[other + 2] = 0, 0
    return {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": pads}


def _output_error(matrix: np.ndarray, approximation: np.ndarray, target: Target) -> float | None:
    return None if target.gram is None else output_error(matrix, approximation, target.gram)


def kernel_form(weight: np.ndarray) -> np.ndarray:
    """A Conv weight (O, C, kh, kw) in matrix form: (C kh kw, O), rows in im2col order."""
    return weight.reshape(weight.shape[0], -1).T


def conv_svd(weight: np.ndarray, geometry: ConvGeometry, target: Target) -> Candidate:
    """1x1 Conv as two 1x1 Convs; the whole geometry goes on the first (it has no bias)."""
    out_ch, in_ch = weight.shape[:2]
    matrix = kernel_form(weight)  # (C, O)
    a, b, refit = svd_factors(matrix, target)  # a (C x r), b (r x O)
    rank = a.shape[1]
    ho, wo = geometry.out_hw
    stages = [
        Stage(a.T.reshape(rank, in_ch, 1, 1), conv_attributes(geometry)),
        Stage(b.T.reshape(out_ch, rank, 1, 1), {}),
    ]
    macs = conv_macs((1, rank, ho, wo), (rank, in_ch, 1, 1))
    macs += conv_macs((1, out_ch, ho, wo), (out_ch, rank, 1, 1))
    approximation = a @ b
    return Candidate(
        "svd", (rank,), (min(out_ch, in_ch),), stages, macs,
        relative_error(matrix, approximation), _output_error(matrix, approximation, target), refit,
    )  # fmt: skip


def refit_horizontal(a: np.ndarray, weight: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """The spatial SVD's second factor (r x O kw) refitted by least squares, ``a`` fixed.

    The (kh x 1) conv gives h[r, j] = sum_{c, i} a[(c, i), r] p[c, i, j]; the (1 x kw) conv
    outputs sum_{r, j} B[(r, j), o] h[r, j]. B = (T^T G T + l I)^{-1} T^T G W^T, with T the
    map from patches p to h and G the patch Gram matrix.
    """
    out_ch, in_ch, kh, kw = weight.shape
    rank = a.shape[1]
    rows = in_ch * kh
    left = (a.T @ gram.reshape(rows, -1)).reshape(rank * kw, rows * kw)  # a^T G: (r j, b k)
    h = (left.reshape(rank * kw, rows, kw).transpose(0, 2, 1) @ a).transpose(0, 2, 1)
    h = h.reshape(rank * kw, rank * kw)  # (r j, s k)
    cross = left @ weight.reshape(out_ch, rows * kw).T  # (r j, o)
    ridge = RIDGE * max(float(np.trace(h)) / len(h), np.finfo(np.float64).tiny)
    solution = np.linalg.solve(h + ridge * np.eye(len(h)), cross)
    return solution.reshape(rank, kw, out_ch).transpose(0, 2, 1).reshape(rank, out_ch * kw)


class SpatialFit:
    """Spatial SVD factors of one Conv at any rank: plain, or refitted on its patch Gram.

    The matrix is M[(c, i), (o, j)] = W[o, c, i, j]. Refit: the first factor is the
    data-aware SVD of M under the Gram of the (c, i) features (G summed over equal j), the
    second ``refit_horizontal``; a refit that does no better than the plain factors on the
    full Gram is not used.
    """

    def __init__(self, weight: np.ndarray, gram: np.ndarray | None, refit: bool) -> None:
        self.weight = weight
        out_ch, in_ch, kh, kw = weight.shape
        self.matrix = weight.transpose(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)
        self.gram = gram
        self.u, self.s, self.vt = np.linalg.svd(self.matrix, full_matrices=False)
        self.refit = refit and gram is not None
        if self.refit:
            g4 = gram.reshape(in_ch * kh, kw, in_ch * kh, kw)  # type: ignore[union-attr]
            root, self.inverse_root, _ = gram_roots(np.einsum("ajbj->ab", g4))
            self.du, self.ds, _ = np.linalg.svd(root @ self.matrix, full_matrices=False)
        self._fits: dict[int, tuple[np.ndarray, np.ndarray, bool, float | None]] = {}

    @property
    def full(self) -> int:
        return len(self.s)

    def kernel_form(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The matrix form (C kh kw, O) of the kernel that the two factors make."""
        out_ch, in_ch, kh, kw = self.weight.shape
        kernel = (a @ b).reshape(in_ch, kh, out_ch, kw).transpose(2, 0, 1, 3)
        return kernel_form(kernel)

    def _error(self, a: np.ndarray, b: np.ndarray) -> float | None:
        if self.gram is None:
            return None
        return output_error(kernel_form(self.weight), self.kernel_form(a, b), self.gram)

    def fit(self, rank: int) -> tuple[np.ndarray, np.ndarray, bool, float | None]:
        """(A, B, refit, output error) at ``rank``."""
        if rank not in self._fits:
            root = np.sqrt(self.s[:rank])
            a, b = self.u[:, :rank] * root, root[:, None] * self.vt[:rank]
            best = (a, b, False, self._error(a, b))
            if self.refit:
                a = self.inverse_root @ (self.du[:, :rank] * np.sqrt(self.ds[:rank]))
                b = refit_horizontal(a, self.weight, self.gram)  # type: ignore[arg-type]
                error = self._error(a, b)
                if error is not None and best[3] is not None and error < best[3]:
                    best = (a, b, True, error)
            self._fits[rank] = best
        return self._fits[rank]

    def error(self, rank: int) -> float:
        return self.fit(rank)[3] or 0.0


def conv_spatial(weight: np.ndarray, geometry: ConvGeometry, target: Target) -> Candidate:
    """k x k Conv as a (kh x 1) Conv C -> r and a (1 x kw) Conv r -> O."""
    out_ch, in_ch, kh, kw = weight.shape
    fit = SpatialFit(weight, target.gram, target.refit)
    if target.budget is not None and target.gram is not None:
        rank = smallest_rank(fit.error, fit.full, target.budget)
    else:
        rank = energy_rank(fit.s, target.energy)
    a, b, refit, error = fit.fit(rank)
    vertical = a.reshape(in_ch, kh, rank).transpose(2, 0, 1)[..., None]  # (r, C, kh, 1)
    horizontal = b.reshape(rank, out_ch, kw).transpose(1, 0, 2)[:, :, None, :]  # (O, r, 1, kw)
    ho, wo = geometry.out_hw
    stages = [
        Stage(vertical, conv_attributes(geometry, only_axis=0)),
        Stage(horizontal, conv_attributes(geometry, only_axis=1)),
    ]
    macs = conv_macs((1, rank, ho, geometry.in_hw[1]), vertical.shape)
    macs += conv_macs((1, out_ch, ho, wo), horizontal.shape)
    weight_error = relative_error(fit.matrix, a @ b)
    return Candidate("spatial", (rank,), (fit.full,), stages, macs, weight_error, error, refit)


Modes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _modes(weight: np.ndarray) -> Modes:
    """(U, S) of the output-mode and of the input-mode unfolding of a Conv weight."""
    out_ch, in_ch = weight.shape[:2]
    u_out, s_out, _ = np.linalg.svd(weight.reshape(out_ch, -1), full_matrices=False)
    unfolding = weight.transpose(1, 0, 2, 3).reshape(in_ch, -1)
    u_in, s_in, _ = np.linalg.svd(unfolding, full_matrices=False)
    return u_out, s_out, u_in, s_in


def _tucker2(
    weight: np.ndarray, geometry: ConvGeometry, energy: float, target: Target, modes: Modes
) -> Candidate:
    """The Tucker-2 candidate at one energy, from the mode SVDs."""
    out_ch, in_ch = weight.shape[:2]
    mode_energy = 1.0 - (1.0 - energy) / 2.0
    u_out, s_out, u_in, s_in = modes
    u_out = u_out[:, : energy_rank(s_out, mode_energy)]  # (O, r_out)
    u_in = u_in[:, : energy_rank(s_in, mode_energy)]  # (C, r_in)
    # core: (r_out, r_in, kh, kw)
    core = np.einsum("oikl,or,is->rskl", weight, u_out, u_in, optimize=True)
    r_out, r_in = core.shape[:2]
    approximation = np.einsum("rskl,or,is->oikl", core, u_out, u_in, optimize=True)
    ho, wo = geometry.out_hw
    stages = [
        Stage(u_in.T.reshape(r_in, in_ch, 1, 1), {}),
        Stage(core, conv_attributes(geometry)),
        Stage(u_out.reshape(out_ch, r_out, 1, 1), {}),
    ]
    macs = conv_macs((1, r_in, *geometry.in_hw), (r_in, in_ch, 1, 1))
    macs += conv_macs((1, r_out, ho, wo), core.shape)
    macs += conv_macs((1, out_ch, ho, wo), (out_ch, r_out, 1, 1))
    error = relative_error(weight, approximation)
    data_error = _output_error(kernel_form(weight), kernel_form(approximation), target)
    ranks, full = (r_in, r_out), (in_ch, out_ch)
    return Candidate("tucker2", ranks, full, stages, macs, error, data_error)


def conv_tucker2(weight: np.ndarray, geometry: ConvGeometry, target: Target) -> Candidate:
    """k x k Conv as 1x1 C -> r_in, k x k core r_in -> r_out, 1x1 r_out -> O.

    Each mode keeps 1 - (1 - energy) / 2 of its energy, so by the HOSVD error bound the
    squared error of both truncations together stays within 1 - energy. Under an output error
    budget the energy is the lowest of ``TUCKER_LADDER`` that meets it. The factors are
    weight-only (no refit).
    """
    modes = _modes(weight)
    if target.budget is None or target.gram is None:
        return _tucker2(weight, geometry, target.energy, target, modes)
    for energy in TUCKER_LADDER:
        candidate = _tucker2(weight, geometry, energy, target, modes)
        if (candidate.output_error or 0.0) <= target.budget + ERROR_SLACK:
            break
    return candidate


def matrix_svd(
    matrix: np.ndarray, rows: int, target: Target, transposed: bool, attributes: list[Attributes]
) -> Candidate:
    """x @ W as (x @ A) @ B for W (K x N); ``transposed`` stores A^T and B^T (Gemm transB=1)."""
    a, b, refit = svd_factors(matrix, target)
    rank = a.shape[1]
    weights = (a.T, b.T) if transposed else (a, b)
    stages = [Stage(w, attrs) for w, attrs in zip(weights, attributes, strict=True)]
    macs = matmul_macs((rows, matrix.shape[0]), a.shape) + matmul_macs((rows, rank), b.shape)
    approximation = a @ b
    return Candidate(
        "svd", (rank,), (min(matrix.shape),), stages, macs,
        relative_error(matrix, approximation), _output_error(matrix, approximation, target), refit,
    )  # fmt: skip


CONV_METHODS = {"spatial": conv_spatial, "tucker2": conv_tucker2}
