"""The linear algebra of low-rank factorization (float64): ranks by energy or by output
error on an input Gram matrix, truncated and data-aware (whitened) SVD factors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Slack on the energy threshold and the error budget, for float64 rounding of exact ranks.
ENERGY_SLACK = 1e-10
ERROR_SLACK = 1e-6
# Ridge of the data-aware factors, relative to the mean eigenvalue of the Gram matrix.
RIDGE = 1e-6


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


def energy_rank(singular: np.ndarray, energy: float) -> int:
    """The smallest r whose top-r squared singular values hold ``energy`` of the total."""
    power = np.square(np.asarray(singular, np.float64))
    cumulative = np.cumsum(power) / power.sum()
    rank = int(np.searchsorted(cumulative, energy - ENERGY_SLACK)) + 1
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
    ridge = RIDGE * max(float(np.trace(gram)) / len(gram), np.finfo(np.float64).tiny)
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
    slack = ENERGY_SLACK * max(float(tails[0]), 0.0)
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
        if error(middle) <= budget + ERROR_SLACK:
            high = middle
        else:
            low = middle + 1
    return low
