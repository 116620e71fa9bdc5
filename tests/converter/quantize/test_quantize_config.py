"""--int8's options and preconditions are checked before any pass and any data pass."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from int8_models import minmax_ranges, quantize, small_cnn

from onnxcomp.backends.targets import TARGETS
from onnxcomp.cli import main
from onnxcomp.converter.base import PassContext
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"calibration": "magic"}, "--calibration magic: choose one of minmax"),
        ({"target": "gpu"}, "--target gpu: choose one of x86, x86-vnni, x86-avx2, arm, tensorrt"),
        ({"activation_type": "int7"}, "--activation-type int7: choose uint8 or int8"),
        ({"weight_rounding": "up"}, "--weight-rounding up: choose nearest, gptq, adaround"),
        ({"percentile": 0.0}, "--percentile 0.0"),
        ({"percentile": 100.5}, "--percentile 100.5"),
        ({"percentile": math.nan}, "--percentile nan"),
        ({"max_drop": -1.0}, "--max-drop -1.0"),
        ({"max_drop": math.inf}, "--max-drop inf"),
        ({"bins": 7}, "bins 7"),
        ({"bins": 2049}, "bins 2049"),
        ({"bins": 16}, "bins 16"),
        ({"max_float_fraction": 1.5}, "max_float_fraction 1.5"),
    ],
)
def test_each_wrong_value_is_refused_when_the_config_is_made(values, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        QuantizeConfig(**values)


def test_every_wrong_value_is_named_in_one_line():
    with pytest.raises(OptionError) as info:
        QuantizeConfig(target="gpu", activation_type="int7")
    assert "--target gpu" in str(info.value) and "--activation-type int7" in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_values_are_accepted_and_the_target_resolves_the_scheme():
    assert QuantizeConfig(percentile=100.0, max_drop=0.0, bins=128, weight_rounding="gptq")
    x86 = QuantizeConfig().qdq
    assert (x86.activation_type, x86.per_channel) == ("uint8", True)
    assert QuantizeConfig(target="tensorrt").qdq.activation_type == "int8"
    assert QuantizeConfig(target="tensorrt").calibration_settings.symmetric
    assert not QuantizeConfig(target="arm").calibration_settings.symmetric
    assert QuantizeConfig(target="x86", activation_type="int8").qdq.activation_type == "int8"
    assert not QuantizeConfig(per_channel=False).qdq.per_channel
    for name, target in TARGETS.items():
        config = QuantizeConfig(target=name)
        assert config.target_spec is target
        assert config.qdq.activation_type == target.activation_type
        assert config.qdq.per_channel == target.per_channel_weights


@pytest.fixture
def no_data_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data pass ran before the preconditions were checked")

    monkeypatch.setattr(PassContext, "collect", refuse)


def _float_model() -> ir.Model:
    return ir.from_proto(small_cnn())


def test_already_quantized_model_is_refused_before_any_pass(no_data_pass, tmp_path: Path):
    float_model = small_cnn()
    inputs = np.random.default_rng(0).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    quantized = ir.from_proto(quantize(float_model, minmax_ranges(float_model, inputs)))
    np.savez(tmp_path / "calib.npz", input=inputs)
    context = PassContext(calibration=DataOptions(data=tmp_path / "calib.npz"))
    pipeline = Pipeline.from_options(PipelineOptions(int8=QuantizeConfig()), context)
    with pytest.raises(OptionError, match=r"already quantized .*QuantizeLinear"):
        pipeline.check(quantized)
    with pytest.raises(OptionError, match="already quantized"):
        pipeline.run(quantized)
    pipeline.check(_float_model())  # the float model passes


def test_int8_without_data_is_refused_before_any_pass(no_data_pass):
    pipeline = Pipeline.from_options(PipelineOptions(int8=QuantizeConfig()), PassContext())
    with pytest.raises(OptionError, match="--int8 reads calibration data"):
        pipeline.run(_float_model())


def test_max_drop_without_data_is_refused_before_any_pass(no_data_pass, tmp_path: Path):
    # a complete calibration cache needs no calibration data, but --max-drop still measures
    cache = tmp_path / "table.json"
    cache.write_text("{}")
    config = QuantizeConfig(calib_cache=cache, max_drop=1.0)
    pipeline = Pipeline.from_options(PipelineOptions(int8=config), PassContext())
    with pytest.raises(OptionError, match="--max-drop needs data"):
        pipeline.run(_float_model())
    with_data = PassContext(evaluation=DataOptions(data=tmp_path / "eval.npz"))
    Pipeline.from_options(PipelineOptions(int8=config), with_data).check(_float_model())


def test_float_model_proto_is_untouched_by_the_checks():
    proto = small_cnn()
    before = proto.SerializeToString()
    Pipeline.from_options(
        PipelineOptions(int8=QuantizeConfig()), PassContext(calibration=DataOptions())
    ).check(ir.from_proto(proto))
    assert onnx.ModelProto.FromString(before) == proto


def test_cli_wrong_activation_type_is_one_line_before_any_data_pass(
    no_data_pass, tmp_path: Path, capsys
):
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.zeros((4, 3, 8, 8), np.float32))
    argv = ["convert", str(model), "-o", str(tmp_path / "o.onnx"), "--int8", "--calib", str(calib)]
    code = main([*argv, "--activation-type", "int7"])
    err = capsys.readouterr().err
    # The CLI refuses the choice itself (Typer), in one line naming the option and the value.
    assert code == 2 and "--activation-type" in err and "int7" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
