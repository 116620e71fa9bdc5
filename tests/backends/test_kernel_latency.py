"""The kernel latency lookup: its one-conv models against numpy, and its disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp.backends import kernel_latency
from onnxcomp.backends.kernel_latency import ConvGeometry, KernelLatency, conv_model
from onnxcomp.backends.ort import create_session
from onnxcomp.errors import OnnxcompError, OptionError

SMALL = ConvGeometry(3, 4, 3, 2, 1, 7, 7, batch=2)


def numpy_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Direct convolution, loop over the kernel window (the reference)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(np.float64)
    k = w.shape[2]
    h = (x.shape[2] - k) // stride + 1
    v = (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h, v)) + b[None, :, None, None]
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i : i + stride * h : stride, j : j + stride * v : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_fp32_model_is_the_convolution_of_the_geometry():
    model, feeds = conv_model(SMALL, "fp32")
    (y,) = create_session(model.SerializeToString()).run(None, feeds)
    w = arrays(model)
    expected = numpy_conv(feeds["x"], w["w"], w["b"], stride=2, pad=1)
    assert y.shape == (2, 4, *SMALL.out_size) == (2, 4, 4, 4)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert SMALL.macs == 2 * 4 * 16 * 3 * 9


def test_int8_model_runs_as_quantized_convolution():
    """uint8 in, uint8 out: the dequantized conv, requantized (one step of rounding)."""
    model, feeds = conv_model(SMALL, "int8")
    (y,) = create_session(model.SerializeToString()).run(None, feeds)
    a = arrays(model)
    x = (feeds["x"].astype(np.float64) - 128) * a["x_scale"]
    w = a["w_q"] * a["w_scale"][:, None, None, None].astype(np.float64)
    b = a["b_q"] * a["b_scale"].astype(np.float64)
    expected = np.clip(np.round(numpy_conv(x, w, b, 2, 1) / a["y_scale"]) + 128, 0, 255)
    assert y.dtype == np.uint8
    assert np.abs(y.astype(int) - expected).max() <= 1


def counting_timer(calls: list[tuple[int, ...]]):
    def timer(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        shape = tuple(int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim)
        calls.append(shape)
        return 1e-3 * shape[1]

    return timer


def test_second_lookup_measures_nothing_in_memory_and_from_disk(tmp_path: Path):
    cache = tmp_path / "lat" / "kernel_latency.json"
    calls: list[tuple[int, ...]] = []
    geometries = [ConvGeometry(c, 8, 3, 1, 1, 8, 8) for c in (4, 8, 4)]
    first = KernelLatency(cache, timer=counting_timer(calls), rounds=1)
    assert first.many(geometries, "int8") == pytest.approx([4e-3, 8e-3, 4e-3])
    assert len(calls) == 2 and first.measured == 2  # the repeated geometry once
    assert first.seconds(geometries[1], "int8") == pytest.approx(8e-3)
    assert len(calls) == 2

    def fail(model, feeds):
        raise AssertionError("measured again")

    second = KernelLatency(cache, timer=fail)
    assert second.many(geometries, "int8") == pytest.approx([4e-3, 8e-3, 4e-3])
    assert second.measured == 0
    # Another precision is another kernel: measured.
    third = KernelLatency(cache, timer=counting_timer(calls), rounds=1)
    third.seconds(geometries[0], "fp32")
    assert third.measured == 1 and len(json.loads(cache.read_text())) == 3


def test_cache_is_keyed_by_runtime_cpu_and_threads(tmp_path: Path, monkeypatch):
    cache = tmp_path / "kernel_latency.json"
    calls: list[tuple[int, ...]] = []
    geometry = ConvGeometry(4, 8, 3, 1, 1, 8, 8)
    KernelLatency(cache, threads=2, timer=counting_timer(calls), rounds=1).seconds(geometry, "fp32")
    KernelLatency(cache, threads=1, timer=counting_timer(calls), rounds=1).seconds(geometry, "fp32")
    assert len(calls) == 2
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    KernelLatency(cache, threads=2, timer=counting_timer(calls), rounds=1).seconds(geometry, "fp32")
    assert len(calls) == 3
    assert any(key.startswith("ort0.0.1|") for key in json.loads(cache.read_text()))


def test_new_geometries_are_timed_in_rounds_and_the_fastest_kept():
    """A burst of load (the slow first round of the first geometry) does not stick."""
    readings = iter([9.0, 2.0, 1.0, 3.0, 5.0, 2.5])  # round 1: a, b; round 2: a, b; ...
    order: list[int] = []

    def timer(model, feeds):
        order.append(model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)
        return next(readings)

    lookup = KernelLatency(None, timer=timer, rounds=3)
    a, b = ConvGeometry(4, 8, 3, 1, 1, 8, 8), ConvGeometry(8, 8, 3, 1, 1, 8, 8)
    assert lookup.many([a, b], "fp32") == [1.0, 2.0]
    assert order == [4, 8, 4, 8, 4, 8] and lookup.measured == 2


def test_default_cache_path_follows_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(kernel_latency.CACHE_ENV, str(tmp_path))
    assert kernel_latency.default_cache_path() == tmp_path / "kernel_latency.json"


def test_bad_inputs_are_one_line_errors(tmp_path: Path):
    with pytest.raises(OptionError, match="precision 'int4'"):
        conv_model(SMALL, "int4")
    with pytest.raises(OptionError, match="precision"):
        KernelLatency(None, timer=lambda m, f: 0.0).seconds(SMALL, "int4")
    with pytest.raises(OptionError, match="must be >= 1"):
        ConvGeometry(0, 4, 3, 1, 1, 8, 8)
    broken = tmp_path / "kernel_latency.json"
    broken.write_text("{not json")
    with pytest.raises(OnnxcompError, match="delete it to measure again"):
        KernelLatency(broken, timer=lambda m, f: 0.0)
