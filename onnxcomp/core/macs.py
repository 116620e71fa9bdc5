"""Multiply-accumulate counts of the weighted layers, from shapes."""

from __future__ import annotations

import math

import numpy as np


def conv_macs(output_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """N * Cout * prod(out spatial) * (Cin/group) * prod(kernel); W is [Cout, Cin/group, k...]."""
    return math.prod(output_shape) * math.prod(weight_shape[1:])


def conv_transpose_macs(input_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """N * Cin * prod(in spatial) * (Cout/group) * prod(kernel); W is [Cin, Cout/group, k...]."""
    return math.prod(input_shape) * math.prod(weight_shape[1:])


def gemm_macs(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], trans_a: bool, trans_b: bool
) -> int:
    """M * N * K for Gemm, with A [M,K] (or [K,M] if transA) and B [K,N] (or [N,K])."""
    m, k = (a_shape[1], a_shape[0]) if trans_a else (a_shape[0], a_shape[1])
    n = b_shape[0] if trans_b else b_shape[1]
    return m * n * k


def matmul_macs(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """Broadcast batch * M * N * K, with numpy matmul rules for 1-D operands."""
    a = (1, *a_shape) if len(a_shape) == 1 else a_shape
    b = (*b_shape, 1) if len(b_shape) == 1 else b_shape
    batch = tuple(int(d) for d in np.broadcast_shapes(a[:-2], b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]
