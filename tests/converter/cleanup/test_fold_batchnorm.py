"""FoldBatchNormPass on hand-built graphs, each rule and each case where it must not act."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import RNG, bn_node, bn_params, conv_bn, make_model, ops, run, tensor
from onnx import helper

from onnxcomp.converter.cleanup.fold_batchnorm import FoldBatchNormPass
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions


def fold(model: onnx.ModelProto):
    ir_model = ir.from_proto(model)
    result = FoldBatchNormPass()(ir_model)
    return ir.to_proto(result.model), result.record


def numpy_bn(y: np.ndarray, prefix: str, model: onnx.ModelProto, eps: float, axis: int = 1):
    """Inference BatchNorm in numpy, from the model's own parameters."""
    p = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    shape = [1] * y.ndim
    shape[axis] = -1
    g, b, m, v = (p[f"{prefix}.{k}"].reshape(shape) for k in ("gamma", "beta", "mean", "var"))
    return (y - m) / np.sqrt(v + eps) * g + b


def assert_close(got: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"group": 2},
        {"transpose": True},
        {"transpose": True, "group": 2},
        {"transpose": True, "bias": False, "group": 3, "cin": 6},
        {"opset": 9},
    ],
    ids=["conv", "conv-no-bias", "grouped-conv", "convT", "grouped-convT", "convT-g3", "opset9"],
)
def test_conv_family_is_folded_exactly(kwargs):
    model = conv_bn(**kwargs)
    cin = kwargs.get("cin", 4)
    x = RNG.normal(size=(2, cin, 5, 5)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    folded, record = fold(model)
    assert ops(folded) == ["ConvTranspose" if kwargs.get("transpose") else "Conv"]
    assert record.skipped == []
    assert "folded 1" in record.summary
    assert_close(run(folded, {"x": x})[0], ref)
    onnx.checker.check_model(folded)


def test_fold_matches_numpy_batchnorm():
    """Independent reference: the un-normalised conv output pushed through numpy BN."""
    model = conv_bn(bias=False)
    x = RNG.normal(size=(1, 4, 5, 5)).astype(np.float32)
    no_bn = onnx.ModelProto()
    no_bn.CopyFrom(model)
    del no_bn.graph.node[1]
    no_bn.graph.output[0].name = "c"
    conv_out = run(no_bn, {"x": x})[0]
    expected = numpy_bn(conv_out.astype(np.float64), "bn", model, eps=1e-3)
    folded, _ = fold(model)
    assert_close(run(folded, {"x": x})[0], expected)


def gemm_bn(trans_b: int) -> onnx.ModelProto:
    w_shape = (6, 4) if trans_b else (4, 6)
    inits = [
        tensor("w", RNG.normal(size=w_shape).astype(np.float32)),
        tensor("b", RNG.normal(size=6).astype(np.float32)),
        *bn_params("bn", 6),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=trans_b, beta=0.5),
        bn_node("bn", "g", "y"),
    ]
    return make_model(nodes, [("x", ["N", 4])], ["y"], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_is_folded_for_both_transb(trans_b):
    model = gemm_bn(trans_b)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    folded, _ = fold(model)
    assert ops(folded) == ["Gemm"]
    assert_close(run(folded, {"x": x})[0], ref)


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_add_is_folded(with_add):
    inits = [tensor("w", RNG.normal(size=(4, 6)).astype(np.float32)), *bn_params("bn", 6)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    bn_input = "m"
    if with_add:
        inits.append(tensor("b", RNG.normal(size=6).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["b", "m"], ["a"], name="add"))  # bias first
        bn_input = "a"
    nodes.append(bn_node("bn", bn_input, "y"))
    model = make_model(nodes, [("x", ["N", 4])], ["y"], inits)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    folded, record = fold(model)
    assert sorted(ops(folded)) == ["Add", "MatMul"]
    assert record.skipped == []
    assert_close(run(folded, {"x": x})[0], ref)


def test_matmul_on_3d_input_is_not_folded():
    """BN normalises axis 1, which for a 3-D MatMul output is not the weight's axis."""
    inits = [tensor("w", RNG.normal(size=(4, 3)).astype(np.float32)), *bn_params("bn", 2)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), bn_node("bn", "m", "y")]
    model = make_model(nodes, [("x", ["N", 2, 4])], ["y"], inits)
    folded, record = fold(model)
    assert "BatchNormalization" in ops(folded)
    assert "not known to be 2-D" in record.skipped[0].reason


def test_producer_with_other_consumer_is_left_intact():
    """Conv output feeds BN and a Relu: folding would corrupt the Relu branch."""
    model = conv_bn()
    graph = model.graph
    graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="side"))
    graph.output.append(helper.make_empty_tensor_value_info("r"))
    model = make_model(
        list(graph.node), [("x", ["N", 4, 5, 5])], ["y", "r"], list(graph.initializer)
    )
    x = RNG.normal(size=(2, 4, 5, 5)).astype(np.float32)
    ref = run(model, {"x": x})
    folded, record = fold(model)
    assert "BatchNormalization" in ops(folded)
    assert "also feeds 1 other node" in record.skipped[0].reason
    for got, want in zip(run(folded, {"x": x}), ref, strict=True):
        np.testing.assert_array_equal(got, want)


def test_shared_weights_fold_one_and_keep_the_other_correct():
    """Two Convs share one weight; only one is followed by BN."""
    inits = [tensor("w", RNG.normal(size=(4, 4, 1, 1)).astype(np.float32)), *bn_params("bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
        bn_node("bn", "c1", "y1"),
        helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2"),
    ]
    model = make_model(nodes, [("x", ["N", 4, 3, 3])], ["y1", "y2"], inits)
    x = RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)
    ref = run(model, {"x": x})
    folded, record = fold(model)
    got = run(folded, {"x": x})
    for g, r in zip(got, ref, strict=True):
        assert_close(g, r)
    assert record.skipped == [] or "shared" in record.skipped[0].reason


def test_training_mode_batchnorm_is_not_folded():
    model = conv_bn()
    attr = helper.make_attribute("training_mode", 1)
    model.graph.node[1].attribute.append(attr)
    folded, record = fold(model)
    assert "BatchNormalization" in ops(folded)
    assert "training_mode=1" in record.skipped[0].reason


def test_batchnorm_after_relu_is_reported():
    inits = bn_params("bn", 3)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "y")]
    model = make_model(nodes, [("x", ["N", 3, 2, 2])], ["y"], inits)
    folded, record = fold(model)
    assert ops(folded) == ["Relu", "BatchNormalization"]
    assert "follows Relu 'relu'" in record.skipped[0].reason


def test_batchnorm_on_graph_input_is_reported():
    model = make_model(
        [bn_node("bn", "x", "y")], [("x", ["N", 3, 2, 2])], ["y"], bn_params("bn", 3)
    )
    _, record = fold(model)
    assert "graph input" in record.skipped[0].reason


def test_opset7_model_is_upgraded_and_folded():
    model = conv_bn(opset=7)
    x = RNG.normal(size=(2, 4, 5, 5)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    result = Pipeline.from_options(PipelineOptions()).run(ir.from_proto(model))
    names = [r.name for r in result.records]
    assert names[0] == "upgrade-opset"
    assert "7 -> 9" in result.records[0].summary
    out = ir.to_proto(result.model)
    assert ops(out) == ["Conv"]
    assert_close(run(out, {"x": x})[0], ref)


def test_spatial0_batchnorm_is_not_folded():
    model = conv_bn(opset=7)
    model.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    _, record = fold(model)
    assert "spatial=0" in record.skipped[0].reason
