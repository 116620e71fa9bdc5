"""Learned int8 weight rounding: AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding
for Post-Training Quantization"), layer by layer on the QDQ graph.

The per-channel int8 grid ONNX Runtime's placement chose is kept (as GPTQ does in
``weight_rounding.py``): each weight only chooses between floor(W/s) and floor(W/s) + 1. The
choice is relaxed to a soft rounding h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
(zeta = 1.1, gamma = -0.1), V starting where the soft weight equals the float weight, and
learned with Adam on

    ||W x - W~(V) x||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

over the layer's inputs x, beta annealed from 20 to 2 after a warm-up without the
regulariser; then h >= 0.5 rounds up.

The reconstruction term is a quadratic form of the weight error, so the layer's input Gram
matrix H = sum x x^T (per conv group, over im2col patches) is an exact summary of all its
input rows: it is the same :class:`GroupedPatchGram` GPTQ collects in the calibration pass
(16 seeded output positions per image, every calibration image; memory one K x K matrix per
group, K = C/G kh kw, whatever the number of images), and an iteration costs one batched
(O x K) @ (K x K) product instead of a pass over sampled rows. The loss is measured in grid
steps with H divided by its mean diagonal, so lambda means the same on every layer.

torch (the ``torch`` extra) runs the small per-layer optimisations; it is imported only here.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1
TORCH_INSTALL = "pip install 'onnxcomp[torch]'"


@dataclass(frozen=True)
class AdaRoundSettings:
    """The optimisation budget of each layer. With the defaults a 64 x 576 layer costs about
    9 ms of one core per step: calibration + conversion took 86 s for ResNet-20 and 349 s for
    ResNet-56 on a busy 2-core machine (GPTQ: 10 s and 38 s)."""

    iterations: int = 1000
    warmup: float = 0.2  # the first fraction of iterations: reconstruction only
    regularization: float = 3.0  # lambda, per weight, against H over its mean diagonal
    beta: tuple[float, float] = (20.0, 2.0)
    learning_rate: float = 0.01


def torch_missing() -> bool:
    """Whether torch cannot be imported (checked without importing it)."""
    if "torch" in sys.modules:
        return sys.modules["torch"] is None
    return importlib.util.find_spec("torch") is None


def missing_torch_problem() -> str | None:
    """The one-line refusal of ``--weight-rounding adaround`` without torch, or None."""
    if torch_missing():
        return f"--weight-rounding adaround needs torch: {TORCH_INSTALL}"
    return None


def soft_rounding(v):
    """h(V): the rectified sigmoid, in [0, 1] (works on numpy arrays and torch tensors)."""
    sig = 1 / (1 + np.exp(-v)) if isinstance(v, np.ndarray) else v.sigmoid()
    return (sig * (ZETA - GAMMA) + GAMMA).clip(0, 1)


def _initial_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = rest (the soft weight starts at the float weight)."""
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _normalized(grams: np.ndarray) -> np.ndarray:
    """Each group's Gram matrix over its mean diagonal (an all-zero group stays zero)."""
    scale = np.einsum("gii->g", grams) / grams.shape[-1]
    return grams / np.where(scale > 0, scale, 1.0)[:, None, None]


def adaround_rows(
    rows: np.ndarray,
    scale: np.ndarray,
    grams: np.ndarray,
    qmin: int,
    qmax: int,
    settings: AdaRoundSettings | None = None,
) -> np.ndarray:
    """Integer values (O x K, as floats) of ``rows`` on the grid ``scale`` (one step per row),
    each floor(W/s) or floor(W/s) + 1, learned with AdaRound on the inputs whose Gram matrices
    are ``grams`` (G x K x K, one per group of O / G consecutive rows)."""
    import torch  # the torch extra; refused at config time when missing

    threads = torch.get_num_threads()
    # One thread: the matrices are small, and torch's OpenMP threads spin against ONNX
    # Runtime's and other processes' (a 64 x 576 step: 8.6 ms of CPU on one, 118 ms on two
    # threads of a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        return _optimise(torch, rows, scale, grams, qmin, qmax, settings or AdaRoundSettings())
    finally:
        torch.set_num_threads(threads)


def _optimise(torch, rows, scale, grams, qmin, qmax, settings: AdaRoundSettings) -> np.ndarray:
    """The Adam loop of :func:`adaround_rows`."""
    steps = np.where(scale > 0, scale, 1.0).astype(np.float64)
    x = rows.astype(np.float64) / steps[:, None]
    base = np.floor(x)
    up_only, down_only = base < qmin, base + 1 > qmax  # outside the grid: one way only
    rest = x - base
    groups, k = grams.shape[0], grams.shape[-1]
    shape = (groups, rows.shape[0] // groups, k)
    h_grams = torch.from_numpy(_normalized(grams).astype(np.float32))
    target = torch.from_numpy(rest.reshape(shape).astype(np.float32))
    v = torch.nn.Parameter(torch.from_numpy(_initial_v(rest).reshape(shape).astype(np.float32)))
    optimizer = torch.optim.Adam([v], lr=settings.learning_rate)
    warmup = int(settings.warmup * settings.iterations)
    high, low = settings.beta
    for step in range(settings.iterations):
        optimizer.zero_grad()
        h = soft_rounding(v)
        error = target - h
        loss = (torch.bmm(error, h_grams) * error).sum()
        if step >= warmup:
            progress = (step - warmup) / max(settings.iterations - warmup - 1, 1)
            beta = high + (low - high) * progress
            regular = (1 - (2 * h - 1).abs().pow(beta)).sum()
            loss = loss + settings.regularization * regular
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        up = (soft_rounding(v) >= 0.5).numpy().reshape(rows.shape)
    up = np.where(up_only, True, np.where(down_only, False, up))
    return np.clip(base + up, qmin, qmax)


def adaround_rounder(settings: AdaRoundSettings | None = None):
    """A ``weight_rounding.Rounder`` running :func:`adaround_rows` with ``settings``."""

    def rounder(rows, scale, grams, qmin, qmax):
        return adaround_rows(rows, scale, grams, qmin, qmax, settings)

    return rounder
