"""EqualizePass (cross-layer equalization) on hand-built graphs: each rule, each refusal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

from onnxcomp.converter.equalize.equalize_pass import (
    EqualizeConfig,
    EqualizePass,
    EqualizeRelu6Pass,
)
from onnxcomp.errors import OptionError


def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def unbalanced(gen: np.random.Generator, shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """Random weights whose channels along ``axis`` span four orders of magnitude."""
    w = gen.normal(size=shape)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = -1
    return (w * 10.0 ** gen.uniform(-2, 2, shape[axis]).reshape(scale_shape)).astype(np.float32)


def equalize(model: onnx.ModelProto, cls: type[EqualizePass] = EqualizePass):
    result = cls()(ir.from_proto(model))
    return ir.to_proto(result.model), result.record


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer
    }


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> None:
    ref, got = run(a, {"x": x})[0], run(b, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def conv_relu_conv(activation: str = "Relu", group: int = 1, cmid: int = 6) -> onnx.ModelProto:
    gen = rng()
    inits = [
        tensor("c1.w", unbalanced(gen, (cmid, 4, 3, 3))),
        tensor("c1.b", gen.normal(size=cmid).astype(np.float32)),
        tensor("c2.w", gen.normal(size=(8, cmid // group, 3, 3)).astype(np.float32)),
    ]
    act = [helper.make_node("Relu", ["y1"], ["a1"], name="act")]
    if activation == "Relu6":
        inits += [tensor("lo", np.float32(0.0)), tensor("hi", np.float32(6.0))]
        act = [helper.make_node("Clip", ["y1", "lo", "hi"], ["a1"], name="act")]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["y1"], name="c1", pads=[1] * 4),
        *act,
        helper.make_node("Conv", ["a1", "c2.w"], ["y"], name="c2", group=group),
    ]
    return make_model(nodes, [("x", [2, 4, 7, 7])], ["y"], inits)


def x_for(model: onnx.ModelProto, shape=(2, 4, 7, 7)) -> np.ndarray:
    return rng().normal(1.0, 2.0, size=shape).astype(np.float32)


def test_conv_relu_conv_follows_the_formula_and_keeps_outputs():
    model = conv_relu_conv()
    out, record = equalize(model)
    assert_same_outputs(model, out, x_for(model))
    w0, w = weights(model), weights(out)
    r1 = np.abs(w0["c1.w"]).max(axis=(1, 2, 3))
    r2 = np.abs(w0["c2.w"]).max(axis=(0, 2, 3))
    s = np.sqrt(r1 * r2) / r2
    np.testing.assert_allclose(w["c1.w"], w0["c1.w"] / s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(w["c1.b"], w0["c1.b"] / s, rtol=1e-6)
    np.testing.assert_allclose(w["c2.w"], w0["c2.w"] * s[None, :, None, None], rtol=1e-6)
    # Both sides now have the range sqrt(r1 r2) per channel.
    np.testing.assert_allclose(np.abs(w["c1.w"]).max(axis=(1, 2, 3)), np.sqrt(r1 * r2), rtol=1e-6)
    np.testing.assert_allclose(np.abs(w["c2.w"]).max(axis=(0, 2, 3)), np.sqrt(r1 * r2), rtol=1e-6)
    assert record.summary.startswith("equalized 1 layer pair")
    assert "Conv 'c1' -> Relu -> Conv 'c2'" in record.changes[0]
    assert record.lossless


def test_depthwise_chain_converges_to_equal_ranges():
    gen = rng()
    inits = [
        tensor("a.w", unbalanced(gen, (12, 4, 1, 1))),
        tensor("a.b", gen.normal(size=12).astype(np.float32)),
        tensor("dw.w", unbalanced(gen, (12, 1, 3, 3))),
        tensor("dw.b", gen.normal(size=12).astype(np.float32)),
        tensor("p.w", unbalanced(gen, (5, 12, 1, 1), axis=1)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["y1"], name="a"),
        helper.make_node("Relu", ["y1"], ["a1"], name="r1"),
        helper.make_node("Conv", ["a1", "dw.w", "dw.b"], ["y2"], name="dw", group=12, pads=[1] * 4),
        helper.make_node("Relu", ["y2"], ["a2"], name="r2"),
        helper.make_node("Conv", ["a2", "p.w"], ["y"], name="p"),
    ]
    model = make_model(nodes, [("x", [2, 4, 7, 7])], ["y"], inits)
    out, record = equalize(model)
    assert_same_outputs(model, out, x_for(model))
    w = weights(out)
    ra = np.abs(w["a.w"]).max(axis=(1, 2, 3))
    rdw = np.abs(w["dw.w"]).max(axis=(1, 2, 3))
    rp = np.abs(w["p.w"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(ra, rdw, rtol=1e-4)
    np.testing.assert_allclose(rdw, rp, rtol=1e-4)
    before = np.abs(weights(model)["a.w"]).max(axis=(1, 2, 3))
    assert ra.max() / ra.min() < before.max() / before.min() / 5
    assert "equalized 2 layer pair(s)" in record.summary


def test_grouped_second_conv():
    model = conv_relu_conv(group=2)
    out, _ = equalize(model)
    assert_same_outputs(model, out, x_for(model))
    w0 = weights(model)
    r1 = np.abs(w0["c1.w"]).max(axis=(1, 2, 3))
    # Input channel c of a 2-group conv is read by the rows of its group only.
    grouped = np.abs(w0["c2.w"]).reshape(2, 4, 3, 9).max(axis=(1, 3)).reshape(-1)
    s = np.sqrt(r1 * grouped) / grouped
    np.testing.assert_allclose(weights(out)["c1.w"], w0["c1.w"] / s[:, None, None, None], rtol=1e-6)


@pytest.mark.parametrize("pool", [True, False], ids=["gap-flatten-gemm", "flatten-gemm"])
def test_conv_to_gemm_through_flatten(pool):
    gen = rng()
    features = 6 if pool else 6 * 25
    inits = [
        tensor("c.w", unbalanced(gen, (6, 4, 3, 3))),
        tensor("c.b", gen.normal(size=6).astype(np.float32)),
        tensor("g.w", gen.normal(size=(3, features)).astype(np.float32)),
        tensor("g.b", gen.normal(size=3).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["y1"], name="c"),
        helper.make_node("Relu", ["y1"], ["a1"], name="r"),
    ]
    last = "a1"
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", ["a1"], ["p"], name="gap"))
        last = "p"
    nodes += [
        helper.make_node("Flatten", [last], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g.w", "g.b"], ["y"], name="g", transB=1),
    ]
    model = make_model(nodes, [("x", [2, 4, 7, 7])], ["y"], inits)
    out, record = equalize(model)
    assert "equalized 1" in record.summary, record.skipped
    assert_same_outputs(model, out, x_for(model))
    assert not np.allclose(weights(out)["c.w"], weights(model)["c.w"])


def test_gemm_relu_matmul():
    gen = rng()
    inits = [
        tensor("g.w", unbalanced(gen, (4, 6), axis=1)),
        tensor("g.b", gen.normal(size=6).astype(np.float32)),
        tensor("m.w", gen.normal(size=(6, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "g.w", "g.b"], ["y1"], name="g"),
        helper.make_node("Relu", ["y1"], ["a1"], name="r"),
        helper.make_node("MatMul", ["a1", "m.w"], ["y"], name="m"),
    ]
    model = make_model(nodes, [("x", [5, 4])], ["y"], inits)
    out, record = equalize(model)
    assert "equalized 1" in record.summary
    assert_same_outputs(model, out, x_for(model, (5, 4)))
    r = np.abs(weights(out)["g.w"]).max(axis=0)
    np.testing.assert_allclose(r, np.abs(weights(out)["m.w"]).max(axis=1), rtol=1e-6)


def test_relu6_is_skipped_with_its_reason():
    model = conv_relu_conv("Relu6")
    out, record = equalize(model)
    assert record.summary == "no layer pair to equalize"
    reasons = {s.node: s.reason for s in record.skipped}
    assert "ReLU6" in reasons["c1"] and "not positive homogeneous" in reasons["c1"]
    np.testing.assert_array_equal(weights(out)["c1.w"], weights(model)["c1.w"])


def test_relu6_to_relu_is_a_separate_lossy_pass():
    model = conv_relu_conv("Relu6")
    out, record = equalize(model, EqualizeRelu6Pass)
    assert not record.lossless
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv"]
    assert any("replaced by Relu (lossy)" in c for c in record.changes)
    assert "lo" not in weights(out) and "hi" not in weights(out)
    assert "equalized 1" in record.summary


def test_shared_output_is_skipped():
    gen = rng()
    inits = [
        tensor("c1.w", unbalanced(gen, (6, 4, 1, 1))),
        tensor("c2.w", gen.normal(size=(3, 6, 1, 1)).astype(np.float32)),
        tensor("c3.w", gen.normal(size=(3, 6, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w"], ["y1"], name="c1"),
        helper.make_node("Relu", ["y1"], ["a1"], name="r"),
        helper.make_node("Conv", ["a1", "c2.w"], ["y2"], name="c2"),
        helper.make_node("Conv", ["a1", "c3.w"], ["y3"], name="c3"),
    ]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], ["y2", "y3"], inits)
    out, record = equalize(model)
    assert not record.modified
    reasons = {s.node: s.reason for s in record.skipped}
    assert "feeds 2 nodes" in reasons["c1"]
    assert "graph output" in reasons["c2"]
    np.testing.assert_array_equal(weights(out)["c1.w"], weights(model)["c1.w"])


def test_config_builds_the_pass_of_each_mode():
    assert type(EqualizeConfig("exact").build()) is EqualizePass
    assert type(EqualizeConfig("relu6").build()) is EqualizeRelu6Pass
    built = EqualizeConfig(max_iterations=3, tolerance=1e-3).build()
    assert (built.max_iterations, built.tolerance) == (3, 1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "relu"}, "--equalize relu: choose exact or relu6"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"tolerance": 0.0}, "tolerance"),
    ],
)
def test_config_refuses_wrong_options(options, message):
    with pytest.raises(OptionError, match=message):
        EqualizeConfig(**options)
