"""The backend interface (Backend, Session), ONNX Runtime's implementation and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.backends.base import Backend, Session, SessionConfig, run_by_name, time_ms
from onnxcomp.backends.ort import ORT, OrtSession
from onnxcomp.backends.registry import BACKENDS, DEFAULT_BACKEND, get_backend
from onnxcomp.errors import OnnxcompError, OptionError

W = np.arange(6, dtype=np.float32).reshape(3, 2)


def two_outputs() -> onnx.ModelProto:
    """Y = X @ W and Z = Relu(Y), input X [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Relu", ["Y"], ["Z"])],
        "two_outputs",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 2]),
        ],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_onnx_runtime_is_the_registered_default_backend():
    assert isinstance(ORT, Backend)
    assert set(BACKENDS) == {"onnxruntime", "tflite"} and DEFAULT_BACKEND == "onnxruntime"
    assert get_backend() is ORT and get_backend("onnxruntime") is ORT
    with pytest.raises(OptionError, match="backend coreml: choose one of onnxruntime, tflite"):
        get_backend("coreml")


def test_ort_session_runs_and_names_its_inputs_and_outputs(tmp_path: Path):
    config = SessionConfig(intra_op_threads=1)
    for source in (two_outputs(), two_outputs().SerializeToString()):
        session = ORT.create_session(source, config)
        assert isinstance(session, Session) and isinstance(session, OrtSession)
        assert isinstance(session.session, onnxruntime.InferenceSession)
        assert session.input_names == ["X"] and session.output_names == ["Y", "Z"]
        assert session.providers == ("CPUExecutionProvider",)
        x = np.array([[1.0, -2.0, 0.5]], np.float32)
        y, z = session.run({"X": x})
        np.testing.assert_allclose(y, x @ W, rtol=1e-6)
        np.testing.assert_allclose(z, np.maximum(x @ W, 0), rtol=1e-6)
        # run_by_name ignores feeds the model does not declare and names the outputs
        named = run_by_name(session, {"X": x, "unused": np.zeros(1)})
        assert list(named) == ["Y", "Z"]
        np.testing.assert_array_equal(named["Y"], y)
        runner = session.runner({"X": x})
        np.testing.assert_array_equal(runner()[0], y)


def test_ort_session_errors_are_one_line(tmp_path: Path):
    session = ORT.create_session(two_outputs(), SessionConfig())
    with pytest.raises(OnnxcompError, match="ONNX Runtime failed to run"):
        session.run({"X": np.zeros((1, 4), np.float32)})
    with pytest.raises(OnnxcompError, match="does not exist"):
        ORT.create_session(tmp_path / "missing.onnx", SessionConfig())


def test_time_ms_times_one_call():
    calls = []
    elapsed = time_ms(lambda: calls.append(sum(range(10000))))
    assert calls and 0.0 < elapsed < 10_000.0
