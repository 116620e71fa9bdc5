"""The binarize pass against numpy: alpha = mean |W|, signs, a binarized Conv equal to numpy's
convolution with alpha x sign(W); exclusions, depthwise layers, preconditions refused before
any data pass, and ONNX Runtime's fused graph (QLinearConv) with QDQ activations."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import make_model, tensor
from int8_models import small_cnn
from onnx import helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.binarize import BINARIZED_MARK, BinarizeConfig, BinarizePass
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.prune import PruneConfig
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError

RNG = np.random.default_rng(0)


def run(model: ir.Model | onnx.ModelProto, x: np.ndarray, optimize: bool = False):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def optimized_ops(model: ir.Model, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def numpy_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Direct convolution (stride 1) in float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64)) + b[None, :, None, None]


def one_conv() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    w = RNG.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)
    w[2, 1, 0, 0] = 0.0  # sign(0) = +1
    b = RNG.normal(0, 0.1, 6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [("x", [2, 4, 5, 5])], ["y"], [tensor("w", w), tensor("b", b)])
    return ir.from_proto(model), w, b


def test_alpha_is_mean_abs_per_channel_and_the_conv_equals_numpy():
    model, w, b = one_conv()
    result = BinarizePass(BinarizeConfig(first_last=True))(model)
    assert result.modified
    signs = model.graph.initializers["w"].const_value.numpy()
    alpha = model.graph.initializers["w_alpha"].const_value.numpy()
    assert signs.dtype == np.int8 and set(np.unique(signs)) == {-1, 1}
    np.testing.assert_array_equal(signs, np.where(w >= 0, 1, -1))
    assert signs[2, 1, 0, 0] == 1
    np.testing.assert_allclose(alpha, np.abs(w).reshape(6, -1).mean(axis=1), rtol=1e-6)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].as_int() == 0
    x = RNG.normal(size=(2, 4, 5, 5)).astype(np.float32)
    expected = numpy_conv(x, alpha[:, None, None, None] * np.sign(w + (w == 0)), b, pad=1)
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)
    mark = json.loads(model.metadata_props[BINARIZED_MARK])
    assert mark == {"mode": "weights", "weights": ["w"]}


def test_first_and_last_layers_stay_float_unless_asked():
    model = ir.from_proto(small_cnn())
    record = BinarizePass(BinarizeConfig())(model).record
    reasons = {s.node: s.reason for s in record.skipped}
    assert "first weighted layer" in reasons["conv1"] and "last weighted layer" in reasons["fc"]
    assert model.graph.initializers["w2"].const_value.dtype == ir.DataType.INT8
    assert model.graph.initializers["w1"].const_value.dtype == ir.DataType.FLOAT
    model = ir.from_proto(small_cnn())
    record = BinarizePass(BinarizeConfig(first_last=True, exclude=("co*2",)))(model).record
    assert [(s.node, s.reason) for s in record.skipped] == [
        ("conv2", "excluded by --binarize-exclude")
    ]
    gemm = model.graph.initializers["wf"]  # Gemm transB=1: output channels on axis 0
    assert gemm.const_value.dtype == ir.DataType.INT8
    assert model.graph.initializers["wf_alpha"].const_value.numpy().shape == (10,)


def test_depthwise_stays_float_with_its_reason_and_grouped_is_binarized():
    model = ir.from_proto(small_cnn(group=8))
    record = BinarizePass(BinarizeConfig(first_last=True))(model).record
    (skip,) = record.skipped
    assert skip.node == "conv2" and "depthwise" in skip.reason
    assert model.graph.initializers["w2"].const_value.dtype == ir.DataType.FLOAT
    grouped = ir.from_proto(small_cnn(group=2))
    x = RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)
    w2 = grouped.graph.initializers["w2"].const_value.numpy().copy()
    record = BinarizePass(BinarizeConfig(first_last=True))(grouped).record
    assert record.skipped == []
    alpha = grouped.graph.initializers["w2_alpha"].const_value.numpy()
    np.testing.assert_allclose(alpha, np.abs(w2).reshape(8, -1).mean(axis=1), rtol=1e-6)
    reference = ir.from_proto(small_cnn(group=2))
    for name in ("w1", "w2", "wf"):
        value = reference.graph.initializers[name]
        w = value.const_value.numpy()
        axes = tuple(range(1, w.ndim))
        value.const_value = ir.tensor(
            (np.abs(w).mean(axis=axes, keepdims=True) * np.where(w >= 0, 1, -1)).astype(np.float32)
        )
    np.testing.assert_allclose(run(grouped, x), run(reference, x), rtol=1e-5, atol=1e-5)


def no_data_pass(*args, **kwargs):
    raise AssertionError("a data pass ran")


def int8_model() -> ir.Model:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ"),
    ]
    inits = [tensor("s", np.float32(0.1)), tensor("z", np.uint8(128))]
    return ir.from_proto(make_model(nodes, [("x", [1, 4])], ["y"], inits))


def no_layer_model() -> ir.Model:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="R")]
    return ir.from_proto(make_model(nodes, [("x", [1, 4])], ["y"], []))


def binarized_model() -> ir.Model:
    model = ir.from_proto(small_cnn())
    BinarizePass(BinarizeConfig(first_last=True))(model)
    return model


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (int8_model, PipelineOptions(binarize=BinarizeConfig()), "quantized"),
        (binarized_model, PipelineOptions(binarize=BinarizeConfig()), "already binarized"),
        (no_layer_model, PipelineOptions(binarize=BinarizeConfig()), "no Conv or Gemm"),
        (binarized_model, PipelineOptions(prune=PruneConfig(ratio=0.5)), "binarized"),
        (
            lambda: ir.from_proto(small_cnn()),
            PipelineOptions(binarize=BinarizeConfig(mode="full")),
            "--binarize full reads calibration data",
        ),
    ],
)
def test_preconditions_are_refused_in_one_line_before_any_data_pass(
    monkeypatch, make, options, message
):
    monkeypatch.setattr(PassContext, "collect", no_data_pass)
    model = make()
    before = [n.op_type for n in model.graph]
    with pytest.raises(OptionError, match=message) as error:
        Pipeline.from_options(options, PassContext()).run(model)
    assert "\n" not in str(error.value)
    assert [n.op_type for n in model.graph] == before


@pytest.mark.parametrize(
    "make",
    [
        lambda: BinarizeConfig(mode="ternary"),
        lambda: BinarizeConfig(exclude=("",)),
        lambda: PipelineOptions(binarize=BinarizeConfig(), prune=PruneConfig()),
    ],
)
def test_wrong_options_are_refused_when_made(make):
    with pytest.raises(OptionError):
        make()


def calibrated(tmp_path, mode: str) -> tuple[ir.Model, ir.Model, np.ndarray]:
    x = RNG.normal(size=(32, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    context = PassContext(calibration=DataOptions(data=tmp_path / "calib.npy", batch_size=16))
    model = ir.from_proto(small_cnn(batch=1))
    BinarizePass(BinarizeConfig(mode=mode, first_last=True), context)(model)
    plain = ir.from_proto(small_cnn(batch=1))
    BinarizePass(BinarizeConfig(mode="weights", first_last=True))(plain)
    return model, plain, x[:1]


def test_weights_with_calibration_fuse_into_qlinearconv(tmp_path):
    model, plain, x = calibrated(tmp_path, "weights")
    ops = optimized_ops(model, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0 and ops["ConvInteger"] == 0
    onnx.checker.check_model(ir.to_proto(model))
    # uint8 activations: close to the float-activation binary model, not equal
    out, reference = run(model, x, optimize=True), run(plain, x)
    err = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < err < 0.1


def test_full_binarizes_activations_with_sign_and_runs_qlinearconv(tmp_path):
    model, _, x = calibrated(tmp_path, "full")
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Sign"] == 3
    fused = optimized_ops(model, tmp_path)
    assert fused["QLinearConv"] == 2 and fused["Conv"] == 0 and fused["Sign"] == 3
    # the first layer: conv(sign(x), alpha beta sign(W)) in numpy, before output rounding
    w1 = ir.from_proto(small_cnn()).graph.initializers["w1"].const_value.numpy()
    b1 = ir.from_proto(small_cnn()).graph.initializers["b1"].const_value.numpy()
    calib = np.load(tmp_path / "calib.npy")
    beta = np.abs(calib).sum() / np.count_nonzero(calib)
    scale = model.graph.initializers["w1_alpha"].const_value.numpy()
    np.testing.assert_allclose(scale, np.abs(w1).reshape(8, -1).mean(axis=1) * beta, rtol=1e-5)
    taps = ir.to_proto(model)
    taps.graph.output.append(onnx.ValueInfoProto(name="c1"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        taps.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    c1 = session.run(["c1"], {"input": x})[0]  # before the output's uint8 rounding
    expected = numpy_conv(np.sign(x), scale[:, None, None, None] * np.where(w1 >= 0, 1, -1), b1, 1)
    # the int32 bias is rounded to its scale (input scale 1 x alpha beta): half a step
    np.testing.assert_allclose(c1, expected, atol=scale.max() / 2 + 1e-5)


def test_cli_convert_binarize_and_its_option_errors(tmp_path, capsys):
    from onnxcomp.cli import main

    source = tmp_path / "m.onnx"
    onnx.save(small_cnn(), source)
    out = tmp_path / "b.onnx"
    assert main(["convert", str(source), "--binarize", "weights", "-o", str(out)]) == 0
    assert "binarized 1 layer(s)" in capsys.readouterr().out
    model = onnx.load(out)
    assert {p.key for p in model.metadata_props} == {BINARIZED_MARK}
    for args, message in [
        (["--binarize", "full"], "--binarize full needs calibration data"),
        (["--binarize-first-last"], "need --binarize"),
        (["--binarize", "weights", "--prune", "0.5"], "cannot be combined"),
        (["--binarize", "ternary"], "ternary"),
    ]:
        assert main(["convert", str(source), "-o", str(tmp_path / "x.onnx"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err, err
    assert not (tmp_path / "x.onnx").exists()
