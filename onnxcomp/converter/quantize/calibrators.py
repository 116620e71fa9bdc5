"""Calibrators: from a tensor's streamed histogram to the range [low, high] to quantize.

All of them read a :class:`TensorHistogram` (so the data is run once, whatever the method)
and return a :class:`TensorRange`. Signed tensors are handled explicitly: each side of zero
has its own magnitude histogram; a symmetric range uses both together, an asymmetric range
picks each side's threshold on its own histogram.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxcomp.stats.histogram import TensorHistogram

KL_LEVELS = 128  # TensorRT / caffe-int8: the distribution is quantized to 128 levels
KL_FLOOR = 1e-12  # Q where P > 0 but the quantized distribution is empty (normalised units)


@dataclass(frozen=True)
class TensorRange:
    """The real interval a tensor is quantized over (always contains 0)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"range [{self.low}, {self.high}] is not finite")

    def to_list(self) -> list[float]:
        return [float(self.low), float(self.high)]


def _with_zero(low: float, high: float) -> TensorRange:
    return TensorRange(min(low, 0.0), max(high, 0.0))


# --- KL divergence (entropy) -----------------------------------------------------------------


def kl_divergences(hist: np.ndarray, levels: int = KL_LEVELS) -> np.ndarray:
    """KL(P || Q) for every candidate ``i`` (bins kept) from ``levels`` to ``len(hist)``.

    TensorRT's entropy calibration: P is the histogram clipped to its first ``i`` bins with
    the outlier mass folded into the last kept bin; Q is the clipped histogram (without the
    outliers) merged into ``levels`` chunks (``i // levels`` bins each, the remainder going to
    the last chunk) and expanded back by spreading each chunk's count evenly over the bins
    where P is non-zero. Computed in closed form per chunk, vectorised over candidates.
    Returns an array indexed by ``i - levels``.
    """
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    if n < levels:
        return np.zeros(0)
    total = h.sum()
    if total <= 0:
        return np.zeros(n - levels + 1)
    cand = np.arange(levels, n + 1)  # bins kept
    csum = np.concatenate([[0.0], np.cumsum(h)])
    cnz = np.concatenate([[0], np.cumsum(h > 0)])
    hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    chlogh = np.concatenate([[0.0], np.cumsum(hlogh)])

    outliers = total - csum[cand]  # mass beyond the kept bins
    last = h[cand - 1]
    p_last = last + outliers
    # sum over kept bins of p log p (the last bin carries the outliers)
    plogp = chlogh[cand - 1] + np.where(p_last > 0, p_last * np.log(np.maximum(p_last, 1e-300)), 0)

    width = cand // levels
    j = np.arange(levels)
    starts = j[None, :] * width[:, None]
    stops = np.where(j[None, :] == levels - 1, cand[:, None], starts + width[:, None])
    chunk_h = csum[stops] - csum[starts]  # S_j: counts quantized into chunk j
    chunk_nz = (cnz[stops] - cnz[starts]).astype(np.float64)
    # the last kept bin is non-zero in P when outliers land in it, even if h is zero there
    chunk_nz[:, -1] += (last == 0) & (outliers > 0)
    chunk_p = chunk_h.copy()
    chunk_p[:, -1] += outliers  # A_j: P's mass in chunk j

    kept = csum[cand]  # sum of Q before normalisation
    with np.errstate(divide="ignore", invalid="ignore"):
        q_norm = np.where(chunk_nz > 0, chunk_h / chunk_nz, 0.0) / kept[:, None]
        log_q = np.log(np.where(q_norm > 0, q_norm, KL_FLOOR))
    cross = np.sum(np.where(chunk_p > 0, chunk_p * log_q, 0.0), axis=1)
    # KL = sum P_k log P_k - sum P_k log Q_k with P_k = p_k / total
    return (plogp / total - math.log(total)) - cross / total


def entropy_threshold(hist: np.ndarray, width: float, levels: int = KL_LEVELS) -> float:
    """The threshold with the least KL divergence: (i + 0.5) x bin width.

    Bin 0 is left out of the distributions, as caffe-int8-convert-tools does: it holds the
    exact zeros a ReLU produces, a spike that would otherwise drive the search towards
    thresholds far too small.
    """
    hist = np.array(hist, copy=True)
    hist[0] = 0
    nonzero = np.flatnonzero(hist)
    if nonzero.size == 0:
        return 0.0
    used = hist[: max(nonzero[-1] + 1, levels)]
    if used.size <= levels:
        return float(used.size * width)
    divergences = kl_divergences(used, levels)
    best = int(np.argmin(divergences)) + levels
    return float(min(best + 0.5, used.size) * width)


# --- MSE -------------------------------------------------------------------------------------


def _clip_error(hist: np.ndarray, width: float, steps: int) -> np.ndarray:
    """Expected squared error for each threshold t_i = (i + 1) x width, i < len(hist).

    Values below t: uniform rounding noise (t / steps)^2 / 12 each; values above t: clipped
    to t, error (c - t)^2 at their bin centre c.
    """
    h = np.asarray(hist, dtype=np.float64)
    centers = (np.arange(h.size) + 0.5) * width
    thresholds = (np.arange(h.size) + 1) * width
    inside = np.cumsum(h)
    # suffix sums over bins beyond threshold i (bins i+1 ..)
    s0 = np.concatenate([np.cumsum(h[::-1])[::-1][1:], [0.0]])
    s1 = np.concatenate([np.cumsum((h * centers)[::-1])[::-1][1:], [0.0]])
    s2 = np.concatenate([np.cumsum((h * centers**2)[::-1])[::-1][1:], [0.0]])
    clipped = s2 - 2 * thresholds * s1 + thresholds**2 * s0
    rounding = inside * (thresholds / steps) ** 2 / 12.0
    return rounding + clipped


def mse_threshold(hist: np.ndarray, width: float, steps: int) -> float:
    """Threshold minimising the expected quantization error with ``steps`` steps in [0, t]."""
    hist = np.asarray(hist)
    if not hist.any():
        return 0.0
    return float((int(np.argmin(_clip_error(hist, width, steps))) + 1) * width)


# --- percentile ------------------------------------------------------------------------------


def percentile_threshold(hist: np.ndarray, width: float, percentile: float) -> float:
    """Smallest bin edge below which ``percentile`` % of the counted magnitudes lie."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    index = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12))
    return float(min(index + 1, hist.size) * width)


# --- the calibrators -------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSettings:
    """What the range is for: a symmetric int8 range or an asymmetric uint8 one."""

    symmetric: bool = False
    percentile: float = 99.99
    bits: int = 8


Calibrator = Callable[[TensorHistogram, CalibrationSettings], TensorRange]


def calibrate_minmax(h: TensorHistogram, s: CalibrationSettings) -> TensorRange:
    if h.count == 0:
        return TensorRange(0.0, 0.0)
    if s.symmetric:
        return TensorRange(-h.max_abs, h.max_abs)
    return _with_zero(h.min, h.max)


def _per_side(
    h: TensorHistogram, s: CalibrationSettings, threshold: Callable[[np.ndarray, int], float]
) -> TensorRange:
    """Apply a threshold rule to |x| (symmetric) or to each side of zero (asymmetric).

    ``threshold(hist, levels)`` gets the number of quantization levels the side has.
    """
    if h.count == 0:
        return TensorRange(0.0, 0.0)
    levels = 2 ** (s.bits - 1)
    if s.symmetric:
        t = threshold(h.magnitudes(), levels)
        return TensorRange(-t, t)
    has_neg, has_pos = h.negative.any(), h.positive.any()
    if has_neg and has_pos:
        # each side gets its share of the 2^bits levels
        return TensorRange(-threshold(h.negative, levels), threshold(h.positive, levels))
    if has_pos:
        return TensorRange(0.0, min(threshold(h.positive, 2 * levels), max(h.max, 0.0)))
    return TensorRange(max(-threshold(h.negative, 2 * levels), min(h.min, 0.0)), 0.0)


def calibrate_entropy(h: TensorHistogram, s: CalibrationSettings) -> TensorRange:
    return _per_side(h, s, lambda hist, _levels: entropy_threshold(hist, h.width, KL_LEVELS))


def calibrate_mse(h: TensorHistogram, s: CalibrationSettings) -> TensorRange:
    return _per_side(h, s, lambda hist, levels: mse_threshold(hist, h.width, levels - 1))


def calibrate_percentile(h: TensorHistogram, s: CalibrationSettings) -> TensorRange:
    return _per_side(h, s, lambda hist, _: percentile_threshold(hist, h.width, s.percentile))


def calibrate_dfp(h: TensorHistogram, s: CalibrationSettings) -> TensorRange:
    """Ristretto's dynamic fixed point: a power-of-two step from the integer length.

    The integer length is ceil(log2(max |x|)); with ``bits`` bits (one for the sign when the
    tensor has negative values) the fractional length is what is left, and the step 2^-fl.
    """
    if h.count == 0 or h.max_abs == 0:
        return TensorRange(0.0, 0.0)
    integer_length = math.ceil(math.log2(h.max_abs))
    signed = s.symmetric or h.min < 0
    fractional_length = (s.bits - 1 if signed else s.bits) - integer_length
    step = 2.0**-fractional_length
    if signed:
        return TensorRange(-(2 ** (s.bits - 1)) * step, (2 ** (s.bits - 1) - 1) * step)
    return TensorRange(0.0, (2**s.bits - 1) * step)


CALIBRATORS: dict[str, Calibrator] = {
    "minmax": calibrate_minmax,
    "percentile": calibrate_percentile,
    "entropy": calibrate_entropy,
    "mse": calibrate_mse,
    "dfp": calibrate_dfp,
}
