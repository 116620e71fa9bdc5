"""Analytical bias correction on a small model quantized with place_qdq (per-tensor weights)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import make_model, tensor
from onnx import helper, numpy_helper

from onnxcomp.converter.quantize.bias_correction import (
    bias_correction_inputs,
    correct_bias,
    float_weights,
)
from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.converter.quantize.qdq import QdqSettings, place_qdq, tensors_to_calibrate

SHAPE = (4, 9, 9)


def small_model(trans_b: int = 1) -> onnx.ModelProto:
    """Conv (bias) -> Relu -> depthwise Conv (no bias) -> Relu -> GAP -> Flatten -> Gemm."""
    gen = np.random.default_rng(3)
    spread = 10.0 ** gen.uniform(-1.5, 0.5, 8)  # channels of very different ranges
    gemm_w = gen.normal(size=(5, 8)).astype(np.float32)
    inits = [
        tensor("c.w", (gen.normal(size=(8, 4, 3, 3)) * spread[:, None, None, None]).astype("f4")),
        tensor("c.b", gen.normal(size=8).astype(np.float32)),
        tensor("d.w", (gen.normal(0.2, 1, size=(8, 1, 3, 3)) / spread[:, None, None, None])),
        tensor("g.w", gemm_w if trans_b else gemm_w.T.copy()),
        tensor("g.b", gen.normal(size=5).astype(np.float32)),
    ]
    inits[2] = tensor("d.w", numpy_helper.to_array(inits[2]).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["y1"], name="c", pads=[1] * 4),
        helper.make_node("Relu", ["y1"], ["a1"], name="r1"),
        helper.make_node("Conv", ["a1", "d.w"], ["y2"], name="d", group=8, pads=[1] * 4),
        helper.make_node("Relu", ["y2"], ["a2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g.w", "g.b"], ["y"], name="g", transB=trans_b),
    ]
    return make_model(nodes, [("x", [1, *SHAPE])], ["y"], inits)


def inputs(n: int, seed: int) -> np.ndarray:
    """Non-zero-mean inputs: the case where E[dW x] = dW E[x] is not zero."""
    return np.random.default_rng(seed).normal(1.5, 1.0, size=(n, *SHAPE)).astype(np.float32)


def run_all(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Named tensors of the model over ``x``, one sample at a time (the model has batch 1)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [session.run(names, {"x": x[i : i + 1]}) for i in range(len(x))]
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def quantize(model: onnx.ModelProto, calib: np.ndarray) -> onnx.ModelProto:
    """place_qdq with per-tensor weights and plain min/max ranges from ``calib``."""
    names = tensors_to_calibrate(model)
    values = run_all(model, names, calib)
    ranges = {
        n: TensorRange(min(float(v.min()), 0.0), max(float(v.max()), 0.0))
        for n, v in values.items()
    }
    return place_qdq(model, ranges, QdqSettings(per_channel=False))


def channel_means(model: onnx.ModelProto, calib: np.ndarray) -> dict[str, np.ndarray]:
    names = bias_correction_inputs(model)
    values = run_all(model, names, calib)
    return {n: v.mean(axis=tuple(i for i in range(v.ndim) if i != 1)) for n, v in values.items()}


def mean_output_error(qdq: onnx.ModelProto, model: onnx.ModelProto, x: np.ndarray) -> float:
    """|E[y_int8 - y_float]| averaged over the outputs: the bias the correction removes."""
    err = run_all(qdq, ["y"], x)["y"] - run_all(model, ["y"], x)["y"]
    return float(np.abs(err.mean(axis=0)).mean())


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_inputs_named_are_the_layers_float_inputs():
    assert bias_correction_inputs(small_model()) == ["x", "a1", "f"]


@pytest.mark.parametrize("trans_b", [1, 0], ids=["transB1", "transB0"])
def test_correction_reduces_the_mean_output_error(trans_b):
    model = small_model(trans_b)
    calib = inputs(64, seed=1)
    qdq = quantize(model, calib)
    test = inputs(128, seed=2)
    before = mean_output_error(qdq, model, test)
    changes = correct_bias(qdq, float_weights(model), channel_means(model, calib))
    onnx.checker.check_model(qdq)
    after = mean_output_error(qdq, model, test)
    assert len(changes) == 3, changes
    assert after < 0.5 * before, (before, after)


def test_conv_bias_equals_numpy_and_missing_bias_is_created():
    model = small_model()
    calib = inputs(64, seed=1)
    qdq = quantize(model, calib)
    means = channel_means(model, calib)
    old = inits(qdq)
    skipped: list = []
    changes = correct_bias(qdq, float_weights(model), means, skipped)
    new = inits(qdq)
    assert skipped == []
    assert any("Conv 'd'" in c and "bias created" in c for c in changes)

    # Conv 'c': dW = dequant(W_q) - W, shift_o = sum_{c,k} dW[o, c, k] * E[x_c].
    w = inits(model)["c.w"].astype(np.float64)
    w_deq = old["c.w_quantized"].astype(np.float64) * float(old["c.w_scale"])
    shift = (w_deq - w).sum(axis=(2, 3)) @ means["x"]
    b_scale = old["c.b_quantized_scale"].astype(np.float64)
    expected = old["c.b_quantized"] * b_scale - shift
    np.testing.assert_allclose(new["c.b_quantized"] * b_scale, expected, atol=b_scale.max())
    assert not np.array_equal(new["c.b_quantized"], old["c.b_quantized"])

    # Conv 'd' had no bias: one is created as int32 with scale s_in x s_w, depthwise shift.
    conv_d = next(n for n in qdq.graph.node if n.name == "d")
    dq = next(n for n in qdq.graph.node if n.output[0] == conv_d.input[2])
    assert dq.op_type == "DequantizeLinear" and new[dq.input[0]].dtype == np.int32
    s_in = next(new[n.input[1]] for n in qdq.graph.node if n.output[0] == conv_d.input[0])
    np.testing.assert_allclose(new[dq.input[1]], s_in * new["d.w_scale"], rtol=1e-6)
    wd = inits(model)["d.w"].astype(np.float64)
    dwd = new["d.w_quantized"] * float(new["d.w_scale"]) - wd
    expected_d = -dwd.sum(axis=(1, 2, 3)) * means["a1"]
    np.testing.assert_allclose(
        new[dq.input[0]] * float(new[dq.input[1]]), expected_d, atol=float(new[dq.input[1]])
    )


def test_layers_without_float_weights_are_skipped_with_a_reason():
    model = small_model()
    calib = inputs(16, seed=1)
    qdq = quantize(model, calib)
    skipped: list = []
    weights = {k: v for k, v in float_weights(model).items() if k != "c.w"}
    changes = correct_bias(qdq, weights, channel_means(model, calib), skipped)
    assert len(changes) == 2
    assert [(s.node, s.reason) for s in skipped] == [
        ("c", "no float weight 'c.w' for 'c.w_quantized'")
    ]
