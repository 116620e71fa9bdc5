"""GPTQ weight rounding: patch Gram matrices and the rounding itself, against references."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.converter.quantize.weight_rounding import PatchGram, gptq_rows

RNG = np.random.default_rng(3)


def test_conv_patch_gram_matches_torch_unfold():
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=(2, 4, 7, 6)).astype(np.float32)
    gram = PatchGram(
        "conv",
        "conv",
        kernel=(3, 3),
        strides=(2, 1),
        pads=(1, 1, 1, 1),
        dilations=(1, 1),
        group=2,
        positions=10_000,
    )
    gram.update(x)
    # every output position is sampled (positions exceeds the grid): the Gram matrix is exact
    cols = torch.nn.functional.unfold(
        torch.from_numpy(x), kernel_size=3, padding=1, stride=(2, 1)
    ).numpy()  # (N, C*9, L)
    patches = cols.transpose(0, 2, 1).reshape(-1, 2, 2 * 9)  # (N*L, groups, C/G*9)
    expected = np.einsum("pgi,pgj->gij", patches, patches)
    np.testing.assert_allclose(gram.gram, expected, rtol=1e-5, atol=1e-4)
    assert gram.rows == patches.shape[0]


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
