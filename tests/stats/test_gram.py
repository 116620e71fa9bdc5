"""The Gram-matrix observers against direct im2col references."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.stats.gram import GroupedPatchGram

RNG = np.random.default_rng(3)


def test_conv_patch_gram_matches_torch_unfold():
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=(2, 4, 7, 6)).astype(np.float32)
    gram = GroupedPatchGram(
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
