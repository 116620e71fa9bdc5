"""AdaRound weight rounding: the optimisation against numpy references, the int8 pass on
hand-built Conv and Gemm layers (on the grid, lower output error, fused like nearest rounding,
deterministic), and the refusal without torch."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import make_model, run, tensor
from onnx import helper, numpy_helper

from onnxcomp.cli import main
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.quantize import quantize_pass
from onnxcomp.converter.quantize.adaround import (
    AdaRoundSettings,
    adaround_rounder,
    adaround_rows,
    soft_rounding,
)
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError

RNG = np.random.default_rng(7)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_torch = pytest.mark.skipif(not _has_torch(), reason="the torch extra is not installed")


def correlated(rows: int, features: int, seed: int) -> np.ndarray:
    """Strongly correlated, non-negative inputs (as after a ReLU): rounding choices interact."""
    rng = np.random.default_rng(seed)
    mix = np.eye(features) + 0.5 * rng.normal(size=(features, features))
    return np.maximum(rng.normal(size=(rows, features)) @ mix, 0).astype(np.float32)


def output_error(x: np.ndarray, w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> float:
    return float(np.mean((x @ (w - q * scale[:, None]).T) ** 2))


def on_grid(q: np.ndarray, w: np.ndarray, scale: np.ndarray) -> bool:
    ratio = w / scale[:, None]
    return bool(np.all((q == np.floor(ratio)) | (q == np.ceil(ratio))))


def test_soft_rounding_is_the_rectified_sigmoid():
    v = np.array([-50.0, -2.0, 0.0, 2.0, 50.0])
    expected = np.clip(1 / (1 + np.exp(-v)) * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(soft_rounding(v), expected)
    assert soft_rounding(v)[0] == 0 and soft_rounding(v)[-1] == 1


@needs_torch
def test_adaround_lowers_the_output_error_and_stays_within_one_step():
    x = correlated(3000, 24, seed=1)
    w = RNG.normal(size=(6, 24))
    scale = np.abs(w).max(axis=1) / 7  # a coarse grid, so rounding matters
    nearest = np.clip(np.rint(w / scale[:, None]), -8, 7)
    ours = adaround_rows(w, scale, (x.T @ x)[None], -8, 7, AdaRoundSettings(iterations=400))
    assert on_grid(ours, w, scale)
    assert output_error(x, w, ours, scale) < 0.8 * output_error(x, w, nearest, scale)


@needs_torch
def test_each_group_is_rounded_on_its_own_inputs():
    xs = [correlated(2000, 12, seed=s) for s in (2, 3)]
    w = RNG.normal(size=(8, 12))  # rows 0-3: group 0, rows 4-7: group 1
    scale = np.abs(w).max(axis=1) / 7
    grams = np.stack([x.T @ x for x in xs])
    ours = adaround_rows(w, scale, grams, -8, 7, AdaRoundSettings(iterations=400))
    assert on_grid(ours, w, scale)
    nearest = np.clip(np.rint(w / scale[:, None]), -8, 7)
    for g, x in enumerate(xs):
        rows = slice(4 * g, 4 * g + 4)
        ours_error = output_error(x, w[rows], ours[rows], scale[rows])
        assert ours_error < output_error(x, w[rows], nearest[rows], scale[rows])


@needs_torch
def test_weights_at_the_edge_of_the_range_stay_in_it():
    w = np.array([[1.0, -1.0, 0.5, 0.999]])
    scale = np.array([1.0 / 7])  # 1.0 -> 7 (qmax), -1.0 -> -7
    ours = adaround_rows(w, scale, np.eye(4)[None] * 100, -8, 7, AdaRoundSettings(iterations=50))
    assert ours.max() <= 7 and ours.min() >= -8 and on_grid(ours, w, scale)


# --------------------------------------------------------------------------- the int8 pass


def conv_model() -> onnx.ModelProto:
    w = RNG.normal(0, 0.3, (8, 6, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    b = np.zeros(8, np.float32)
    return make_model([node], [("input", ["N", 6, 8, 8])], ["y"], [tensor("w", w), tensor("b", b)])


def gemm_model() -> onnx.ModelProto:
    w = RNG.normal(0, 0.3, (10, 32)).astype(np.float32)
    node = helper.make_node("Gemm", ["input", "w", "b"], ["y"], name="gemm", transB=1)
    b = np.zeros(10, np.float32)
    return make_model([node], [("input", ["N", 32])], ["y"], [tensor("w", w), tensor("b", b)])


def conv_inputs() -> np.ndarray:
    flat = correlated(64 * 64, 6, seed=4)  # pixels with correlated channels
    return flat.reshape(64, 8, 8, 6).transpose(0, 3, 1, 2).copy()


LAYERS = {"conv": (conv_model, conv_inputs), "gemm": (gemm_model, lambda: correlated(512, 32, 5))}


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer(request, tmp_path_factory):
    """The float model, its calibration file and inputs, and int8 models by rounding."""
    folder = tmp_path_factory.mktemp(request.param)
    build, inputs = LAYERS[request.param]
    model, x = build(), inputs()
    source, calib = folder / "float.onnx", folder / "calib.npz"
    onnx.save(model, source)
    np.savez(calib, input=x)

    made: dict[str, Path] = {}

    def quantize(rounding: str, name: str | None = None) -> Path:
        out = folder / f"{name or rounding}.onnx"
        if out in made.values():
            return out
        with pytest.MonkeyPatch.context() as patch:  # a smaller budget: these layers are tiny
            fast = ("AdaRound", adaround_rounder(AdaRoundSettings(iterations=300)))
            patch.setitem(quantize_pass.ROUNDERS, "adaround", fast)
            convert(
                source,
                out,
                PipelineOptions(int8=QuantizeConfig(weight_rounding=rounding)),
                verify=None,
                force=True,
                calibration=DataOptions(data=calib, batch_size=16),
            )
        made[out.stem] = out
        return out

    return model, x, quantize


def int8_weight(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The integer weight of the model's single layer and its per-channel scale."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layer = next(n for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    dq = next(n for n in model.graph.node if n.output[0] == layer.input[1])
    return inits[dq.input[0]], inits[dq.input[1]]


def with_weight(model: onnx.ModelProto, weight: np.ndarray) -> onnx.ModelProto:
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for init in new.graph.initializer:
        if init.name == "w":
            init.CopyFrom(tensor("w", weight.astype(np.float32)))
    return new


def optimized_ops(path: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    return collections.Counter(n.op_type for n in optimized.graph.node)


@needs_torch
def test_adaround_layer_is_on_the_grid_and_closer_to_the_float_layer(layer):
    model, x, quantize = layer
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    (ours, scale), (nearest, scale_n) = (
        int8_weight(quantize("adaround")),
        int8_weight(quantize("nearest")),
    )
    np.testing.assert_array_equal(scale, scale_n)  # the grid is ONNX Runtime's, kept
    rows, per_row = w.reshape(len(w), -1), scale.astype(np.float64)
    assert on_grid(ours.reshape(len(w), -1).astype(np.float64), rows, per_row)
    assert np.abs(ours).max() <= 127 and np.any(ours != nearest)
    reference = run(model, {"input": x})[0]

    def error(q: np.ndarray) -> float:
        dequantized = q.astype(np.float64) * per_row.reshape((-1,) + (1,) * (q.ndim - 1))
        return float(
            np.mean((run(with_weight(model, dequantized), {"input": x})[0] - reference) ** 2)
        )

    assert error(ours) < error(nearest)


@needs_torch
def test_adaround_model_runs_fused_like_nearest_and_is_deterministic(layer):
    model, x, quantize = layer
    first, again, nearest = quantize("adaround"), quantize("adaround", "again"), quantize("nearest")
    ops = optimized_ops(first)
    assert ops == optimized_ops(nearest)
    assert ops["QLinearConv"] + ops["QGemm"] == 1 and ops["Conv"] + ops["Gemm"] == 0
    np.testing.assert_array_equal(int8_weight(first)[0], int8_weight(again)[0])
    out = run(onnx.load(first), {"input": x})[0]
    assert out.shape == run(model, {"input": x})[0].shape and np.all(np.isfinite(out))


# --------------------------------------------------------------------------- without torch


def test_adaround_without_torch_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what an environment without torch gives
    with pytest.raises(OptionError) as info:
        QuantizeConfig(weight_rounding="adaround")
    message = str(info.value)
    assert "--weight-rounding adaround" in message and "pip install 'onnxcomp[torch]'" in message
    assert "\n" not in message
    assert QuantizeConfig(weight_rounding="gptq")  # the other roundings do not need torch


def test_cli_adaround_without_torch_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(gemm_model(), model)
    np.savez(calib, input=correlated(16, 32, 6))
    args = ["convert", str(model), "-o", str(tmp_path / "o.onnx"), "--int8", "--calib", str(calib)]
    code = main([*args, "--weight-rounding", "adaround"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert "pip install 'onnxcomp[torch]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
