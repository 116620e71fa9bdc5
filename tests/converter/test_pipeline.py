"""Pipeline preconditions: options and every pass's requirements are checked before any pass."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from graphs import make_model
from onnx import helper

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.errors import OptionError


def _model() -> ir.Model:
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu")
    return ir.from_proto(make_model([relu], [("x", [1, 3])], ["y"], []))


class _Recorder(CompressionPass):
    """Records when it is checked and applied; may need data or refuse the model."""

    name = "recorder"

    def __init__(self, log, context, needs=None, refuse=None):
        super().__init__(context)
        self.log, self.needs, self.refuse = log, needs, refuse

    def requires_data(self):
        return self.needs

    def check(self, model):
        self.log.append(f"check {self.refuse or 'ok'}")
        if self.refuse:
            raise OptionError(self.refuse)

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.log.append("apply")


def test_every_check_runs_before_the_first_pass():
    log: list[str] = []
    context = PassContext()
    passes = [_Recorder(log, context), _Recorder(log, context, refuse="model is quantized")]
    with pytest.raises(OptionError, match="quantized"):
        Pipeline(passes).run(_model())
    assert log == ["check ok", "check model is quantized"]  # nothing applied


def test_a_pass_that_reads_data_needs_calibration(monkeypatch):
    def no_data_pass(*args, **kwargs):
        raise AssertionError("a data pass ran before the options were checked")

    monkeypatch.setattr(PassContext, "collect", no_data_pass)
    log: list[str] = []
    context = PassContext()
    passes = [_Recorder(log, context), _Recorder(log, context, needs="--prune-method thinet")]
    with pytest.raises(OptionError, match="--prune-method thinet reads calibration data"):
        Pipeline(passes).run(_model())
    assert "apply" not in log


def test_passes_run_when_their_preconditions_hold():
    log: list[str] = []
    Pipeline([_Recorder(log, PassContext())]).run(_model())
    assert log == ["check ok", "apply"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"equalize": "foo"}, "--equalize foo"),
        ({"target_opset": 5}, "--target-opset 5"),
    ],
)
def test_pipeline_options_are_checked_when_built(options, message):
    with pytest.raises(OptionError, match=message):
        PipelineOptions(**options)
