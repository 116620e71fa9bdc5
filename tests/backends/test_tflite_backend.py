"""The TFLite backend on a .tflite built independently of onnxcomp's writer, and `bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from onnxcomp.backends.base import Backend, Session, SessionConfig
from onnxcomp.backends.bench import benchmark
from onnxcomp.backends.registry import backend_for_path, get_backend
from onnxcomp.backends.tflite import TFLITE
from onnxcomp.errors import OnnxcompError

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10 - 0.5  # [out, in]
B = np.float32([0.5, -1.0, 2.0])


def reference_tflite() -> bytes:
    """x [N, 4] -> FULLY_CONNECTED(W, B) with fused RELU -> y [N, 3], written with the raw
    TFLite schema classes (not onnxcomp's writer): an independent reference file."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    buffers = [fb.BufferT()]
    tensors = []
    specs = (("x", [1, 4], None), ("w", [3, 4], W), ("b", [3], B), ("y", [1, 3], None))
    for name, shape, data in specs:
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, fb.TensorType.FLOAT32, 0
        if data is not None:
            buffer = fb.BufferT()
            buffer.data = np.frombuffer(data.tobytes(), np.uint8)
            buffers.append(buffer)
            t.buffer = len(buffers) - 1
        if name == "x":
            t.shapeSignature = [-1, 4]
        tensors.append(t)
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = fb.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = fb.FullyConnectedOptionsT()
    op.builtinOptions.fusedActivationFunction = fb.ActivationFunctionType.RELU
    graph = fb.SubGraphT()
    graph.tensors, graph.operators, graph.inputs, graph.outputs = tensors, [op], [0], [3]
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    pytest.importorskip("ai_edge_litert")
    path = tmp_path / "reference.tflite"
    path.write_bytes(reference_tflite())
    return path


def test_backend_is_registered_and_chosen_by_suffix():
    assert isinstance(TFLITE, Backend)
    assert get_backend("tflite") is TFLITE
    assert backend_for_path("m.tflite") is TFLITE
    assert backend_for_path("m.onnx").name == "onnxruntime"


def test_reference_file_runs_and_matches_numpy(model_file: Path):
    session = TFLITE.create_session(model_file, SessionConfig())
    assert isinstance(session, Session)
    assert session.input_names == ["x"] and session.output_names == ["y"]
    x = np.random.default_rng(0).normal(0, 1, (5, 4)).astype(np.float32)  # resized from 1 to 5
    (y,) = session.run({"x": x})
    assert np.allclose(y, np.maximum(x @ W.T + B, 0), atol=1e-5)
    (from_bytes,) = TFLITE.create_session(model_file.read_bytes(), SessionConfig()).run({"x": x})
    assert np.array_equal(from_bytes, y)
    spec = TFLITE.input_specs(model_file)[0]
    assert spec.name == "x" and spec.shape == (None, 4) and spec.dtype == np.float32


def test_bench_times_a_tflite_file(model_file: Path):
    (result,) = benchmark([model_file], SessionConfig(), batch=3, iterations=3, warmup=1)
    assert result.providers == ("TFLiteInterpreter",) and result.batch == 3
    assert result.iterations == 3


def test_bench_cli_on_a_tflite_file(model_file: Path):
    from typer.testing import CliRunner

    from onnxcomp.cli.root import app

    result = CliRunner().invoke(app, ["bench", str(model_file), "--iterations", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert '"TFLiteInterpreter"' in result.output


def test_bench_refuses_mixing_runtimes(model_file: Path, tmp_path: Path):
    other = tmp_path / "m.onnx"
    other.write_bytes(b"")
    with pytest.raises(OnnxcompError, match="need different runtimes"):
        benchmark([model_file, other], SessionConfig(), iterations=1)


def test_errors_are_one_line(model_file: Path, tmp_path: Path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    with pytest.raises(OnnxcompError, match="TFLite could not load") as error:
        TFLITE.create_session(broken, SessionConfig())
    assert "\n" not in str(error.value)
    with pytest.raises(OnnxcompError, match="does not exist"):
        TFLITE.create_session(tmp_path / "missing.tflite", SessionConfig())
    with pytest.raises(OnnxcompError, match="CPU only"):
        TFLITE.create_session(model_file, SessionConfig(provider="cuda"))
    with pytest.raises(OnnxcompError, match="no feed for input"):
        TFLITE.create_session(model_file, SessionConfig()).run({})


def test_missing_ai_edge_litert_names_the_extra(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    with pytest.raises(OnnxcompError, match=r"pip install 'onnxcomp\[tflite\]'"):
        TFLITE.create_session(tmp_path / "m.tflite", SessionConfig())
