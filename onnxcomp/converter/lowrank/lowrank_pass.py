"""Low-rank factorization of Gemm, MatMul and Conv weights (``--lowrank``).

A layer with weight W is replaced by a chain of two or three cheaper layers of the same op type
whose weights multiply back to a truncated approximation of W:

* Gemm / MatMul with a constant 2-D weight, and 1x1 Conv: truncated SVD, W ~ A B with
  A = U_r sqrt(S_r) and B = sqrt(S_r) V_r^T, so y = (x A) B.
* k x k Conv, spatial SVD (Jaderberg et al. 2014, "Speeding up Convolutional Neural Networks
  with Low Rank Expansions", scheme 2): W (O, C, kh, kw) seen as the matrix
  M[(c, i), (o, j)] = W[o, c, i, j] of shape (C kh, O kw); its truncated SVD gives a (kh x 1)
  conv C -> r followed by a (1 x kw) conv r -> O.
* k x k Conv, Tucker-2 (Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for
  Fast and Low Power Mobile Applications"): HOSVD on the output (0) and input (1) modes,
  W ~ core x_0 U_out x_1 U_in, as a 1x1 conv C -> r_in, the k x k core r_in -> r_out and a
  1x1 conv r_out -> O.

By default the ranks come from the energy of the singular values (the fraction of ||W||_F^2
kept), so the relative weight error ||W - W_r||_F / ||W||_F of an SVD is at most
sqrt(1 - rank_energy). That bound is the error budget every method must meet.

With calibration data, one pass over it collects each layer's input Gram matrix G (the
layer's matrix form M, D x N, maps an input row p to p M: the input features of Gemm/MatMul,
the im2col patches (c, i, j) of a Conv, sampled at random positions per image). Then:

* ``output_error``: each method takes the smallest rank whose relative output error
  sqrt(tr(dM^T G dM) / tr(M^T G M)) is within the budget (SVD: exact, from
  sum_{i>r} s_i^2 u_i^T G u_i; spatial SVD: bisection on the rank; Tucker-2: a ladder of
  energies).
* ``refit``: data-aware factors. SVD: the truncated SVD of G^{1/2} M, multiplied back by
  G^{-1/2} (optimal for the output error, as in whitening-based SVD compression); spatial SVD:
  the first factor from the same with the Gram of the (c, i) features, the second refitted by
  least squares on G. Tucker-2 stays weight-only.
* ``measure_latency``: each chosen chain and the original layer are timed as tiny models in
  ONNX Runtime (batch 1); the chain is kept only if it is faster by ``latency_margin``.

Arithmetic is float64, cast back to the weight's dtype. MACs are counted per sample: symbolic
dims (the batch) count as 1.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.core.analysis import format_count
from onnxcomp.core.macs import conv_macs, gemm_macs, matmul_macs

METHODS = ("svd", "spatial", "tucker2")
# Slack on the energy threshold and the error budget, for float64 rounding of exact ranks.
_ENERGY_SLACK = 1e-10
_ERROR_SLACK = 1e-6
# Ridge of the data-aware factors, relative to the mean eigenvalue of the Gram matrix.
_RIDGE = 1e-6
# Mode energies tried by Tucker-2 under an output error budget, lowest first.
_TUCKER_LADDER = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)

TARGET_OPS = frozenset({"Gemm", "MatMul", "Conv"})
Attributes = dict[str, Any]


@dataclass(frozen=True)
class LowRankConfig:
    """Settings of the low-rank pass.

    ``rank_energy``: fraction of the weight's squared singular values to keep, in (0, 1].
    ``min_macs_saving``: the fraction of a layer's MACs a factorization must save (a negative
    value lets MACs grow, which only makes sense for tests). ``methods``: which of
    ``svd`` (Gemm, MatMul, 1x1 Conv), ``spatial`` and ``tucker2`` (k x k Conv) may be used.
    ``exclude``: node names (shell patterns, ``fnmatch``) to leave alone.

    Data-driven (need ``PassContext.calibration``; without it the ranks come from
    ``rank_energy`` and the record says so): ``output_error``, the largest relative output
    error per layer, in (0, 1), which then replaces ``rank_energy``; ``refit``, data-aware
    factors; ``patches_per_image``, Conv input patches sampled per image for the statistics;
    ``max_gram_features``, the largest Gram matrix side (C kh kw of a Conv) collected.

    ``measure_latency``: time each factorization against its layer in ONNX Runtime (batch 1,
    median of ``latency_runs``) and keep it only if it takes at most 1 - ``latency_margin`` of
    the layer's time.
    """

    rank_energy: float = 0.9
    min_macs_saving: float = 0.1
    methods: tuple[str, ...] = METHODS
    exclude: tuple[str, ...] = ()
    output_error: float | None = None
    refit: bool = False
    patches_per_image: int = 128
    max_gram_features: int = 4608
    measure_latency: bool = False
    latency_margin: float = 0.05
    latency_runs: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rank_energy <= 1.0:
            raise ValueError(f"rank_energy must be in (0, 1], got {self.rank_energy}")
        if self.min_macs_saving >= 1.0:
            raise ValueError(f"min_macs_saving must be below 1, got {self.min_macs_saving}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        if self.output_error is not None and not 0.0 < self.output_error < 1.0:
            raise ValueError(f"output_error must be in (0, 1), got {self.output_error}")
        if self.patches_per_image < 1 or self.max_gram_features < 1 or self.latency_runs < 1:
            raise ValueError("patches_per_image, max_gram_features and latency_runs must be >= 1")
        if not 0.0 <= self.latency_margin < 1.0:
            raise ValueError(f"latency_margin must be in [0, 1), got {self.latency_margin}")

    @property
    def error_budget(self) -> float:
        """The largest relative weight error allowed: sqrt(1 - rank_energy)."""
        return math.sqrt(1.0 - self.rank_energy)

    @property
    def needs_data(self) -> bool:
        """Whether the pass wants input statistics from calibration data."""
        return self.output_error is not None or self.refit


@dataclass(frozen=True)
class Target:
    """How to pick the ranks and fit the factors of one layer.

    ``gram``: the input Gram matrix of the layer's matrix form (None: weight-only);
    ``budget``: the relative output error allowed (None: ranks from ``energy``);
    ``refit``: data-aware factors.
    """

    energy: float
    gram: np.ndarray | None = None
    budget: float | None = None
    refit: bool = False


@dataclass
class Stage:
    """One layer of a factorized chain: its weight (float64) and attributes."""

    weight: np.ndarray
    attributes: Attributes = field(default_factory=dict)


def _ranks(ranks: tuple[int, ...]) -> str:
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
        return f"{noun} {_ranks(self.ranks)} of {_ranks(self.full_ranks)}"


@dataclass
class LayerFactorization:
    """What the pass did to one layer, for the record and for callers.

    ``basis`` says how the ranks were chosen; ``latency_ratio`` is the measured time of the
    chain over the layer's (None: not measured).
    """

    node: str
    op_type: str
    method: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    error: float
    full_ranks: tuple[int, ...] = ()
    output_error: float | None = None
    refit: bool = False
    basis: str = ""
    latency_ratio: float | None = None

    def describe(self) -> str:
        ranks = _ranks(self.ranks)
        if self.full_ranks:
            ranks = f"{_ranks(self.full_ranks)} -> {ranks}"
        change = self.macs_after / self.macs_before - 1.0
        text = (
            f"{self.op_type} '{self.node}': {self.method}, rank {ranks}"
            f"{f' ({self.basis})' if self.basis else ''}, MACs "
            f"{format_count(self.macs_before)} -> {format_count(self.macs_after)} "
            f"({change:+.0%}), weight error {self.error:.4f}"
        )
        if self.output_error is not None:
            text += f", output error {self.output_error:.4f}"
        if self.refit:
            text += ", refit on data"
        if self.latency_ratio is not None:
            text += f", latency x{self.latency_ratio:.2f}"
        return text


# ---------------------------------------------------------------------------------------------
# Linear algebra (float64)


def energy_rank(singular: np.ndarray, energy: float) -> int:
    """The smallest r whose top-r squared singular values hold ``energy`` of the total."""
    power = np.square(np.asarray(singular, np.float64))
    cumulative = np.cumsum(power) / power.sum()
    rank = int(np.searchsorted(cumulative, energy - _ENERGY_SLACK)) + 1
    return min(rank, len(power))


def relative_error(weight: np.ndarray, approximation: np.ndarray) -> float:
    """||W - W_r||_F / ||W||_F."""
    return float(np.linalg.norm(weight - approximation) / np.linalg.norm(weight))


def truncated_svd(matrix: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A B ~ matrix: A = U_r sqrt(S_r) (m x r), B = sqrt(S_r) V_r^T (r x n)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    rank = energy_rank(s, energy)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def output_error(matrix: np.ndarray, approximation: np.ndarray, gram: np.ndarray) -> float:
    """sqrt(tr(dM^T G dM) / tr(M^T G M)): the relative error of p M on inputs with Gram G."""
    delta = matrix - approximation
    total = float(np.sum(matrix * (gram @ matrix)))
    if total <= 0.0:
        return 0.0
    return math.sqrt(max(float(np.sum(delta * (gram @ delta))), 0.0) / total)


def gram_roots(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(G_l^{1/2}, G_l^{-1/2}, l) for G_l = G + l I, l a small ridge relative to tr(G) / D."""
    ridge = _RIDGE * max(float(np.trace(gram)) / len(gram), np.finfo(np.float64).tiny)
    values, vectors = np.linalg.eigh(gram + ridge * np.eye(len(gram)))
    root = np.sqrt(np.maximum(values, ridge))
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T, ridge


def output_rank(u: np.ndarray, s: np.ndarray, gram: np.ndarray, budget: float) -> int:
    """The smallest r whose truncated SVD M_r = U_r S_r V_r^T has output error <= budget.

    With orthonormal V, tr(dM^T G dM) = sum_{i>=r} s_i^2 u_i^T G u_i, one term per direction.
    """
    terms = np.square(s) * np.einsum("ki,ki->i", u, gram @ u)
    return _smallest_tail(terms, budget**2 * terms.sum())


def _smallest_tail(terms: np.ndarray, allowed: float) -> int:
    """The smallest r >= 1 with sum(terms[r:]) <= allowed (float64 slack included)."""
    tails = np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])
    slack = _ENERGY_SLACK * max(float(tails[0]), 0.0)
    fits = np.flatnonzero(tails[1:] <= allowed + slack)
    return int(fits[0]) + 1 if len(fits) else len(terms)


def svd_factors(matrix: np.ndarray, target: Target) -> tuple[np.ndarray, np.ndarray, bool]:
    """(A, B, refit) with A B ~ matrix (D x N), ranks and factors as ``target`` asks.

    Without a Gram matrix: ``truncated_svd``. With one and ``refit``: the truncated SVD of
    G^{1/2} M (G ridged), A = G^{-1/2} U_r sqrt(S_r); its rank under a budget is the smallest
    whose ridged tail sum_{i>=r} s_i^2 fits budget^2 tr(M^T G M), an upper bound of the true
    error (G <= G + l I). With a Gram matrix, no refit: the plain SVD at ``output_rank``.
    """
    gram = target.gram
    if gram is None:
        a, b = truncated_svd(matrix, target.energy)
        return a, b, False
    if not target.refit:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        if target.budget is None:
            rank = energy_rank(s, target.energy)
        else:
            rank = output_rank(u, s, gram, target.budget)
        root = np.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank], False
    root_g, inverse_root_g, _ = gram_roots(gram)
    u, s, vt = np.linalg.svd(root_g @ matrix, full_matrices=False)
    if target.budget is None:
        rank = energy_rank(np.linalg.svd(matrix, compute_uv=False), target.energy)
    else:
        total = float(np.sum(matrix * (gram @ matrix)))
        rank = _smallest_tail(np.square(s), target.budget**2 * total)
    root = np.sqrt(s[:rank])
    return inverse_root_g @ (u[:, :rank] * root), root[:, None] * vt[:rank], True


def smallest_rank(error: Callable[[int], float], full: int, budget: float) -> int:
    """The smallest rank in [1, full] with error(rank) <= budget, by bisection (the error is
    taken as non-increasing in the rank, which truncations nearly always are); ``full`` when
    none fits."""
    low, high = 1, full
    while low < high:
        middle = (low + high) // 2
        if error(middle) <= budget + _ERROR_SLACK:
            high = middle
        else:
            low = middle + 1
    return low


# ---------------------------------------------------------------------------------------------
# Conv geometry


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D Conv's explicit geometry: (height, width) pairs, pads as (top, left, bottom, right)."""

    in_hw: tuple[int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    def out_size(self, axis: int) -> int:
        extent = self.dilations[axis] * (self.kernel[axis] - 1) + 1
        padded = self.in_hw[axis] + self.pads[axis] + self.pads[axis + 2]
        return (padded - extent) // self.strides[axis] + 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.out_size(0), self.out_size(1)


def _ints(node: ir.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(attr.as_ints()) if attr is not None else tuple(default)


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """(begin, end) pads of auto_pad SAME_UPPER / SAME_LOWER on one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def conv_geometry(node: ir.Node, kernel: tuple[int, int]) -> ConvGeometry | str:
    """The explicit geometry of a 2-D Conv, or why it cannot be known."""
    shape = node.inputs[0].shape
    if shape is None or shape.rank() != 4 or not (shape.is_static(2) and shape.is_static(3)):
        return "its input height and width are not known (fix the input dims)"
    in_hw = (int(shape[2]), int(shape[3]))
    strides = _ints(node, "strides", (1, 1))
    dilations = _ints(node, "dilations", (1, 1))
    auto_pad = node.attributes.get("auto_pad")
    mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        (t, b), (left, r) = (
            _same_pads(in_hw[a], kernel[a], strides[a], dilations[a], mode == "SAME_UPPER")
            for a in (0, 1)
        )
        pads = (t, left, b, r)
    elif mode == "VALID":
        pads = (0, 0, 0, 0)
    else:
        pads = _ints(node, "pads", (0, 0, 0, 0))
    return ConvGeometry(in_hw, kernel, strides[:2], dilations[:2], pads[:4])  # type: ignore[arg-type]


def _conv_attributes(geometry: ConvGeometry, only_axis: int | None = None) -> Attributes:
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


# ---------------------------------------------------------------------------------------------
# Candidates per method


def _output_error(matrix: np.ndarray, approximation: np.ndarray, target: Target) -> float | None:
    return None if target.gram is None else output_error(matrix, approximation, target.gram)


def _kernel_form(weight: np.ndarray) -> np.ndarray:
    """A Conv weight (O, C, kh, kw) in matrix form: (C kh kw, O), rows in im2col order."""
    return weight.reshape(weight.shape[0], -1).T


def conv_svd(weight: np.ndarray, geometry: ConvGeometry, target: Target) -> Candidate:
    """1x1 Conv as two 1x1 Convs; the whole geometry goes on the first (it has no bias)."""
    out_ch, in_ch = weight.shape[:2]
    matrix = _kernel_form(weight)  # (C, O)
    a, b, refit = svd_factors(matrix, target)  # a (C x r), b (r x O)
    rank = a.shape[1]
    ho, wo = geometry.out_hw
    stages = [
        Stage(a.T.reshape(rank, in_ch, 1, 1), _conv_attributes(geometry)),
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
    ridge = _RIDGE * max(float(np.trace(h)) / len(h), np.finfo(np.float64).tiny)
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
        return _kernel_form(kernel)

    def _error(self, a: np.ndarray, b: np.ndarray) -> float | None:
        if self.gram is None:
            return None
        return output_error(_kernel_form(self.weight), self.kernel_form(a, b), self.gram)

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
        Stage(vertical, _conv_attributes(geometry, only_axis=0)),
        Stage(horizontal, _conv_attributes(geometry, only_axis=1)),
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
        Stage(core, _conv_attributes(geometry)),
        Stage(u_out.reshape(out_ch, r_out, 1, 1), {}),
    ]
    macs = conv_macs((1, r_in, *geometry.in_hw), (r_in, in_ch, 1, 1))
    macs += conv_macs((1, r_out, ho, wo), core.shape)
    macs += conv_macs((1, out_ch, ho, wo), (out_ch, r_out, 1, 1))
    error = relative_error(weight, approximation)
    data_error = _output_error(_kernel_form(weight), _kernel_form(approximation), target)
    ranks, full = (r_in, r_out), (in_ch, out_ch)
    return Candidate("tucker2", ranks, full, stages, macs, error, data_error)


def conv_tucker2(weight: np.ndarray, geometry: ConvGeometry, target: Target) -> Candidate:
    """k x k Conv as 1x1 C -> r_in, k x k core r_in -> r_out, 1x1 r_out -> O.

    Each mode keeps 1 - (1 - energy) / 2 of its energy, so by the HOSVD error bound the
    squared error of both truncations together stays within 1 - energy. Under an output error
    budget the energy is the lowest of ``_TUCKER_LADDER`` that meets it. The factors are
    weight-only (no refit).
    """
    modes = _modes(weight)
    if target.budget is None or target.gram is None:
        return _tucker2(weight, geometry, target.energy, target, modes)
    for energy in _TUCKER_LADDER:
        candidate = _tucker2(weight, geometry, energy, target, modes)
        if (candidate.output_error or 0.0) <= target.budget + _ERROR_SLACK:
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


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass
class MatrixForm:
    """A Gemm or MatMul as y = x M (+ C): M is K x N, ``rows`` the rows of x per sample.

    ``stored_transposed``: the weight is M^T (Gemm transB=1); ``input_transposed``: x is
    given as x^T (Gemm transA=1). ``attributes``: those of the two layers of the chain.
    """

    matrix: np.ndarray
    rows: int
    stored_transposed: bool
    input_transposed: bool
    attributes: list[Attributes]
    macs: int


@dataclass
class Layer:
    """A layer that may be factorized: its node, weight, current MACs and what the candidates
    need (the matrix form of a Gemm/MatMul or the geometry of a Conv, the input Gram)."""

    node: ir.Node
    name: str
    weight: ir.Value
    array: np.ndarray
    macs: int
    input_dims: list[int] | None
    form: MatrixForm | None = None
    geometry: ConvGeometry | None = None
    methods: tuple[str, ...] = ("svd",)
    target: Target = field(default_factory=lambda: Target(1.0))
    basis: str = ""
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def features(self) -> int:
        """The side of the layer's input Gram matrix (K, or C kh kw of a Conv)."""
        if self.form is not None:
            return self.form.matrix.shape[0]
        return math.prod(self.array.shape[1:])

    @property
    def label(self) -> str:
        return f"{self.node.op_type} '{self.name}'"


def _static_product(shape: ir.Shape | None, dims: slice) -> int:
    """The product of the known dims of ``shape`` in ``dims``; symbolic or unknown count as 1."""
    if shape is None:
        return 1
    return math.prod(int(d) if isinstance(d, int) else 1 for d in list(shape)[dims])


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _weight_problem(node: ir.Node, label: str) -> str | None:
    """Why the node's weight (input 1) cannot be factorized, or None."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or weight.is_graph_input():
        return f"the weight of {label} is not a constant initializer"
    users = len(weight.uses())
    if users > 1:
        return f"the weight '{weight.name}' of {label} is shared by {users} uses"
    if not np.issubdtype(weight.const_value.dtype.numpy(), np.floating):
        return f"the weight of {label} is not floating point"
    return None


def matrix_form(node: ir.Node, weight: np.ndarray) -> MatrixForm:
    """The matrix form of a Gemm or MatMul and its MACs.

    Gemm becomes Gemm(x, A) then Gemm(h, B, C) with alpha and beta on the second; MatMul
    becomes MatMul(MatMul(x, A), B).
    """
    shape = node.inputs[0].shape
    if node.op_type == "MatMul":
        rows = _static_product(shape, slice(None, -1))
        macs = matmul_macs((rows, weight.shape[0]), weight.shape)
        return MatrixForm(weight, rows, False, False, [{}, {}], macs)
    trans_a, trans_b = _attr_int(node, "transA", 0), _attr_int(node, "transB", 0)
    rows = _static_product(shape, slice(1, 2) if trans_a else slice(0, 1))
    first: Attributes = {"transA": trans_a, "transB": trans_b}
    second: Attributes = {"transB": trans_b}
    for name in ("alpha", "beta"):
        if name in node.attributes:
            second[name] = node.attributes[name].as_float()
    matrix = weight.T if trans_b else weight
    macs = gemm_macs((rows, matrix.shape[0]), weight.shape, False, bool(trans_b))
    return MatrixForm(matrix, rows, bool(trans_b), bool(trans_a), [first, second], macs)


def _input_dims(value: ir.Value | None) -> list[int] | None:
    """The dims of a layer's input with symbolic ones (the batch) set to 1, or None."""
    shape = value.shape if value is not None else None
    if shape is None:
        return None
    return [int(d) if isinstance(d, int) else 1 for d in shape]


# ---------------------------------------------------------------------------------------------
# Input statistics (observers of one pass over the calibration data)


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


class PatchGram:
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
        g = self.geometry
        top, left, bottom, right = g.pads
        for start in range(0, len(values), self.chunk):
            images = np.asarray(values[start : start + self.chunk], np.float64)
            padded = np.pad(images, ((0, 0), (0, 0), (top, bottom), (left, right)))
            patches = self._patches(padded)
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


def patches_at(
    padded: np.ndarray, geometry: ConvGeometry, image: np.ndarray, flat: np.ndarray
) -> np.ndarray:
    """im2col rows (samples, C kh kw) of a padded (N, C, H, W) batch at the output positions
    ``flat`` (row-major over the output) of the images ``image``."""
    g = geometry
    oy, ox = np.divmod(flat, g.out_hw[1])
    kh, kw = g.kernel
    rows = oy[:, None] * g.strides[0] + np.arange(kh) * g.dilations[0]
    cols = ox[:, None] * g.strides[1] + np.arange(kw) * g.dilations[1]
    channels = np.arange(padded.shape[1])
    patch = padded[
        image[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (samples, C, kh, kw)
    return patch.reshape(len(flat), -1)


# ---------------------------------------------------------------------------------------------
# Latency of a layer against its chain


Timer = Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]


def ort_timer(session_config: Any = None, runs: int = 200, warmup: int = 10) -> Timer:
    """A timer: the median seconds of one ONNX Runtime run of a model on its feeds."""

    def measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        from onnxcomp.backends.ort import SessionConfig, create_session

        session = create_session(model.SerializeToString(), session_config or SessionConfig())
        for _ in range(warmup):
            session.run(None, feeds)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return measure


def chain_model(
    layer: Layer, stages: list[Stage] | None, opset: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-input model of the layer (``stages`` None) or of its chain, batch 1, and feeds.

    Nodes are named like in the compressed model: the layer's name, or ``name.lowrank{i}``.
    """
    node = layer.node
    dtype = layer.weight.const_value.dtype  # type: ignore[union-attr]
    x_type = node.inputs[0].type if node.inputs[0] is not None else None
    x_dtype = x_type.dtype if x_type is not None else dtype
    dims = layer.input_dims or []
    x = ir.Value(name="x", type=ir.TensorType(x_dtype), shape=ir.Shape(dims))
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = bias_value.const_value if bias_value is not None else None
    if stages is None:
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        layers = [(layer.weight.const_value.numpy(), attributes, layer.name)]  # type: ignore[union-attr]
    else:
        names = [f"{layer.name}.lowrank{i}" for i in range(len(stages))]
        layers = [
            (stage.weight.astype(dtype.numpy()), stage.attributes, name)
            for stage, name in zip(stages, names, strict=True)
        ]
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="latency")
    current = x
    for i, (array, attributes, name) in enumerate(layers):
        tensor = ir.tensor(array)
        weight = ir.Value(
            name=f"w{i}", type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor
        )
        graph.register_initializer(weight)
        inputs = [current, weight]
        if i == len(layers) - 1 and bias is not None:
            bias_input = ir.Value(
                name="bias", type=ir.TensorType(bias.dtype), shape=bias.shape, const_value=bias
            )
            graph.register_initializer(bias_input)
            inputs.append(bias_input)
        new = ir.node(node.op_type, inputs, attributes, name=name, num_outputs=1)
        new.outputs[0].name = f"y{i}"
        graph.append(new)
        current = new.outputs[0]
    graph.outputs.append(current)
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=dims).astype(x_dtype.numpy())}
    return proto, feeds


# ---------------------------------------------------------------------------------------------
# Graph edits


def _value_names(graph: ir.Graph) -> set[str]:
    """Every value and node name in use in the graph, to keep new names unique."""
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in graph:
        if node.name:
            names.add(node.name)
        names.update(v.name for v in node.outputs if v.name)
    return names


def _unique(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is free; the name is then taken."""
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def _replace(graph: ir.Graph, layer: Layer, chosen: Candidate, names: set[str]) -> None:
    """Put the candidate's chain in place of the layer; drop the old weight if now unused."""
    node = layer.node
    dtype = layer.weight.const_value.dtype.numpy()  # type: ignore[union-attr]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    current = node.inputs[0]
    new_nodes: list[ir.Node] = []
    for i, stage in enumerate(chosen.stages):
        prefix = f"{layer.name}.lowrank{i}"
        tensor = ir.tensor(stage.weight.astype(dtype))
        weight = ir.Value(
            name=_unique(names, f"{prefix}.weight"),
            type=ir.TensorType(tensor.dtype),
            shape=tensor.shape,
            const_value=tensor,
        )
        graph.register_initializer(weight)
        last = i == len(chosen.stages) - 1
        inputs = [current, weight, *([bias] if last and bias is not None else [])]
        new = ir.node(
            node.op_type, inputs, stage.attributes, name=_unique(names, prefix), num_outputs=1
        )
        new.outputs[0].name = _unique(names, f"{prefix}.out")
        new.outputs[0].type = node.outputs[0].type
        current = new.outputs[0]
        new_nodes.append(new)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], new_nodes, [node.outputs[0]], [current]
    )
    old = layer.weight
    if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
        graph.initializers.pop(old.name)


CONV_METHODS = {"spatial": conv_spatial, "tucker2": conv_tucker2}


def _candidates(layer: Layer) -> list[Candidate]:
    """Every enabled way to factorize the layer, with ranks and factors per its target."""
    target = layer.target
    if layer.form is not None:
        form = layer.form
        return [matrix_svd(form.matrix, form.rows, target, form.stored_transposed, form.attributes)]
    geometry = layer.geometry
    assert geometry is not None
    if geometry.kernel == (1, 1):
        return [conv_svd(layer.array, geometry, target)]
    return [CONV_METHODS[m](layer.array, geometry, target) for m in layer.methods]


class LowRankPass(CompressionPass):
    """Replace Gemm, MatMul and Conv layers by low-rank chains where that saves MACs.

    Rules:

    1. Gemm (transA/transB 0 or 1, alpha and beta kept on the second Gemm) and MatMul with a
       constant 2-D weight at input 1: truncated SVD, (x A) B, weights stored in the original
       layout (transB=1 stores A^T and B^T); the bias C stays on the second Gemm.
    2. 2-D Conv with group 1: a k x k kernel (either side > 1) tries spatial SVD (vertical
       strides/pads/dilations on the (kh x 1) conv, horizontal ones on the (1 x kw) conv) and
       Tucker-2 (the whole geometry on the core); a 1x1 kernel gets SVD as two 1x1 convs. The
       bias goes on the last conv; auto_pad becomes explicit pads.
    3. Ranks: the smallest rank whose squared singular values hold ``rank_energy`` of the
       total (Tucker-2: 1 - (1 - rank_energy) / 2 per mode). A candidate whose relative weight
       error exceeds sqrt(1 - rank_energy) is dropped; of the rest the one with the fewest MACs
       is kept, and only if it saves at least ``min_macs_saving`` of the layer's MACs.
    4. With ``output_error`` or ``refit`` and calibration data: one pass over the data, before
       any change, collects every layer's input Gram matrix. ``output_error`` replaces rule 3's
       budget: ranks are the smallest whose relative output error fits it. ``refit`` uses
       data-aware factors (SVD and spatial SVD). Layers whose Gram would be larger than
       ``max_gram_features`` and all layers when there is no data keep rule 3; the record says
       so.
    5. With ``measure_latency`` a chosen chain is timed against its layer (``timer``) and kept
       only if its time is at most 1 - ``latency_margin`` of the layer's.
    6. Never factorized, with the reason in ``record.skipped``: grouped and depthwise convs,
       non-2-D convs, weights that are not constant initializers, not floating point, all
       zero, or shared by several uses; Convs whose input height and width are unknown;
       excluded names; layers where no enabled method applies, none saves enough MACs, or the
       chain was not faster.
    7. Only the main graph is visited. New initializers get unique names and new nodes the
       original node's name as a prefix; the graph is topologically sorted at the end.
    """

    name = "lowrank"
    lossless = False
    min_opset = 11  # the first Gemm of a factorized pair has no C input

    def __init__(
        self,
        config: LowRankConfig | None = None,
        context: PassContext | None = None,
        timer: Timer | None = None,
    ) -> None:
        super().__init__(context)
        self.config = config or LowRankConfig()
        self.timer = timer
        self.layers: list[LayerFactorization] = []

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.layers = []
        graph = model.graph
        targets = [n for n in graph if n.op_type in TARGET_OPS and n.domain in ("", "ai.onnx")]
        if not targets:
            record.summary = "no Gemm, MatMul or Conv in the graph"
            return
        ir_passes.ShapeInferencePass()(model)
        names = _value_names(graph)
        layers: list[Layer] = []
        for index, node in enumerate(list(graph)):
            if node.op_type not in TARGET_OPS or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or f"{node.op_type}_{index}"
            layer, problem = self._layer(node, name)
            if layer is None:
                record.skipped.append(Skipped(name, problem or "not factorized"))
                continue
            layers.append(layer)
        note = self._statistics(model, layers)
        opset = model.opset_imports.get("", 17)
        for layer in layers:
            layer.candidates = _candidates(layer)
            layer.target = dataclasses.replace(layer.target, gram=None)  # free its memory
            chosen, problem = self._choose(layer)
            ratio = None
            if chosen is not None and self.config.measure_latency:
                ratio, problem = self._latency(layer, chosen, opset)
                if problem:
                    chosen = None
            if chosen is None:
                record.skipped.append(Skipped(layer.name, problem or "not factorized"))
                continue
            _replace(graph, layer, chosen, names)
            done = LayerFactorization(
                layer.name, layer.node.op_type, chosen.method, chosen.ranks, layer.macs,
                chosen.macs, chosen.error, chosen.full_ranks, chosen.output_error, chosen.refit,
                layer.basis, ratio,
            )  # fmt: skip
            self.layers.append(done)
            unmeasured = self.config.measure_latency and ratio is None
            latency = ", latency not measured (input shape unknown)" if unmeasured else ""
            record.changes.append(done.describe() + latency)
        ir_passes.TopologicalSortPass()(model)
        record.summary = self._summary(len(targets)) + note

    def _layer(self, node: ir.Node, name: str) -> tuple[Layer | None, str | None]:
        """The layer (candidates not yet built), or why it is left alone."""
        label = f"{node.op_type} '{name}'"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.exclude):
            return None, f"{label} is excluded"
        problem = _weight_problem(node, label)
        if problem:
            return None, problem
        weight = node.inputs[1]
        array = np.asarray(weight.const_value.numpy(), np.float64)  # type: ignore[union-attr]
        if not np.any(array):
            return None, f"the weight of {label} is all zeros"
        dims = _input_dims(node.inputs[0])
        if node.op_type == "Conv":
            return self._conv_layer(node, name, label, weight, array)
        if array.ndim != 2:
            return None, f"the weight of {label} is not 2-D"
        if "svd" not in self.config.methods:
            return None, f"{label} needs method 'svd', which is not enabled"
        form = matrix_form(node, array)
        return Layer(node, name, weight, array, form.macs, dims, form=form), None  # type: ignore[arg-type]

    def _conv_layer(
        self, node: ir.Node, name: str, label: str, weight: ir.Value, array: np.ndarray
    ) -> tuple[Layer | None, str | None]:
        group = _attr_int(node, "group", 1)
        if group != 1:
            kind = "depthwise" if array.ndim > 1 and array.shape[1] == 1 else "grouped"
            return None, f"{label} is a {kind} convolution (group={group})"
        if array.ndim != 4:
            return None, f"{label} is not a 2-D convolution"
        kernel = (array.shape[2], array.shape[3])
        geometry = conv_geometry(node, kernel)
        if isinstance(geometry, str):
            return None, f"{label}: {geometry}"
        ho, wo = geometry.out_hw
        macs = conv_macs((1, array.shape[0], ho, wo), array.shape)
        if kernel == (1, 1):
            if "svd" not in self.config.methods:
                return None, f"{label} (1x1) needs method 'svd', which is not enabled"
            methods: tuple[str, ...] = ("svd",)
        else:
            methods = tuple(m for m in self.config.methods if m in CONV_METHODS)
            if not methods:
                return None, f"{label} needs method 'spatial' or 'tucker2', neither is enabled"
        dims = _input_dims(node.inputs[0])
        layer = Layer(node, name, weight, array, macs, dims, geometry=geometry, methods=methods)
        return layer, None

    def _statistics(self, model: ir.Model, layers: list[Layer]) -> str:
        """Set each layer's target; with data, its input Gram from one pass over the data.

        Returns a note for the summary when data-driven ranks were asked for but not given.
        """
        config = self.config
        energy = Target(config.rank_energy)
        for layer in layers:
            layer.target = energy
        if not config.needs_data or not layers:
            return ""
        fallback = f"by energy {config.rank_energy:.2f}"
        if self.context.calibration is None:
            for layer in layers:
                layer.basis = f"{fallback}: no calibration data"
            return f"; no calibration data: ranks from rank_energy {config.rank_energy}, no refit"
        observers: dict[str, list[Any]] = {}
        grams: list[tuple[Layer, InputGram | PatchGram]] = []
        for i, layer in enumerate(layers):
            source = layer.node.inputs[0]
            if layer.features > config.max_gram_features or source is None or not source.name:
                layer.basis = f"{fallback}: {layer.features} input features, no statistics"
                continue
            if layer.geometry is not None:
                channels = layer.array.shape[1]
                seed = config.seed + i
                observer: InputGram | PatchGram = PatchGram(
                    layer.geometry, channels, config.patches_per_image, seed
                )
            else:
                observer = InputGram(layer.features, layer.form.input_transposed)  # type: ignore[union-attr]
            observers.setdefault(source.name, []).append(observer)
            grams.append((layer, observer))
        if grams:
            self._collect(model, observers)
        for layer, observer in grams:
            if observer.rows == 0:
                layer.basis = f"{fallback}: no input rows seen"
                continue
            budget = config.output_error
            layer.target = Target(config.rank_energy, observer.gram, budget, config.refit)
            layer.basis = f"by output error <= {budget:g}" if budget is not None else fallback
            if observer.rows < layer.features:  # the Gram is singular: the fit may overfit
                layer.basis += f", only {observer.rows} input rows for {layer.features} features"
        return ""

    def _collect(self, model: ir.Model, observers: dict[str, list[Any]]) -> None:
        """One pass over the calibration data, feeding every observer."""
        from onnxcomp.core.inputs import input_specs
        from onnxcomp.data.batches import sample_batches
        from onnxcomp.stats.collector import collect_statistics

        context = self.context
        batches, description, count = sample_batches(
            input_specs(ir.to_proto(model)), context.calibration
        )
        context.task(f"low-rank statistics on {description}", count)
        collect_statistics(
            model, [], batches, context.session, on_batch=context.advance, observers=observers
        )

    def _within(self, layer: Layer, candidate: Candidate) -> bool:
        """Whether a candidate meets the layer's error budget.

        Output budget: its output error. Ranks from the energy with data-aware factors: yes
        (they do better on the data than the truncation that met the energy). Else: its
        weight error within sqrt(1 - rank_energy).
        """
        budget = layer.target.budget
        if budget is not None and candidate.output_error is not None:
            return candidate.output_error <= budget + _ERROR_SLACK
        if candidate.refit:
            return True
        return candidate.error <= self.config.error_budget + _ERROR_SLACK

    def _choose(self, layer: Layer) -> tuple[Candidate | None, str | None]:
        """The candidate with the fewest MACs within the error budget, if it saves enough."""
        within = [c for c in layer.candidates if self._within(layer, c)]
        if not within and layer.target.budget is not None:
            worst = ", ".join(f"{c.method} {c.output_error or 0.0:.4f}" for c in layer.candidates)
            budget = layer.target.budget
            return None, f"{layer.label}: output error over the budget {budget:g} ({worst})"
        if not within:
            worst = ", ".join(f"{c.method} {c.error:.4f}" for c in layer.candidates)
            budget = self.config.error_budget + _ERROR_SLACK
            return None, f"{layer.label}: weight error over the budget {budget:.4f} ({worst})"
        best = min(within, key=lambda c: c.macs)
        kept = best.macs / layer.macs
        if 1.0 - kept < self.config.min_macs_saving:
            return None, (
                f"{best.method} {best.rank_text()} would keep {kept:.0%} of the MACs "
                f"(a saving of at least {self.config.min_macs_saving:.0%} is needed)"
            )
        return best, None

    def _latency(
        self, layer: Layer, chosen: Candidate, opset: int
    ) -> tuple[float | None, str | None]:
        """The measured time ratio chain / layer, and why the chain is refused (or None)."""
        if layer.input_dims is None:
            return None, None
        timer = self.timer or ort_timer(self.context.session, self.config.latency_runs)
        original, feeds = chain_model(layer, None, opset)
        chain, _ = chain_model(layer, chosen.stages, opset)
        before, after = timer(original, feeds), timer(chain, feeds)
        ratio = after / before if before > 0 else math.inf
        limit = 1.0 - self.config.latency_margin
        if ratio > limit:
            return ratio, (
                f"{chosen.method} {chosen.rank_text()} runs in x{ratio:.2f} the time of "
                f"{layer.label} (at most x{limit:.2f} is needed)"
            )
        return ratio, None

    def _summary(self, total: int) -> str:
        if not self.layers:
            return f"no layer factorized ({total} considered)"
        before = sum(layer.macs_before for layer in self.layers)
        after = sum(layer.macs_after for layer in self.layers)
        return (
            f"factorized {len(self.layers)} of {total} layer(s): their MACs "
            f"{format_count(before)} -> {format_count(after)}"
        )
