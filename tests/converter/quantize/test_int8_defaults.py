"""Defaults decided from the model and the CPU: weight bits (VNNI or not), bias correction
(depthwise convolutions)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from int8_models import small_cnn
from onnx import numpy_helper

from onnxcomp.backends import targets
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.quantize import QuantizeConfig
from onnxcomp.data.batches import DataOptions

RNG = np.random.default_rng(11)


def depthwise_cnn() -> onnx.ModelProto:
    """The small CNN with a depthwise second convolution (8 groups of one channel)."""
    return small_cnn(seed=11, group=8)


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to run on an x86 CPU with the given flags."""

    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(targets, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(targets.platform, "machine", lambda: "x86_64")

    return set_flags


def test_x86_weight_bits_follow_the_cpu(cpu):
    cpu("avx2")
    assert QuantizeConfig().qdq.reduce_range is True
    assert "7-bit" in QuantizeConfig().weight_bits()[1]
    cpu("avx2", "avx512_vnni")
    assert QuantizeConfig().qdq.reduce_range is False
    # What the user says wins, and explicit targets ignore the CPU.
    assert QuantizeConfig(reduce_range=True).qdq.reduce_range is True
    cpu("avx2")
    assert QuantizeConfig(reduce_range=False).qdq.reduce_range is False
    assert QuantizeConfig(target="x86-vnni").qdq.reduce_range is False
    assert QuantizeConfig(target="tensorrt").qdq.reduce_range is False


def test_bias_correction_is_on_for_depthwise_models_only():
    config, notes = QuantizeConfig().resolved_for(ir.from_proto(depthwise_cnn()))
    assert config.bias_correction is True
    assert any("1 depthwise convolution" in n for n in notes)
    config, notes = QuantizeConfig().resolved_for(ir.from_proto(small_cnn()))
    assert config.bias_correction is False and not any("bias" in n for n in notes)
    config, _ = QuantizeConfig(bias_correction=False).resolved_for(ir.from_proto(depthwise_cnn()))
    assert config.bias_correction is False


def _int8_biases(path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    return {
        i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("b2")
    }


def test_convert_reports_and_applies_the_choices(tmp_path, cpu):
    cpu("avx2")
    source = tmp_path / "dw.onnx"
    onnx.save(depthwise_cnn(), source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=RNG.normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    data = DataOptions(data=calib)
    reports = {}
    for name, config in (
        ("auto", QuantizeConfig()),
        ("off", QuantizeConfig(bias_correction=False)),
    ):
        out = tmp_path / f"{name}.onnx"
        reports[name] = convert(source, out, PipelineOptions(int8=config), None, calibration=data)
    changes = next(r for r in reports["auto"].records if r.name == "int8").changes
    assert any("bias correction on" in c for c in changes)
    assert any(c.startswith("bias correction: ") for c in changes)
    assert "weights: 7-bit (this CPU has no VNNI: 7-bit weights (--target x86-vnni for 8-bit))" in (
        changes
    )
    # Bias correction changed the depthwise layer's int32 bias; without it, it is untouched.
    auto, off = _int8_biases(tmp_path / "auto.onnx"), _int8_biases(tmp_path / "off.onnx")
    assert auto.keys() == off.keys() and auto
    assert any(not np.array_equal(auto[k], off[k]) for k in auto)
