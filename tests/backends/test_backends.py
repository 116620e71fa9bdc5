"""Tests for the ONNX Runtime backend and the benchmark."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxcomp.backends import bench, ort
from onnxcomp.backends.bench import BenchResult, benchmark, compare_ratio, render_bench
from onnxcomp.backends.ort import SessionConfig, check_runtime_install, create_session, run
from onnxcomp.errors import OnnxcompError

RNG = np.random.default_rng(42)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
CONV_W = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
CONV_B = RNG.standard_normal(3).astype(np.float32)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def matmul_add_model(in_features: int = 4) -> onnx.ModelProto:
    """Y = X @ W + B with a dynamic batch dim."""
    weight = W if in_features == 4 else np.ones((in_features, 3), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Y"]),
        ],
        "matmul_add",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(B, "B")],
    )
    return _finish(graph)


def conv_model() -> onnx.ModelProto:
    """A 3x3 Conv with bias, no padding, on a fixed [1, 2, 5, 5] input."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[3, 3])],
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 3, 3])],
        [numpy_helper.from_array(CONV_W, "W"), numpy_helper.from_array(CONV_B, "B")],
    )
    return _finish(graph)


def conv_reference(x: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, CONV_W) + CONV_B[None, :, None, None]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def mm_path(tmp_path: Path) -> Path:
    return save(matmul_add_model(), tmp_path / "mm.onnx")


@pytest.fixture
def cpu1() -> SessionConfig:
    return SessionConfig(intra_op_threads=1, inter_op_threads=1)


# --- sessions -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "proto"])
def test_cpu_session_matches_numpy(mm_path: Path, cpu1: SessionConfig, kind: str) -> None:
    model = onnx.load(str(mm_path))
    source = {
        "path": mm_path,
        "str": str(mm_path),
        "bytes": model.SerializeToString(),
        "proto": model,
    }[kind]
    session = create_session(source, cpu1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    (y,) = run(session, {"X": x})
    np.testing.assert_allclose(y, x @ W + B, rtol=1e-5, atol=1e-5)


def test_conv_matches_numpy(tmp_path: Path, cpu1: SessionConfig) -> None:
    session = create_session(save(conv_model(), tmp_path / "conv.onnx"), cpu1)
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    (y,) = run(session, {"X": x})
    assert y.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(y, conv_reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("cuda", "CUDAExecutionProvider"),
        ("tensorrt", "TensorrtExecutionProvider"),
        ("CUDAExecutionProvider", "CUDAExecutionProvider"),
    ],
)
def test_unavailable_provider_is_clear_error(mm_path: Path, name: str, full: str) -> None:
    if full in onnxruntime.get_available_providers():
        pytest.skip(f"{full} is available here")
    with pytest.raises(OnnxcompError) as info:
        create_session(mm_path, SessionConfig(provider=name))
    message = str(info.value)
    assert full in message
    assert "CPUExecutionProvider" in message  # lists what is available
    assert "onnxcomp[gpu]" in message
    assert "onnxruntime-gpu" in message
    assert "--allow-cpu-fallback" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_cpu_fallback_runs_on_cpu(
    mm_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    if ort.PROVIDERS[name] in onnxruntime.get_available_providers():
        pytest.skip("provider is available here")
    with caplog.at_level(logging.WARNING, logger="onnxcomp.backends.ort"):
        session = create_session(mm_path, SessionConfig(provider=name, allow_cpu_fallback=True))
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert any("falling back" in r.getMessage() for r in caplog.records)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(run(session, {"X": x})[0], x @ W + B, rtol=1e-5)


def test_silent_ort_fallback_is_detected(
    mm_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ORT claims CUDA is available but the session ends up on CPU (libraries failed to load)."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is really available here")
    monkeypatch.setattr(
        ort.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ORT's own "not in available providers" warning
        with pytest.raises(OnnxcompError, match="fell back") as info:
            create_session(mm_path, SessionConfig(provider="cuda"))
        assert "--allow-cpu-fallback" in str(info.value)
        with caplog.at_level(logging.WARNING, logger="onnxcomp.backends.ort"):
            session = create_session(
                mm_path, SessionConfig(provider="cuda", allow_cpu_fallback=True)
            )
    assert "CUDAExecutionProvider" not in session.get_providers()
    assert caplog.records


def test_unknown_provider(mm_path: Path) -> None:
    with pytest.raises(OnnxcompError, match="unknown execution provider 'tpu'") as info:
        create_session(mm_path, SessionConfig(provider="tpu"))
    assert "cuda" in str(info.value)


def test_garbage_model_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(OnnxcompError) as info:
        create_session(path)
    assert "garbage.onnx" in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_truncated_model_file(mm_path: Path) -> None:
    mm_path.write_bytes(mm_path.read_bytes()[:40])
    with pytest.raises(OnnxcompError, match="could not load"):
        create_session(mm_path)


def test_invalid_graph(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "missing"], ["Y"])],
        "broken",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    with pytest.raises(OnnxcompError, match="could not load") as info:
        create_session(save(model, tmp_path / "broken.onnx"))
    assert "\n" not in str(info.value)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxcompError, match="does not exist"):
        create_session(tmp_path / "nope.onnx")


def test_session_options_applied(mm_path: Path) -> None:
    config = SessionConfig(intra_op_threads=2, inter_op_threads=1, optimization_level="basic")
    options = create_session(mm_path, config).get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options = create_session(mm_path, SessionConfig(intra_op_threads=1)).get_session_options()
    assert options.intra_op_num_threads == 1


def test_negative_threads_rejected(mm_path: Path) -> None:
    with pytest.raises(OnnxcompError, match="intra_op_threads"):
        create_session(mm_path, SessionConfig(intra_op_threads=-1))


def test_optimized_model_path(mm_path: Path, tmp_path: Path, cpu1: SessionConfig) -> None:
    out = tmp_path / "sub" / "optimized.onnx"
    config = SessionConfig(intra_op_threads=1, optimized_model_path=str(out))
    create_session(mm_path, config)
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)))
    x = np.ones((3, 4), np.float32)
    (y,) = run(create_session(out, cpu1), {"X": x})
    np.testing.assert_allclose(y, x @ W + B, rtol=1e-5)


def test_run_errors_are_clear(mm_path: Path, cpu1: SessionConfig) -> None:
    session = create_session(mm_path, cpu1)
    with pytest.raises(OnnxcompError, match="failed to run") as info:
        run(session, {"X": np.ones((2, 7), np.float32)})
    assert "\n" not in str(info.value)


def test_check_runtime_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_version(installed: set[str]):
        def version(name: str) -> str:
            if name in installed:
                return "1.20.0"
            raise ort.metadata.PackageNotFoundError(name)

        return version

    monkeypatch.setattr(ort.metadata, "version", fake_version({"onnxruntime"}))
    assert check_runtime_install() is None
    monkeypatch.setattr(ort.metadata, "version", fake_version({"onnxruntime", "onnxruntime-gpu"}))
    warning = check_runtime_install()
    assert warning is not None
    assert "onnxruntime-gpu" in warning
    assert "onnxruntime 1.20.0" in warning


# --- benchmark ------------------------------------------------------------------------------


def test_benchmark_results_are_sane(mm_path: Path, tmp_path: Path, cpu1: SessionConfig) -> None:
    other = save(matmul_add_model(), tmp_path / "mm2.onnx")
    calls: list[tuple[str, float]] = []
    results = benchmark(
        [mm_path, other],
        cpu1,
        batch=4,
        warmup=2,
        iterations=15,
        progress=lambda desc, frac: calls.append((desc, frac)),
    )
    assert [r.model for r in results] == [str(mm_path), str(other)]
    for result in results:
        assert result.iterations == 15
        assert result.batch == 4
        assert 0 < result.latency_p50_ms <= result.latency_p90_ms <= result.latency_p99_ms
        assert result.latency_mean_ms > 0
        assert result.throughput == pytest.approx(4 / (result.latency_mean_ms / 1000))
        assert result.memory_growth_bytes >= 0
        assert result.process_peak_rss_bytes > 10 * 2**20
        assert "CPUExecutionProvider" in result.providers
    assert calls
    assert calls[-1][1] == 1.0
    assert all(0.0 <= frac <= 1.0 for _, frac in calls)


def test_benchmark_min_time_runs_minimum_iterations(mm_path: Path, cpu1: SessionConfig) -> None:
    (result,) = benchmark([mm_path], cpu1, warmup=0, min_time_s=0.0)
    assert result.iterations == bench.MIN_ITERATIONS


class FakeSession:
    """Records the order of run calls (a :class:`onnxcomp.backends.base.Session`)."""

    providers = ("CPUExecutionProvider",)

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.input_names = ["X"]
        self.output_names = ["X"]

    def run(self, feeds):
        assert set(feeds) == {"X"}
        self.log.append(self.name)
        return [feeds["X"]]

    def runner(self, feeds):
        return lambda: self.run(feeds)


class FakeBackend:
    """Creates FakeSessions named after the model file."""

    name = "fake"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def create_session(self, model, config):
        return FakeSession(Path(model).stem, self.log)


def test_benchmark_interleaves_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu1: SessionConfig
) -> None:
    a = save(matmul_add_model(), tmp_path / "a.onnx")
    b = save(matmul_add_model(), tmp_path / "b.onnx")
    log: list[str] = []
    monkeypatch.setattr(bench, "_block_size", lambda call, models: 2)
    results = benchmark([a, b], cpu1, warmup=3, iterations=5, backend=FakeBackend(log))
    # warm-up each, then turns of 2 runs (the last turn cut to what is left)
    assert log == ["a"] * 3 + ["b"] * 3 + ["a", "a", "b", "b"] * 2 + ["a", "b"]
    assert [r.iterations for r in results] == [5, 5]


def test_block_size_is_one_for_a_single_model_and_bounded() -> None:
    log: list[str] = []
    session = FakeSession("a", log)
    call = session.runner({"X": np.zeros(1, np.float32)})
    assert bench._block_size(call, 1) == 1
    assert 1 <= bench._block_size(call, 2) <= 1000


def test_benchmark_rejects_mismatched_inputs(tmp_path: Path, cpu1: SessionConfig) -> None:
    a = save(matmul_add_model(), tmp_path / "a.onnx")
    b = save(matmul_add_model(in_features=5), tmp_path / "b.onnx")
    with pytest.raises(OnnxcompError, match="different inputs"):
        benchmark([a, b], cpu1, iterations=1)
    conv = save(conv_model(), tmp_path / "conv.onnx")
    with pytest.raises(OnnxcompError, match="different inputs"):
        benchmark([a, conv], cpu1, iterations=1)


def test_benchmark_bad_arguments(mm_path: Path, tmp_path: Path, cpu1: SessionConfig) -> None:
    with pytest.raises(OnnxcompError, match="no model"):
        benchmark([], cpu1)
    with pytest.raises(OnnxcompError, match="batch"):
        benchmark([mm_path], cpu1, batch=0)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not onnx")
    with pytest.raises(OnnxcompError, match=r"garbage\.onnx"):
        benchmark([garbage], cpu1, iterations=1)


def _result(model: str, p50: float) -> BenchResult:
    return BenchResult(
        model=model,
        providers=("CPUExecutionProvider",),
        batch=1,
        iterations=20,
        latency_p50_ms=p50,
        latency_p90_ms=p50 * 1.2,
        latency_p99_ms=p50 * 1.5,
        latency_mean_ms=p50 * 1.1,
        throughput=1000 / (p50 * 1.1),
        memory_growth_bytes=3 * 2**20,
        process_peak_rss_bytes=200 * 2**20,
    )


def test_compare_ratio() -> None:
    assert compare_ratio(_result("a", 10.0), _result("b", 5.0)) == pytest.approx(2.0)
    assert compare_ratio(_result("a", 10.0), _result("b", 20.0)) == pytest.approx(0.5)


def test_render_bench() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    render_bench([_result("base.onnx", 10.0), _result("small.onnx", 4.0)], console)
    text = buffer.getvalue()
    assert "base.onnx" in text
    assert "small.onnx" in text
    assert "2.50x" in text
    assert "base " in text or text.count(" base") >= 1
    assert "200.0 MiB" in text
    with pytest.raises(OnnxcompError, match="baseline"):
        render_bench([_result("a", 1.0)], console, baseline_index=3)
