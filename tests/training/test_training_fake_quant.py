"""LSQ fake quantization against numpy round/clip maths and LSQ's gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.training.fake_quant import MAX_STEP_RATIO, FakeQuant, int_range  # noqa: E402

torch.set_num_threads(1)


def numpy_fake_quant(x, s, z, lo, hi):
    return (np.clip(np.round(x / s) + z, lo, hi) - z) * s


def lsq_grads(x, s, z, lo, hi, g):
    """LSQ (Esser et al. 2020, eq. 3) with an upstream gradient of ones."""
    v = x / s
    inside = (v + z >= lo) & (v + z <= hi)
    below = v + z < lo
    ds = np.where(inside, np.round(v) - v, np.where(below, lo - z, hi - z))
    return inside.astype(np.float64), ds * g


def test_per_tensor_forward_and_lsq_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, (4, 3, 5)).astype(np.float32)
    s, z, (lo, hi) = 0.05, 128, int_range(np.uint8, "t")
    quant = FakeQuant(np.float32(s), np.uint8(z), lo, hi)
    xt = torch.tensor(x, requires_grad=True)
    y = quant(xt)
    np.testing.assert_allclose(y.detach().numpy(), numpy_fake_quant(x, s, z, lo, hi), atol=1e-6)
    y.sum().backward()
    g = 1 / math.sqrt(x[0].size * hi)  # n = elements of one sample
    dx, ds = lsq_grads(x.astype(np.float64), s, z, lo, hi, g)
    np.testing.assert_array_equal(xt.grad.numpy(), dx)
    # the log-domain step at theta = 0: d L / d theta = s * d L / d s
    np.testing.assert_allclose(quant.log_scale.grad.numpy(), [s * ds.sum()], rtol=1e-4)
    assert (x / s + z > hi).any() and (x / s + z < lo).any()  # both clamps were exercised


def test_per_channel_weight_gradient_and_requantize():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (3, 2, 2)).astype(np.float32)
    s = np.array([0.01, 0.02, 0.5], np.float32)
    lo, hi = int_range(np.int8, "w")
    quant = FakeQuant(s, np.zeros(3, np.int8), lo, hi, axis=0, per_sample=False)
    wt = torch.tensor(w, requires_grad=True)
    quant(wt).sum().backward()
    g = 1 / math.sqrt(4 * hi)  # n = elements of one channel
    expected = np.stack(
        [lsq_grads(w[c].astype(np.float64), s[c], 0, lo, hi, g)[1].sum() for c in range(3)]
    )
    np.testing.assert_allclose(quant.log_scale.grad.numpy(), s * expected, rtol=1e-4)
    q = quant.quantize(w, np.int8)
    np.testing.assert_array_equal(q, np.clip(np.round(w / s[:, None, None]), lo, hi))
    assert quant.exported_scale().shape == (3,)


def test_scalar_scale_exports_as_scalar_and_stays_within_bounds():
    quant = FakeQuant(np.float32(0.1), np.int8(0), -128, 127)
    assert quant.exported_scale().shape == ()
    assert float(quant.exported_scale()) == pytest.approx(0.1)
    for theta, bound in ((-1e6, 1 / MAX_STEP_RATIO), (1e6, MAX_STEP_RATIO)):
        with torch.no_grad():
            quant.log_scale.fill_(theta)
        assert float(quant.exported_scale()) == pytest.approx(0.1 * bound, rel=1e-5)
    with torch.no_grad():
        quant.log_scale.fill_(math.log(2.0))  # near 0 the step is s0 * exp(theta)
    assert float(quant.exported_scale()) == pytest.approx(0.2, rel=0.02)


def test_relative_update_does_not_depend_on_the_step_size():
    """One SGD step moves a 1e-9 step and a 1e-2 step by the same factor when the data scale
    with them (a raw step moved the small one through zero)."""
    rng = np.random.default_rng(2)
    w = np.repeat(rng.normal(0, 1, (1, 16)).astype(np.float32), 2, axis=0)  # same data
    s = np.array([1e-9, 1e-2], np.float32)
    quant = FakeQuant(s, np.zeros(2, np.int8), -128, 127, axis=0, per_sample=False)
    target = torch.tensor(w * 40.0 * s[:, None] * 1.1)
    x = torch.tensor(w * 40.0 * s[:, None])
    opt = torch.optim.SGD(quant.parameters(), lr=0.01)
    loss = (((quant(x) - target) / torch.tensor(s[:, None])) ** 2).sum()
    loss.backward()
    opt.step()
    ratio = quant.exported_scale() / s
    assert ratio[0] != pytest.approx(1.0)
    np.testing.assert_allclose(ratio[0], ratio[1], rtol=1e-3)


def test_to_int_then_from_int_is_forward():
    x = torch.linspace(-3, 3, 50).reshape(2, 25)
    quant = FakeQuant(np.float32(0.03), np.uint8(100), 0, 255)
    torch.testing.assert_close(quant.from_int(quant.to_int(x)), quant(x))
    assert torch.equal(quant.to_int(x), torch.round(quant.to_int(x)))


def test_unsupported_integer_type():
    with pytest.raises(OnnxcompError, match="int8/uint8"):
        int_range(np.int64, "QuantizeLinear 'q'")
