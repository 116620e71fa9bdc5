"""Conv geometry and im2col patches against ONNX Runtime's own convolution."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

from onnxcomp.core.geometry import conv_geometry, patches_at

RNG = np.random.default_rng(5)


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"strides": [2, 2], "pads": [0, 1, 1, 0]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER"},
        {"auto_pad": "VALID", "strides": [1, 2]},
    ],
)
def test_patches_times_weights_is_the_convolution(attrs):
    """Every output of ORT's Conv equals the im2col row at that position times the weights."""
    x = RNG.normal(size=(2, 3, 7, 6)).astype(np.float32)
    w = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], **attrs)
    model = make_model([conv], [("x", list(x.shape))], ["y"], [tensor("w", w)])
    (expected,) = run(model, {"x": x})
    node = next(iter(ir.from_proto(model).graph))
    geometry = conv_geometry(node, w.shape[2:])
    assert not isinstance(geometry, str)
    assert geometry.out_hw == expected.shape[2:]
    positions = np.arange(geometry.out_hw[0] * geometry.out_hw[1])
    padded = geometry.pad(x)
    for image in range(x.shape[0]):
        rows = patches_at(padded, geometry, np.full(len(positions), image), positions)
        got = rows.astype(np.float64) @ w.reshape(4, -1).T.astype(np.float64)
        np.testing.assert_allclose(got.T.reshape(expected[image].shape), expected[image], atol=1e-4)


def test_unknown_input_size_is_a_reason():
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])
    w = RNG.normal(size=(2, 1, 3, 3)).astype(np.float32)
    model = make_model([conv], [("x", ["N", 1, "H", "W"])], ["y"], [tensor("w", w)])
    node = next(iter(ir.from_proto(model).graph))
    assert "height and width" in conv_geometry(node, (3, 3))
