"""Streaming histograms and calibrators against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxcomp.converter.quantize.calibrators import (
    KL_FLOOR,
    CalibrationSettings,
    TensorRange,
    calibrate_dfp,
    calibrate_entropy,
    calibrate_minmax,
    calibrate_mse,
    calibrate_percentile,
    entropy_threshold,
    kl_divergences,
    mse_threshold,
)
from onnxcomp.converter.quantize.table import CalibrationTable
from onnxcomp.errors import OnnxcompError
from onnxcomp.stats.histogram import TensorHistogram

RNG = np.random.default_rng(1)
ASYM = CalibrationSettings(symmetric=False)
SYM = CalibrationSettings(symmetric=True)


def slow_kl(hist: np.ndarray, levels: int = 128) -> np.ndarray:
    """TensorRT's KL search written out loop by loop (the reference)."""
    hist = np.asarray(hist, float)
    out = []
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        merged = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start = j * merged
            stop = i if j == levels - 1 else start + merged
            nonzero = [k for k in range(start, stop) if p[k] > 0]
            for k in nonzero:
                q[k] = hist[start:stop].sum() / len(nonzero)
        big_p, big_q = p / p.sum(), q / q.sum()
        kl = 0.0
        for k in range(i):
            if big_p[k] > 0:
                kl += big_p[k] * math.log(big_p[k] / (big_q[k] if big_q[k] > 0 else KL_FLOOR))
        out.append(kl)
    return np.array(out)


def streamed(values: np.ndarray, batches: int = 7, bins: int = 2048) -> TensorHistogram:
    h = TensorHistogram(bins)
    for part in np.array_split(values, batches):
        h.update(part)
    return h


@pytest.mark.parametrize(
    "hist",
    [
        np.histogram(np.abs(RNG.standard_t(3, 20000)), bins=300)[0],
        np.histogram(RNG.exponential(1.0, 5000), bins=256)[0],
        np.concatenate([np.histogram(RNG.normal(0, 1, 3000), bins=200)[0], np.zeros(50), [7]]),
    ],
)
def test_kl_matches_slow_reference(hist):
    fast, slow = kl_divergences(hist), slow_kl(hist)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
    width = 0.01
    without_zeros = np.array(hist, copy=True)
    without_zeros[0] = 0  # bin 0 (exact zeros) is left out of the search
    reference = slow_kl(without_zeros)
    expected = (np.argmin(reference) + 128.5) * width
    assert entropy_threshold(hist, width) == pytest.approx(expected)


def test_entropy_clips_a_heavy_tail_but_not_a_uniform():
    tail = np.abs(RNG.standard_t(2, 200_000)).astype(np.float32)
    h = streamed(tail)
    r = calibrate_entropy(h, ASYM)
    assert 0 < r.high < 0.5 * tail.max()
    uniform = RNG.uniform(0, 1, 200_000).astype(np.float32)
    r = calibrate_entropy(streamed(uniform), ASYM)
    assert r.high > 0.9


def test_streaming_histogram_equals_one_shot_histogram():
    values = np.concatenate([RNG.normal(0, 1, 10000), RNG.normal(0, 8, 1000)]).astype(np.float32)
    RNG.shuffle(values)
    h = streamed(values, batches=25)
    assert h.count == values.size
    assert h.min == values.min() and h.max == values.max()
    assert h.width * h.bins >= np.abs(values).max() > h.width * h.bins / 2
    index = np.minimum((np.abs(values) / h.width).astype(np.int64), h.bins - 1)
    ref_pos = np.bincount(index[values >= 0], minlength=h.bins)
    ref_neg = np.bincount(index[values < 0], minlength=h.bins)
    assert np.abs(h.positive - ref_pos).sum() <= 2  # float rounding at bin edges only
    assert np.abs(h.negative - ref_neg).sum() <= 2
    assert h.positive.shape == (2048,)  # memory does not grow with the data


def test_minmax_and_symmetric():
    values = RNG.normal(1, 2, 1000).astype(np.float32)
    h = streamed(values)
    assert calibrate_minmax(h, ASYM) == TensorRange(min(values.min(), 0), values.max())
    m = np.abs(values).max()
    assert calibrate_minmax(h, SYM) == TensorRange(-m, m)


def test_percentile_matches_numpy():
    values = RNG.normal(0, 1, 100_000).astype(np.float32)
    h = streamed(values)
    r = calibrate_percentile(h, CalibrationSettings(symmetric=True, percentile=99.0))
    assert abs(r.high - np.percentile(np.abs(values), 99.0)) <= h.width
    pos = calibrate_percentile(h, CalibrationSettings(percentile=99.0))
    assert abs(pos.high - np.percentile(values[values >= 0], 99.0)) <= h.width
    assert abs(-pos.low - np.percentile(-values[values < 0], 99.0)) <= h.width


def brute_force_mse(values: np.ndarray, thresholds: np.ndarray, steps: int) -> np.ndarray:
    errors = []
    for t in thresholds:
        step = t / steps
        q = np.clip(np.round(values / step), 0, steps) * step
        errors.append(np.mean((values - q) ** 2))
    return np.array(errors)


def test_mse_threshold_is_near_the_brute_force_optimum():
    values = np.abs(RNG.laplace(0, 1, 50_000)).astype(np.float32)
    h = streamed(values, bins=512)
    t = mse_threshold(h.positive, h.width, 255)
    grid = np.linspace(values.max() / 50, values.max(), 200)
    errors = brute_force_mse(values, grid, 255)
    best = grid[np.argmin(errors)]
    ours = brute_force_mse(values, np.array([t]), 255)[0]
    assert ours <= errors.min() * 1.05
    assert abs(t - best) < 0.25 * best
    r = calibrate_mse(h, ASYM)
    assert r.low == 0.0 and r.high == pytest.approx(t)


def test_dfp_power_of_two_steps():
    h = streamed(np.array([-3.2, 1.0, 2.5], np.float32))
    r = calibrate_dfp(h, ASYM)  # integer length 2, signed: 5 fractional bits
    assert r == TensorRange(-128 / 32, 127 / 32)
    h = streamed(np.array([0.0, 3.2], np.float32))
    r = calibrate_dfp(h, ASYM)  # unsigned: 6 fractional bits
    assert r == TensorRange(0.0, 255 / 64)


@pytest.mark.parametrize(
    "method",
    [calibrate_minmax, calibrate_entropy, calibrate_mse, calibrate_percentile, calibrate_dfp],
)
@pytest.mark.parametrize("value", [0.0, 5.0, -2.0])
def test_constant_tensors_give_finite_ranges(method, value):
    h = streamed(np.full(1000, value, np.float32))
    for settings in (ASYM, SYM):
        r = method(h, settings)
        assert math.isfinite(r.low) and math.isfinite(r.high)
        assert r.low <= 0.0 <= r.high
        if value > 0:
            assert r.high > 0


def test_table_round_trip_and_mismatch(tmp_path):
    table = CalibrationTable("entropy", {"a": TensorRange(-1.0, 2.0), "b": TensorRange(0, 3)}, 8)
    path = tmp_path / "t.json"
    table.save(path)
    loaded = CalibrationTable.load(path)
    assert loaded.ranges == table.ranges and loaded.method == "entropy"
    with pytest.raises(OnnxcompError, match="no range for c, d"):
        loaded.require(["a", "c", "d"], str(path))
    path.write_text("{}")
    with pytest.raises(OnnxcompError, match="not an onnxcomp calibration table"):
        CalibrationTable.load(path)
