"""Loading and saving: external data both ways, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from graphs import RNG, conv_bn

from onnxcomp.converter.convert import convert
from onnxcomp.core import io


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    """Models over the threshold (about 1.8 GB) go to <name>.data next to the model."""
    source = tmp_path / "m.onnx"
    onnx.save(conv_bn(), source)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "out.onnx"
    report = convert(source, out)
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    assert report.fidelity.relative_error < 1e-5
    proto = onnx.load(out, load_external_data=False)
    assert all(
        entry.value == "out.onnx.data"
        for init in proto.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    )
    x = RNG.normal(size=(1, 4, 5, 5)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape == (1, 6, 5, 5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxcomp-")]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    source = tmp_path / "m.onnx"
    onnx.save(conv_bn(), source)
    model = io.load_model(source)
    out = tmp_path / "out.onnx"
    try:
        with io.staged_save(model, out) as staged:
            assert staged.exists() and not out.exists()
            raise RuntimeError("verification failed")
    except RuntimeError:
        pass
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
