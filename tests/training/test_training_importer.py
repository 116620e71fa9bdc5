"""The ONNX -> torch importer against ONNX Runtime, its round trip and write-back."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import bn_node, bn_params, make_model, run, tensor
from onnx import helper

torch = pytest.importorskip("torch")

from int8_models import minmax_ranges, quantize, small_cnn  # noqa: E402

from onnxcomp.converter.debug import weight_sqnrs  # noqa: E402
from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
node = helper.make_node


def f32(*shape, scale=1.0):
    return RNG.normal(0, scale, shape).astype(np.float32)


def i64(values):
    return np.array(values, np.int64)


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def torch_outputs(module, feeds):
    with torch.no_grad():
        out = module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [out[n].numpy() for n in module.output_names]


def case_conv():
    inits = [
        tensor("w", f32(6, 2, 3, 3)),
        tensor("b", f32(6)),
        tensor("wt", f32(6, 2, 3, 3)),
        tensor("bt", f32(4)),
    ]
    nodes = [
        node(
            "Conv",
            ["x", "w", "b"],
            ["c"],
            name="conv",
            group=2,
            strides=[2, 1],
            pads=[1, 0, 2, 1],
            dilations=[1, 2],
        ),
        node(
            "ConvTranspose",
            ["c", "wt", "bt"],
            ["y"],
            name="deconv",
            group=2,
            strides=[2, 2],
            pads=[1, 0, 0, 1],
            output_padding=[1, 0],
        ),
    ]
    return make_model(nodes, [("x", [2, 4, 9, 9])], ["c", "y"], inits)


def case_linear():
    inits = [
        tensor("wa", f32(5, 3)),
        tensor("c", f32(1, 5)),
        tensor("wm", f32(5, 4)),
        tensor("bm", f32(4)),
    ]
    nodes = [
        node("Gemm", ["x", "wa", "c"], ["g"], name="gemm", transA=1, transB=1, alpha=0.5, beta=2.0),
        node("MatMul", ["g", "wm"], ["m"], name="mm"),
        node("Add", ["m", "bm"], ["y"], name="add"),
    ]
    return make_model(nodes, [("x", [3, 2])], ["y"], inits)


def case_activations():
    inits = [
        tensor("lo", np.float32(-0.5)),
        tensor("hi", np.float32(0.7)),
        tensor("k", f32(1, 4, 1, 1)),
        tensor("d", np.float32(1.5 + f32(4, 1, 1) ** 2)),
    ]
    nodes = [
        node("Relu", ["x"], ["a"]),
        node("LeakyRelu", ["x"], ["b"], alpha=0.2),
        node("Sigmoid", ["x"], ["c"]),
        node("HardSigmoid", ["x"], ["d1"], alpha=0.3, beta=0.4),
        node("HardSwish", ["x"], ["e"]),
        node("Clip", ["x", "lo", "hi"], ["f"]),
        node("Clip", ["x", "", "hi"], ["f2"]),
        node("Sub", ["a", "b"], ["s"]),
        node("Mul", ["s", "k"], ["m"]),
        node("Div", ["m", "d"], ["q"]),
        node("Sum", [], []) if False else node("Add", ["q", "c"], ["y"]),
    ]
    outs = ["y", "d1", "e", "f", "f2"]
    return make_model(nodes, [("x", [2, 4, 3, 3])], outs, inits)


def case_pooling():
    nodes = [
        node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 1]),
        node("AveragePool", ["x"], ["ap"], kernel_shape=[3, 2], pads=[1, 0, 1, 1]),
        node(
            "AveragePool",
            ["x"],
            ["ap2"],
            kernel_shape=[2, 2],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        node("GlobalAveragePool", ["x"], ["gap"]),
        node("ReduceMean", ["x"], ["rm"], axes=[1, 3], keepdims=0),
        node("Softmax", ["rm"], ["sm"], axis=1),
    ]
    return make_model(nodes, [("x", [2, 3, 7, 6])], ["mp", "ap", "ap2", "gap", "sm"], [], opset=17)


def case_shapes():
    inits = [
        tensor("shape", i64([0, -1, 2])),
        tensor("starts", i64([-1, 1])),
        tensor("ends", i64([-100, 5])),
        tensor("axes", i64([1, 2])),
        tensor("steps", i64([-2, 2])),
        tensor("pads", i64([0, 0, 1, 0, 0, 0, 2, 1])),
        tensor("split", i64([2, 4])),
        tensor("ax0", i64([0])),
        tensor("idx", i64([2, 0])),
    ]
    nodes = [
        node("Reshape", ["x", "shape"], ["r"]),
        node("Transpose", ["r"], ["t"], perm=[2, 0, 1]),
        node("Slice", ["x", "starts", "ends", "axes", "steps"], ["sl"]),
        node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        node("Split", ["x", "split"], ["s1", "s2"], axis=1),
        node("Concat", ["s2", "s1"], ["cat"], axis=1),
        node("Unsqueeze", ["cat", "ax0"], ["u"]),
        node("Squeeze", ["u", "ax0"], ["sq"]),
        node("Identity", ["sq"], ["id"]),
        node("Dropout", ["id"], ["dr"]),
        node("Flatten", ["dr"], ["fl"], axis=2),
        node("Shape", ["x"], ["sh"]),
        node("Gather", ["sh", "idx"], ["gi"]),
        node("Cast", ["gi"], ["gf"], to=onnx.TensorProto.FLOAT),
        node("Constant", [], ["k"], value=tensor("kv", f32(1))),
        node("Mul", ["gf", "k"], ["gk"]),
        node(
            "ConstantOfShape",
            ["gi"],
            ["cs"],
            value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5]),
        ),
    ]
    outs = ["t", "sl", "p", "fl", "gk", "cs"]
    return make_model(nodes, [("x", [2, 6, 5, 4])], outs, inits)


CASES = {
    "conv": (case_conv, [2, 4, 9, 9]),
    "linear": (case_linear, [3, 2]),
    "activations": (case_activations, [2, 4, 3, 3]),
    "pooling": (case_pooling, [2, 3, 7, 6]),
    "shapes": (case_shapes, [2, 6, 5, 4]),
}


@pytest.mark.parametrize("name", CASES)
def test_op_groups_match_onnxruntime(name):
    build, shape = CASES[name]
    proto = build()
    feeds = {"x": f32(*shape, scale=2.0)}
    module = import_onnx(to_ir(proto)).eval()
    for got, want in zip(torch_outputs(module, feeds), run(proto, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def bn_cnn() -> onnx.ModelProto:
    """conv -> BN -> relu -> conv -> BN -> add (residual) -> GAP -> flatten -> fc."""
    inits = [
        tensor("w1", f32(4, 3, 3, 3, scale=0.5)),
        tensor("w2", f32(4, 4, 3, 3, scale=0.3)),
        tensor("wf", f32(5, 4)),
        tensor("bf", f32(5)),
        *bn_params("bn1", 4),
        *bn_params("bn2", 4),
    ]
    nodes = [
        node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
        bn_node("bn1", "c1", "b1", momentum=0.8),
        node("Relu", ["b1"], ["r1"], name="relu1"),
        node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
        bn_node("bn2", "c2", "b2", epsilon=1e-3),
        node("Add", ["b2", "r1"], ["a"], name="add"),
        node("GlobalAveragePool", ["a"], ["gap"], name="gap"),
        node("Flatten", ["gap"], ["flat"], name="flatten"),
        node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [("input", ["N", 3, 6, 6])], ["logits"], inits)


def names(model: onnx.ModelProto):
    g = model.graph
    return (
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in g.node],
        sorted(i.name for i in g.initializer),
    )


def test_cnn_with_batchnorm_eval_taps_and_round_trip():
    proto = bn_cnn()
    feeds = {"input": f32(4, 3, 6, 6)}
    module = import_onnx(to_ir(proto)).eval()
    np.testing.assert_allclose(torch_outputs(module, feeds)[0], run(proto, feeds)[0], atol=1e-5)
    with torch.no_grad():
        tapped = module.run({"input": torch.from_numpy(feeds["input"])}, taps=["r1"])
    assert list(tapped) == ["logits", "r1"]
    np.testing.assert_allclose(
        tapped["r1"].numpy(), np.maximum(run(_with_output(proto, "b1"), feeds)[1], 0), atol=1e-5
    )
    assert {"w1", "bn1.gamma", "bn1.beta", "wf", "bf"} <= set(module.onnx_parameters())
    assert "bn1.mean" not in module.onnx_parameters()
    exported = ir.to_proto(module.export_onnx())
    onnx.checker.check_model(exported)
    assert names(exported) == names(proto)
    np.testing.assert_array_equal(run(exported, feeds)[0], run(proto, feeds)[0])


def _with_output(proto, name):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def test_sgd_steps_are_written_back():
    proto = bn_cnn()
    module = import_onnx(to_ir(proto))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.from_numpy(f32(8, 3, 6, 6))
    module.train()
    for _ in range(3):
        optimizer.zero_grad()
        module(x)[0].square().mean().backward()
        optimizer.step()
    module.eval()
    feeds = {"input": f32(3, 3, 6, 6)}
    exported = ir.to_proto(module.export_onnx())
    got = run(exported, feeds)[0]
    np.testing.assert_allclose(got, torch_outputs(module, feeds)[0], atol=1e-5)
    assert np.abs(got - run(proto, feeds)[0]).max() > 1e-3
    assert names(exported) == names(proto)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    assert not np.array_equal(before["w1"], after["w1"])
    assert not np.array_equal(before["bn1.mean"], after["bn1.mean"])  # running stats moved


def test_batchnorm_train_mode_follows_onnx_formula():
    proto = bn_cnn()
    module = import_onnx(to_ir(proto)).train()
    x = f32(5, 3, 6, 6)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    with torch.no_grad():
        out = module.run({"input": torch.from_numpy(x)}, taps=["c1", "b1", "c2"])
    c1 = out["c1"].numpy().astype(np.float64)
    mean, var = c1.mean(axis=(0, 2, 3)), c1.var(axis=(0, 2, 3))
    expected = (c1 - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    expected = expected * inits["bn1.gamma"][:, None, None] + inits["bn1.beta"][:, None, None]
    np.testing.assert_allclose(out["b1"].numpy(), expected, atol=1e-4)
    tensors = module.tensors()
    np.testing.assert_allclose(
        tensors["bn1.mean"].numpy(), 0.8 * inits["bn1.mean"] + 0.2 * mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        tensors["bn1.var"].numpy(), 0.8 * inits["bn1.var"] + 0.2 * var, rtol=1e-5, atol=1e-6
    )
    c2_mean = out["c2"].numpy().mean(axis=(0, 2, 3))  # default momentum 0.9
    np.testing.assert_allclose(
        tensors["bn2.mean"].numpy(), 0.9 * inits["bn2.mean"] + 0.1 * c2_mean, rtol=1e-5, atol=1e-6
    )


@pytest.fixture(scope="module")
def int8_pair():
    model = small_cnn()
    calib = np.random.default_rng(1).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    return model, quantize(model, minmax_ranges(model, calib))


def test_int8_qdq_imports_trains_and_exports_back(int8_pair):
    float_model, qdq = int8_pair
    feeds = {"input": f32(6, 3, 8, 8)}
    module = import_onnx(to_ir(qdq)).eval()
    assert len(module.quants) > 0
    got, want = torch_outputs(module, feeds)[0], run(qdq, feeds)[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    fc_input_scale = float(inits["gap_scale"])  # gap and flat share it: one FakeQuant
    wf = onnx.numpy_helper.to_array(
        next(t for t in float_model.graph.initializer if t.name == "wf")
    )
    step = fc_input_scale * np.abs(wf).sum(axis=1).max()  # one input step through the fc
    assert np.abs(got - want).max() <= step
    exported = ir.to_proto(module.export_onnx())
    assert names(exported) == names(qdq)
    np.testing.assert_allclose(run(exported, feeds)[0], want, atol=1e-6)

    groups = [  # log-domain steps: their rate is one of relative change (fake_quant.py)
        {"params": module.params.parameters(), "lr": 0.05},
        {"params": module.quants.parameters(), "lr": 10.0},
    ]
    optimizer = torch.optim.SGD(groups)
    module.train()
    for _ in range(3):
        optimizer.zero_grad()
        module(torch.from_numpy(feeds["input"]))[0].square().mean().backward()
        optimizer.step()
    module.eval()
    trained = ir.to_proto(module.export_onnx())
    onnx.checker.check_model(trained)
    assert names(trained) == names(qdq)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert all(after[n].dtype == before[n].dtype for n in before)
    assert not np.array_equal(after["w1_quantized"], before["w1_quantized"])
    assert not np.array_equal(after["w1_scale"], before["w1_scale"])
    assert not np.array_equal(after["gap_scale"], before["gap_scale"])
    assert all((after[n] > 0).all() for n in after if n.endswith("scale"))
    bias_scale = after["b1_quantized_scale"]
    np.testing.assert_allclose(bias_scale, after["input_scale"] * after["w1_scale"], rtol=1e-6)
    # int32 bias rounding can move an activation across a rounding boundary: one step at most
    trained_error = np.abs(run(trained, feeds)[0] - torch_outputs(module, feeds)[0])
    assert np.median(trained_error) < 1e-4 and trained_error.max() <= step
    sqnrs = weight_sqnrs(float_model, trained)  # `onnxcomp debug` still reads the model
    assert set(sqnrs) == {"conv1", "conv2", "fc"} and all(v > 10 for v in sqnrs.values())


def test_unsupported_op_is_one_line():
    proto = make_model([node("Sin", ["x"], ["y"], name="sine")], [("x", [2])], ["y"], [])
    with pytest.raises(
        OnnxcompError,
        match=r"node 'sine' \(Sin\) cannot be trained.*supported: "
        r"Abs, Add",
    ):
        import_onnx(to_ir(proto))


def test_quantize_read_by_a_float_op_is_refused():
    inits = [tensor("s", np.float32(0.1)), tensor("z", np.uint8(128))]
    nodes = [
        node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        node("Cast", ["q"], ["y"], name="cast", to=onnx.TensorProto.FLOAT),
    ]
    proto = make_model(nodes, [("x", [2])], ["y"], inits)
    with pytest.raises(OnnxcompError, match=r"'q' \(QuantizeLinear\).*reaches Cast 'cast'"):
        import_onnx(to_ir(proto))


def test_bad_feeds_and_taps():
    module = import_onnx(to_ir(bn_cnn()))
    with pytest.raises(OnnxcompError, match="missing input"):
        module.run({})
    with pytest.raises(OnnxcompError, match="no tensor named 'nope'"):
        module.run({"input": torch.zeros(1, 3, 6, 6)}, taps=["nope"])
