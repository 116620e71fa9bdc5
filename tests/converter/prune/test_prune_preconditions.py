"""Options and preconditions of pruning and low-rank, refused before any pass or data pass."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import make_model, tensor
from onnx import helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.lowrank import LowRankConfig
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.prune import PruneConfig
from onnxcomp.errors import OptionError


@pytest.mark.parametrize(
    "make",
    [
        lambda: PruneConfig(ratio=1.5),
        lambda: PruneConfig(method="foo"),
        lambda: PruneConfig(macs=0.0),
        lambda: PruneConfig(refit_samples=0),
        lambda: LowRankConfig(rank_energy=2.0),
        lambda: LowRankConfig(output_error=1.0),
        lambda: LowRankConfig(methods=()),
    ],
)
def test_a_wrong_value_is_refused_when_the_config_is_made(make):
    with pytest.raises(OptionError):
        make()


def conv_pair() -> ir.Model:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "a"], ["h"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="R"),
        helper.make_node("Conv", ["r", "b"], ["y"], name="B", pads=[1, 1, 1, 1]),
    ]
    inits = [
        tensor("a", rng.normal(size=(8, 3, 3, 3)).astype(np.float32)),
        tensor("b", rng.normal(size=(4, 8, 3, 3)).astype(np.float32)),
    ]
    return ir.from_proto(make_model(nodes, [("x", [1, 3, 6, 6])], ["y"], inits))


@pytest.mark.parametrize(
    ("options", "option"),
    [
        (PipelineOptions(prune=PruneConfig(method="thinet")), "--prune-method thinet"),
        (PipelineOptions(prune=PruneConfig(ratio=None, macs=0.5)), "--prune-macs"),
        (PipelineOptions(lowrank=LowRankConfig(output_error=0.1)), "--rank-error"),
        (PipelineOptions(lowrank=LowRankConfig(refit=True)), "--lowrank-refit"),
    ],
)
def test_a_pass_that_needs_data_is_refused_before_any_data_pass(monkeypatch, options, option):
    def no_data_pass(*args, **kwargs):
        raise AssertionError("a data pass ran")

    monkeypatch.setattr(PassContext, "collect", no_data_pass)
    model = conv_pair()
    pipeline = Pipeline.from_options(options, PassContext())
    with pytest.raises(OptionError, match=option):
        pipeline.check(model)
    with pytest.raises(OptionError, match="--calib"):
        pipeline.run(model)
    assert [n.name for n in model.graph] == ["A", "R", "B"]  # no pass ran


def test_a_quantized_model_is_refused_by_the_check():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ"),
    ]
    inits = [tensor("s", np.float32(0.1)), tensor("z", np.uint8(128))]
    model = ir.from_proto(make_model(nodes, [("x", [1, 4])], ["y"], inits))
    pipeline = Pipeline.from_options(PipelineOptions(prune=PruneConfig()), PassContext())
    with pytest.raises(OptionError, match="quantized"):
        pipeline.check(model)
