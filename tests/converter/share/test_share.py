"""--weight-sharing: k-means against a direct numpy Lloyd run, zeros kept, ORT, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.share import SHARED_MARK, ShareConfig, SharePass, kmeans_1d, share_weight
from onnxcomp.converter.sparsify import SPARSITY_MARK, SparsityConfig
from onnxcomp.errors import OptionError
from tests.graphs import make_model, run, tensor

RNG = np.random.default_rng(5)


def lloyd_reference(values: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd from linspace(min, max): full distance matrix, argmin."""
    c = np.linspace(values.min(), values.max(), k)
    labels = np.argmin(np.abs(values[:, None] - c[None, :]), axis=1)
    for _ in range(iterations):
        for j in range(k):
            if np.any(labels == j):
                c[j] = values[labels == j].mean()
        new = np.argmin(np.abs(values[:, None] - c[None, :]), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    return c, labels


def net() -> onnx.ModelProto:
    inits = [
        tensor("w1", RNG.normal(0, 1.0, (4, 3, 3, 3)).astype(np.float32)),
        tensor("w2", RNG.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)),
        tensor("w3", RNG.normal(0, 0.5, (10, 96)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [("x", (2, 3, 4, 4))], ["y"], inits)


@pytest.mark.parametrize("k", [2, 5, 16])
def test_kmeans_matches_a_direct_lloyd_run(k):
    values = RNG.normal(size=400)
    centroids, labels = kmeans_1d(values, k, 30)
    ref_c, ref_labels = lloyd_reference(values, k, 30)
    np.testing.assert_allclose(centroids, ref_c, rtol=1e-12)
    np.testing.assert_array_equal(labels, ref_labels)


def test_shared_weight_takes_k_values_nearest_to_each_weight():
    w = RNG.normal(size=(8, 4, 3, 3)).astype(np.float32)
    shared, codebook = share_weight(w, 8, 50)
    assert codebook.size == 8
    nearest = codebook[np.argmin(np.abs(w.ravel()[:, None] - codebook[None, :]), axis=1)]
    np.testing.assert_array_equal(shared.ravel(), nearest)
    ref_c, ref_labels = lloyd_reference(w.astype(np.float64).ravel(), 8, 50)
    np.testing.assert_array_equal(shared.ravel(), ref_c[ref_labels].astype(np.float32))


def test_zeros_stay_exact_with_sparsity():
    model = ir.from_proto(net())
    options = PipelineOptions(sparsity=SparsityConfig(0.6), sharing=ShareConfig(4))
    Pipeline.from_options(options).run(model)
    for name in ("w2", "w3"):
        w = model.graph.initializers[name].const_value.numpy()
        assert np.mean(w == 0) == pytest.approx(0.6, abs=0.01)
        assert np.unique(w).size == 4 and 0 in np.unique(w)
    assert json.loads(model.metadata_props[SHARED_MARK]) == {"w2": 4, "w3": 4}
    assert set(json.loads(model.metadata_props[SPARSITY_MARK])) == {"w2", "w3"}


def test_ort_runs_the_shared_model_as_a_hand_shared_float_model():
    proto = net()
    model = ir.from_proto(proto)
    result = SharePass(ShareConfig(16))(model)
    assert json.loads(model.metadata_props[SHARED_MARK]) == {"w2": 16, "w3": 16}
    assert result.record.skipped[0].node == "Conv 'conv1'"
    by_hand = onnx.ModelProto()
    by_hand.CopyFrom(proto)
    for init in by_hand.graph.initializer:
        if init.name in ("w2", "w3"):
            w = onnx.numpy_helper.to_array(init).astype(np.float64)
            c, labels = lloyd_reference(w.ravel(), 16, 50)
            init.CopyFrom(tensor(init.name, c[labels].reshape(w.shape).astype(np.float32)))
    x = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(ir.to_proto(model), {"x": x})[0], run(by_hand, {"x": x})[0])


def test_a_weight_with_few_values_is_left_alone():
    model = ir.from_proto(net())
    result = SharePass(ShareConfig(256, first_layer=True))(model)
    reasons = [s.reason for s in result.record.skipped]
    assert reasons == ["only 108 distinct values", "only 216 distinct values"]
    assert json.loads(model.metadata_props[SHARED_MARK]) == {"w3": 256}


@pytest.mark.parametrize("k", [1, 0, 257, -3])
def test_k_outside_2_256_is_refused(k):
    with pytest.raises(OptionError, match="--weight-sharing"):
        ShareConfig(k)


def test_a_quantized_model_is_refused_before_any_pass(monkeypatch):
    def no_data_pass(*args, **kwargs):
        raise AssertionError("a data pass ran")

    monkeypatch.setattr(PassContext, "collect", no_data_pass)
    proto = net()
    proto.graph.node.append(helper.make_node("QuantizeLinear", ["y", "s"], ["q"]))
    proto.graph.initializer.append(tensor("s", np.float32(0.1)))
    model = ir.from_proto(proto)
    with pytest.raises(OptionError, match="quantized") as error:
        Pipeline.from_options(PipelineOptions(sharing=ShareConfig(8))).run(model)
    assert "\n" not in str(error.value)
    assert SHARED_MARK not in model.metadata_props
