"""--sparsity: magnitude pruning against numpy, ORT on dense and sparse-stored files, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.quantize import QuantizeConfig
from onnxcomp.converter.sparsify import (
    SPARSITY_MARK,
    SparsifyPass,
    SparsityConfig,
)
from onnxcomp.core.ops import BINARIZED_MARK
from onnxcomp.core.proto import densify, store_sparse
from onnxcomp.errors import OptionError
from tests.graphs import make_model, run, tensor

RNG = np.random.default_rng(3)
NAMES = ("w1", "w2", "w3", "w4")


def net() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Flatten -> Gemm -> MatMul, each weight at its own scale."""
    inits = [
        tensor("w1", RNG.normal(0, 1.0, (4, 3, 3, 3)).astype(np.float32)),
        tensor("w2", RNG.normal(0, 0.1, (6, 4, 3, 3)).astype(np.float32)),
        tensor("w3", RNG.normal(0, 0.5, (10, 6 * 4 * 4)).astype(np.float32)),
        tensor("w4", RNG.normal(0, 2.0, (10, 5)).astype(np.float32)),
        tensor("b3", RNG.normal(0, 0.5, 10).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"], name="mm"),
    ]
    return make_model(nodes, [("x", (2, 3, 4, 4))], ["y"], inits)


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: model.graph.initializers[n].const_value.numpy() for n in NAMES}


def sparsify(proto: onnx.ModelProto, config: SparsityConfig) -> ir.Model:
    model = ir.from_proto(proto)
    SparsifyPass(config)(model)
    return model


@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_layer_scope_zeroes_the_smallest_fraction_of_each_layer(s):
    proto = net()
    before = weights(ir.from_proto(proto))
    after = weights(sparsify(proto, SparsityConfig(s, "layer")))
    np.testing.assert_array_equal(after["w1"], before["w1"])  # first layer stays dense
    for name in NAMES[1:]:
        w, p = before[name], after[name]
        count = round(s * w.size)
        threshold = np.sort(np.abs(w).ravel())[count - 1]
        assert np.count_nonzero(p == 0) == count
        assert np.all(np.abs(w[p == 0]) <= threshold)
        np.testing.assert_array_equal(p[p != 0], w[p != 0])
        assert np.all(np.abs(w[p != 0]) >= threshold)


def test_global_scope_uses_one_threshold_for_the_model():
    proto = net()
    before = weights(ir.from_proto(proto))
    after = weights(sparsify(proto, SparsityConfig(0.5, "global", first_layer=True)))
    flat = np.concatenate([np.abs(w).ravel() for w in before.values()])
    count = round(0.5 * flat.size)
    threshold = np.sort(flat)[count - 1]
    zeros = sum(np.count_nonzero(a == 0) for a in after.values())
    assert zeros == count
    for name in NAMES:
        expected = np.where(np.abs(before[name]) <= threshold, 0, before[name])
        np.testing.assert_array_equal(after[name], expected)
    # the small-scale layer loses far more than the large-scale MatMul
    assert np.mean(after["w2"] == 0) > 0.9 > 0.2 > np.mean(after["w4"] == 0)


def test_metadata_record_and_ort_run_the_pruned_model():
    proto = net()
    model = ir.from_proto(proto)
    result = SparsifyPass(SparsityConfig(0.8))(model)
    marks = json.loads(model.metadata_props[SPARSITY_MARK])
    assert set(marks) == {"w2", "w3", "w4"}
    assert marks["w3"] == pytest.approx(0.8, abs=1e-3)
    assert result.record.skipped[0].reason == "the first layer is left as it is"
    assert len(result.record.changes) == 3 and "80.0% zeros" in result.record.changes[1]
    pruned = ir.to_proto(model)
    x = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    by_hand = onnx.ModelProto()
    by_hand.CopyFrom(proto)
    for init in by_hand.graph.initializer:
        if init.name in marks:
            w = onnx.numpy_helper.to_array(init)
            w = np.where(np.abs(w) <= np.sort(np.abs(w).ravel())[round(0.8 * w.size) - 1], 0, w)
            init.CopyFrom(tensor(init.name, w.astype(np.float32)))
    np.testing.assert_array_equal(run(pruned, {"x": x})[0], run(by_hand, {"x": x})[0])


def test_sparse_initializers_where_smaller_run_identically_in_ort():
    dense = ir.to_proto(sparsify(net(), SparsityConfig(0.8)))
    stored = onnx.ModelProto()
    stored.CopyFrom(dense)
    moved = store_sparse(stored)
    assert sorted(moved) == ["w2", "w3", "w4"]
    onnx.checker.check_model(stored)
    assert stored.ByteSize() < dense.ByteSize()
    x = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(stored, {"x": x})[0], run(dense, {"x": x})[0])
    assert densify(stored) == 3
    restored = {i.name: onnx.numpy_helper.to_array(i) for i in stored.graph.initializer}
    for init in dense.graph.initializer:
        np.testing.assert_array_equal(restored[init.name], onnx.numpy_helper.to_array(init))


def test_below_two_thirds_zeros_dense_storage_is_kept():
    proto = ir.to_proto(sparsify(net(), SparsityConfig(0.5)))
    assert store_sparse(proto) == []


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_sparsity_outside_0_1_is_refused(s):
    with pytest.raises(OptionError, match="--sparsity"):
        SparsityConfig(s)


def test_unknown_scope_and_int8_combination_are_refused():
    with pytest.raises(OptionError, match="--sparsity-scope"):
        SparsityConfig(0.5, "channel")
    with pytest.raises(OptionError, match="--int8"):
        PipelineOptions(sparsity=SparsityConfig(0.5), int8=QuantizeConfig())


def test_a_binarized_model_is_refused_before_any_pass(monkeypatch):
    def no_data_pass(*args, **kwargs):
        raise AssertionError("a data pass ran")

    monkeypatch.setattr(PassContext, "collect", no_data_pass)
    model = ir.from_proto(net())
    model.metadata_props[BINARIZED_MARK] = "{}"
    before = weights(model)
    with pytest.raises(OptionError, match="binarized") as error:
        Pipeline.from_options(PipelineOptions(sparsity=SparsityConfig(0.5))).run(model)
    assert "\n" not in str(error.value)
    for name, w in weights(model).items():
        np.testing.assert_array_equal(w, before[name])
