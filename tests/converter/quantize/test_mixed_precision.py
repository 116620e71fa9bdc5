"""Accuracy-aware mixed precision: the most sensitive layers stay float until max_drop holds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from int8_models import minmax_ranges, quantize, small_cnn

from onnxcomp.backends.ort import create_session
from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.converter.quantize.mixed_precision import (
    MixedPrecisionResult,
    quantize_excluding,
    search_mixed_precision,
)
from onnxcomp.converter.quantize.qdq import QdqSettings
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OnnxcompError

SAMPLES = 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("mixed")
    model = small_cnn()
    inputs = np.random.default_rng(2).normal(0, 1, (SAMPLES, 3, 8, 8)).astype(np.float32)
    labels = create_session(model).run(None, {"input": inputs})[0].argmax(1)
    np.savez(folder / "data.npz", input=inputs, labels=labels)
    np.savez(folder / "unlabelled.npz", input=inputs)
    ranges = minmax_ranges(model, inputs)
    broken = dict(ranges)
    # r1 (conv1's output after its Relu, read by conv2) quantized over an absurd range: every
    # value rounds to zero, and the model answers the same class for every input
    broken["r1"] = TensorRange(0.0, ranges["r1"].high * 1000)
    return {
        "model": model,
        "ranges": ranges,
        "broken": broken,
        "data": DataOptions(data=folder / "data.npz", batch_size=32),
        "unlabelled": DataOptions(data=folder / "unlabelled.npz", batch_size=32),
    }


def search(setup: dict, max_drop: float, ranges: str = "broken", **kw) -> MixedPrecisionResult:
    return search_mixed_precision(
        setup["model"], setup[ranges], QdqSettings(), setup["data"], max_drop, **kw
    )


def test_finds_the_broken_layer(setup):
    result = search(setup, max_drop=5.0)
    assert result.drop_before > 50.0  # the broken range destroys accuracy
    assert result.met and result.drop_after <= 5.0
    assert set(result.excluded) & {"conv1", "relu1", "conv2"}
    assert len(result.excluded) <= 3
    assert result.metric == "accuracy" and result.reference == 100.0
    assert result.evaluations <= 2 + int(np.ceil(np.log2(8))) + 1
    assert result.history[0] == (0, pytest.approx(100.0 - result.drop_before))
    kept_float = {n.name for n in result.model.graph.node} & set(result.excluded)
    assert kept_float == set(result.excluded)  # the excluded nodes are in the returned model
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


def test_large_max_drop_excludes_nothing(setup):
    result = search(setup, max_drop=100.0)
    assert result.met and result.excluded == []
    assert result.history == [(0, pytest.approx(100.0 - result.drop_before))]
    assert result.evaluations == 1


def test_good_ranges_need_no_exclusion(setup):
    result = search(setup, max_drop=10.0, ranges="ranges")
    assert result.met and result.excluded == [] and result.drop_before <= 10.0


def test_unreachable_max_drop_is_reported(setup):
    # keep at most one node in float: the broken tensor needs its producer and reader
    result = search(setup, max_drop=0.0, max_excluded=1)
    assert not result.met
    assert result.drop_after > 0.0 and len(result.excluded) <= 1
    assert result.evaluations <= 2


def test_without_labels_uses_agreement(setup):
    result = search_mixed_precision(
        setup["model"], setup["broken"], QdqSettings(), setup["unlabelled"], 5.0
    )
    assert result.metric == "top-1 agreement" and result.met
    assert set(result.excluded) & {"conv1", "relu1", "conv2"}


def test_quantize_excluding_keeps_nodes_float(setup):
    model = quantize_excluding(setup["model"], setup["ranges"], QdqSettings(), ["fc"])
    fc = next(n for n in model.graph.node if n.name == "fc")
    assert "wf" in fc.input  # the float weight, no DequantizeLinear
    full = quantize(setup["model"], setup["ranges"])
    fc_full = next(n for n in full.graph.node if n.name == "fc")
    assert "wf" not in fc_full.input


def test_negative_max_drop_is_an_error(setup):
    with pytest.raises(OnnxcompError, match="max-drop"):
        search(setup, max_drop=-1.0)


def test_not_a_classifier_is_an_error(setup, tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(setup["model"])
    del model.graph.output[:]
    model.graph.output.append(onnx.ValueInfoProto(name="gap"))
    with pytest.raises(OnnxcompError, match="classifier"):
        search_mixed_precision(model, setup["ranges"], QdqSettings(), setup["data"], 1.0)
