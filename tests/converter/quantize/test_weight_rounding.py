"""GPTQ weight rounding: patch Gram matrices and the rounding itself, against references."""

from __future__ import annotations

import numpy as np

from onnxcomp.converter.quantize.weight_rounding import gptq_rows

RNG = np.random.default_rng(3)


def test_gptq_with_uncorrelated_inputs_is_plain_rounding():
    w = RNG.normal(size=(8, 20))
    scale = np.abs(w).max(axis=1) / 127
    q = gptq_rows(w, scale, np.eye(20), -128, 127)
    np.testing.assert_array_equal(q, np.clip(np.rint(w / scale[:, None]), -128, 127))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    mix = RNG.normal(size=(32, 32))
    x = RNG.normal(size=(4000, 32)) @ mix  # strongly correlated input features
    w = RNG.normal(size=(16, 32))
    scale = np.abs(w).max(axis=1) / 7  # a coarse grid, so rounding matters
    h = x.T @ x
    nearest = np.clip(np.rint(w / scale[:, None]), -8, 7)
    ours = gptq_rows(w, scale, h, -8, 7)
    assert np.all(np.abs(ours) <= 8)

    def output_error(q):
        return np.mean((x @ (w - q * scale[:, None]).T) ** 2)

    assert output_error(ours) < 0.7 * output_error(nearest)
