"""Per-layer SQNR debugging of int8 QDQ models against their float model."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from int8_models import minmax_ranges, quantize, small_cnn
from rich.console import Console

from onnxcomp.backends.ort import SessionConfig, create_session
from onnxcomp.converter.debug import (
    DebugReport,
    LayerSqnr,
    debug_models,
    render_debug,
    sqnr_db,
    tensor_map,
)
from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.data.batches import DataOptions

SAMPLES = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("debug")
    model = small_cnn()
    inputs = np.random.default_rng(1).normal(0, 1, (SAMPLES, 3, 8, 8)).astype(np.float32)
    labels = create_session(model).run(None, {"input": inputs})[0].argmax(1)
    np.savez(folder / "data.npz", input=inputs, labels=labels)
    ranges = minmax_ranges(model, inputs)
    bad = dict(ranges)
    bad["r1"] = TensorRange(ranges["r1"].low * 20, ranges["r1"].high * 20)
    paths = {"fp32": folder / "fp32.onnx", "good": folder / "good.onnx", "bad": folder / "bad.onnx"}
    onnx.save(model, paths["fp32"])
    onnx.save(quantize(model, ranges), paths["good"])
    onnx.save(quantize(model, bad), paths["bad"])
    return {"paths": paths, "data": DataOptions(data=folder / "data.npz", batch_size=16)}


def by_node(report: DebugReport) -> dict[str, LayerSqnr]:
    return {layer.node: layer for layer in report.layers}


def test_sqnr_db_edges():
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)


def test_weight_sqnr_matches_numpy(setup):
    report = debug_models(setup["paths"]["fp32"], setup["paths"]["good"], setup["data"])
    w = onnx.numpy_helper.to_array(small_cnn().graph.initializer[2]).astype(np.float64)  # w2
    scale = np.abs(w).reshape(8, -1).max(1).reshape(8, 1, 1, 1) / 127.0  # symmetric per channel
    dequantized = np.clip(np.rint(w / scale), -127, 127) * scale
    expected = 10 * np.log10(np.sum(w**2) / np.sum((dequantized - w) ** 2))
    assert by_node(report)["conv2"].weight_sqnr_db == pytest.approx(expected, abs=1e-3)
    assert 30.0 < expected < 60.0


def test_bad_range_lowers_activation_sqnr(setup):
    paths = setup["paths"]
    good = by_node(debug_models(paths["fp32"], paths["good"], setup["data"]))
    bad = by_node(debug_models(paths["fp32"], paths["bad"], setup["data"]))
    # the Relu folded into conv1's uint8 clamp: conv1 is compared on r1, the value passed on
    assert good["conv1"].tensor == "r1" and "relu1" not in good
    assert good["conv1"].activation_sqnr_db > bad["conv1"].activation_sqnr_db + 10.0
    assert good["conv1"].weight_sqnr_db == pytest.approx(bad["conv1"].weight_sqnr_db)


def test_layers_worst_first_and_accuracy(setup):
    paths = setup["paths"]
    report = debug_models(paths["fp32"], paths["bad"], setup["data"])
    values = [layer.activation_sqnr_db for layer in report.layers]
    assert values == sorted(values)
    assert report.layers[0].node in ("conv1", "conv2")  # the bad range and what follows it
    assert {"conv1", "conv2", "fc"} <= set(by_node(report))
    assert report.samples == SAMPLES
    assert report.reference_accuracy == 1.0  # the labels are the float model's predictions
    assert report.candidate_accuracy == pytest.approx(report.top1_agreement)
    out = io.StringIO()
    render_debug(report, Console(file=out, width=120), top=2)
    assert "conv" in out.getvalue() and "more layer" in out.getvalue()


def test_model_against_itself_is_exact(setup):
    path = setup["paths"]["fp32"]
    report = debug_models(path, path, setup["data"], SessionConfig())
    assert report.top1_agreement == 1.0
    assert all(layer.activation_sqnr_db == math.inf for layer in report.layers if layer.tensor)
    assert by_node(report)["fc"].weight_sqnr_db == math.inf
    assert report.to_dict()["layers"][0]["activation_sqnr_db"] == "inf"


def test_tensor_map_uses_dequantized_value(setup):
    fp32 = onnx.load(setup["paths"]["fp32"])
    qdq = onnx.load(setup["paths"]["good"])
    mapping = tensor_map(fp32, qdq)
    assert mapping["r1"].endswith("_DequantizeLinear_Output")
    assert mapping["logits"] == "logits"  # the float logits stay float


def test_resnet20_real_weights(tmp_path):
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (shared / "pretrained").is_dir():
        pytest.skip("shared pretrained checkpoints not available")
    pytest.importorskip("torch")
    from models import zoo

    fp32 = tmp_path / "r20.onnx"
    zoo.export_reference("resnet20", fp32, keep_batchnorm=True, pretrained_dir=shared)
    model = onnx.load(fp32)
    inputs = np.random.default_rng(0).normal(0, 1, (8, 3, 32, 32)).astype(np.float32)
    from onnxcomp.converter.debug import _prepared

    folded = _prepared(fp32)[1]
    int8 = tmp_path / "r20_int8.onnx"
    onnx.save(quantize(folded, minmax_ranges(folded, inputs)), int8)
    report = debug_models(fp32, int8, DataOptions(samples=8, batch_size=8))
    convs = [layer for layer in report.layers if layer.op_type == "Conv"]
    assert len(convs) == sum(n.op_type == "Conv" for n in model.graph.node)
    assert all(25.0 < layer.weight_sqnr_db < 60.0 for layer in convs)  # folded BN matched
