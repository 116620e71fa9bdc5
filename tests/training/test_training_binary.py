"""BinaryWeight against hand maths (forward, clipped STE, alpha's gradient), the importer on a
binarized model (same outputs as ORT), the export of signs and alphas, and latent weights
started from the float teacher."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from int8_models import small_cnn

torch = pytest.importorskip("torch")

from onnxcomp.converter.binarize import BinarizeConfig, BinarizePass  # noqa: E402
from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.training.fake_quant import BinaryWeight, init_latent_from  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402


def test_forward_and_gradient_match_hand_maths():
    w = torch.tensor([[0.5, -0.25, 1.5, 0.0], [-2.0, 0.1, -0.3, 0.2]], requires_grad=True)
    out = BinaryWeight("w", axis=0)(w)
    alpha = np.array([(0.5 + 0.25 + 1.5 + 0.0) / 4, (2.0 + 0.1 + 0.3 + 0.2) / 4])
    signs = np.array([[1, -1, 1, 1], [-1, 1, -1, 1]], np.float64)
    np.testing.assert_allclose(out.detach().numpy(), alpha[:, None] * signs, rtol=1e-6)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 1.0]])
    out.backward(g)
    gn, wn = g.numpy().astype(np.float64), w.detach().numpy().astype(np.float64)
    inside = (np.abs(wn) <= 1).astype(np.float64)
    # d/dw_i: g_i alpha 1{|w_i| <= 1} + sign(w_i) / n * sum_j g_j sign(w_j)   (sign(0) -> 0
    # in d|w|/dw, as torch's abs)
    through_alpha = np.sign(wn) / 4 * (gn * signs).sum(axis=1, keepdims=True)
    expected = gn * alpha[:, None] * inside + through_alpha
    np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-6)


def binarized(seed: int = 0) -> tuple[ir.Model, ir.Model]:
    """(the binarized small CNN, its float original)."""
    model = ir.from_proto(small_cnn(seed))
    BinarizePass(BinarizeConfig(first_last=True))(model)
    return model, ir.from_proto(small_cnn(seed))


def ort_run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_import_runs_like_ort_and_export_round_trips():
    model, _ = binarized()
    module = import_onnx(model)
    binary = [q for q in module.quants.values() if isinstance(q, BinaryWeight)]
    assert sorted(q.name for q in binary) == ["w1", "w2", "wf"]
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    out = module(torch.from_numpy(x))[0].detach().numpy()
    np.testing.assert_allclose(out, ort_run(model, x), rtol=1e-4, atol=1e-5)
    exported = module.export_onnx()
    for name in ("w1", "w2", "wf"):
        for suffix in ("", "_alpha"):
            before = model.graph.initializers[name + suffix].const_value.numpy()
            after = exported.graph.initializers[name + suffix].const_value.numpy()
            assert after.dtype == before.dtype
            np.testing.assert_allclose(after, before, rtol=1e-6)
    np.testing.assert_allclose(ort_run(exported, x), ort_run(model, x), rtol=1e-5, atol=1e-6)


def test_training_moves_latent_weights_and_export_writes_new_signs_and_alphas():
    model, _ = binarized()
    module = import_onnx(model)
    latent = module.onnx_parameters()["w2"]
    with torch.no_grad():
        latent[0].neg_()  # flip channel 0's signs, double channel 1's magnitudes
        latent[1].mul_(2.0)
    exported = module.export_onnx()
    signs = exported.graph.initializers["w2"].const_value.numpy()
    alpha = exported.graph.initializers["w2_alpha"].const_value.numpy()
    original = model.graph.initializers["w2"].const_value.numpy()
    original_alpha = model.graph.initializers["w2_alpha"].const_value.numpy()
    np.testing.assert_array_equal(signs[0], -original[0])
    np.testing.assert_allclose(alpha[1], 2 * original_alpha[1], rtol=1e-6)
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = module(torch.from_numpy(x))[0].detach().numpy()
    np.testing.assert_allclose(out, ort_run(exported, x), rtol=1e-4, atol=1e-5)


def test_latent_weights_start_from_the_float_teacher():
    model, teacher = binarized()
    module = import_onnx(model)
    assert sorted(init_latent_from(module, teacher)) == ["w1", "w2", "wf"]
    w2 = teacher.graph.initializers["w2"].const_value.numpy()
    alpha = model.graph.initializers["w2_alpha"].const_value.numpy()
    scale = alpha / np.abs(w2).reshape(8, -1).mean(axis=1)
    latent = module.onnx_parameters()["w2"].detach().numpy()
    np.testing.assert_allclose(latent, w2 * scale[:, None, None, None], rtol=1e-5)
    _, other = binarized(seed=3)
    with pytest.raises(OnnxcompError, match="other signs"):
        init_latent_from(import_onnx(model), other)
