"""--int4-weights: INT4 per-channel weights behind DequantizeLinear, nearest and GPTQ rounding,
checked against numpy and against a hand-dequantized float model in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper, numpy_helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.binarize import BinarizeConfig
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.quantize import Int4Config, Int4WeightsPass, QuantizeConfig
from onnxcomp.converter.share import ShareConfig
from onnxcomp.converter.sparsify import SparsityConfig
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError

RNG = np.random.default_rng(4)


def conv_gemm(transb: int = 1) -> onnx.ModelProto:
    """x [N,3,6,6] -> Conv 3x3 (8 out, pads 1) -> Relu -> Flatten -> Gemm (5 out)."""
    w = RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0  # an all-zero channel
    g = RNG.normal(0, 0.1, (5, 8 * 36)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g", "gb"], ["y"], name="fc", transB=transb),
    ]
    inits = [
        tensor("w", w),
        tensor("b", RNG.normal(0, 0.1, 8).astype(np.float32)),
        tensor("g", g if transb else g.T.copy()),
        tensor("gb", RNG.normal(0, 0.1, 5).astype(np.float32)),
    ]
    return make_model(nodes, [("x", ["N", 3, 6, 6])], ["y"], inits)


def reference_int4(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: scale = max |w| / 7 per output channel, q = clip(round(w / s))."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    top = np.abs(moved).max(axis=1)
    scale = np.where(top > 0, top / 7, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -8, 7)
    return q.astype(np.int8), scale


def convert(proto: onnx.ModelProto, config: Int4Config, context=None) -> onnx.ModelProto:
    result = Pipeline.from_options(PipelineOptions(int4=config), context).run(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out


def dq_of(model: onnx.ModelProto, weight: str) -> tuple[onnx.NodeProto, dict]:
    inits = {i.name: i for i in model.graph.initializer}
    dq = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight
    )
    return dq, inits


@pytest.mark.parametrize("transb", [1, 0])
def test_nearest_int4_matches_numpy_and_runs_as_the_dequantized_float_model(transb):
    proto = conv_gemm(transb)
    floats = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = convert(proto, Int4Config(first_last=True))
    assert out.opset_import[0].version == 21
    hand = onnx.ModelProto()
    hand.CopyFrom(proto)
    for weight, axis in (("w", 0), ("g", 0 if transb else 1)):
        dq, inits = dq_of(out, weight)
        assert inits[weight].data_type == onnx.TensorProto.INT4
        assert inits[dq.input[2]].data_type == onnx.TensorProto.INT4
        assert helper.get_attribute_value(dq.attribute[0]) == axis
        q = numpy_helper.to_array(inits[weight]).astype(np.int8)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert q.min() >= -8 and q.max() <= 7
        assert not numpy_helper.to_array(inits[dq.input[2]]).any()
        ref_q, ref_scale = reference_int4(floats[weight], axis)
        np.testing.assert_array_equal(q, ref_q)
        np.testing.assert_allclose(scale, ref_scale, rtol=1e-7)
        shape = [1] * q.ndim
        shape[axis] = -1
        dequantized = (scale.reshape(shape) * q.astype(np.float32)).astype(np.float32)
        # ORT's DequantizeLinear gives exactly scale * q: the hand-dequantized weight
        dq_out = helper.make_model(
            helper.make_graph(
                [dq], "dq", [], [helper.make_empty_tensor_value_info(dq.output[0])],
                [inits[n] for n in dq.input],
            ),
            opset_imports=[helper.make_opsetid("", 21)],
        )  # fmt: skip
        np.testing.assert_array_equal(run(dq_out, {})[0], dequantized)
        next(i for i in hand.graph.initializer if i.name == weight).CopyFrom(
            tensor(weight, dequantized)
        )
    x = RNG.normal(0, 1, (4, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(hand, {"x": x})[0], atol=1e-5)
    assert not np.allclose(run(out, {"x": x})[0], run(proto, {"x": x})[0], atol=1e-3)


def test_first_and_last_layers_stay_float_by_default():
    result = Pipeline.from_options(PipelineOptions(int4=Int4Config())).run(
        ir.from_proto(conv_gemm())
    )
    record = result.records[-1]
    assert [s.reason.split(" (")[0] for s in record.skipped] == [
        "the first Conv/Gemm layer stays float",
        "the last Conv/Gemm layer stays float",
    ]
    assert record.summary.startswith("no layer")


def conv_only(w: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return make_model([node], [("x", ["N", 4, 8, 8])], ["y"], [tensor("w", w)])


def patches(x: np.ndarray) -> np.ndarray:
    """All 3x3 (pads 1) im2col patches of x as rows (C ky kx), in numpy."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    _, c, h, w = x.shape
    cols = [padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)]
    stacked = np.stack(cols, axis=2)  # n, c, 9, h, w
    return stacked.transpose(0, 3, 4, 1, 2).reshape(-1, c * 9).astype(np.float64)


def test_gptq_lowers_the_layer_output_error_on_correlated_inputs(tmp_path: Path):
    base = RNG.normal(0, 1, (96, 1, 8, 8))
    x = (base + 0.25 * RNG.normal(0, 1, (96, 4, 8, 8))).astype(np.float32)  # correlated channels
    np.save(tmp_path / "calib.npy", x[:64])
    w = RNG.normal(0, 0.2, (6, 4, 3, 3)).astype(np.float32)
    context = PassContext(calibration=DataOptions(data=tmp_path / "calib.npy", batch_size=32))
    errors = {}
    rows = w.reshape(6, -1).astype(np.float64)
    test = patches(x[64:])
    for rounding in ("nearest", "gptq"):
        out = convert(conv_only(w), Int4Config(rounding, first_last=True), context)
        dq, inits = dq_of(out, "w")
        q = numpy_helper.to_array(inits["w"]).astype(np.float64).reshape(6, -1)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        assert q.min() >= -8 and q.max() <= 7
        np.testing.assert_allclose(scale, np.abs(rows).max(axis=1) / 7, rtol=1e-6)
        errors[rounding] = np.mean((test @ (rows - q * scale[:, None]).T) ** 2)
    # on held-out inputs of the same distribution, GPTQ's output error is clearly lower
    assert errors["gptq"] < 0.7 * errors["nearest"], errors


@pytest.mark.parametrize(
    ("others", "needle"),
    [
        ({"int8": QuantizeConfig()}, "--int8"),
        ({"binarize": BinarizeConfig("weights")}, "--binarize"),
        ({"sparsity": SparsityConfig(0.5)}, "--sparsity"),
        ({"sharing": ShareConfig(16)}, "--weight-sharing"),
    ],
)
def test_combinations_are_refused_in_one_line(others, needle):
    with pytest.raises(OptionError, match="--int4-weights cannot be combined") as error:
        PipelineOptions(int4=Int4Config(), **others)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_adaround_is_refused():
    with pytest.raises(OptionError, match="--weight-rounding adaround: --int4-weights takes"):
        Int4Config("adaround")


@pytest.fixture
def no_data_pass(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a data pass ran")

    monkeypatch.setattr(PassContext, "collect", fail)


def test_a_quantized_model_is_refused_before_any_data_pass(no_data_pass, tmp_path: Path):
    proto = conv_gemm()
    proto.graph.node.append(helper.make_node("DequantizeLinear", ["q", "s"], ["dq"]))
    proto.graph.initializer.extend(
        [tensor("q", np.zeros(3, np.int8)), tensor("s", np.float32(0.1))]
    )
    model = ir.from_proto(proto)
    context = PassContext(calibration=DataOptions(data=tmp_path / "calib.npy"))
    pipeline = Pipeline.from_options(PipelineOptions(int4=Int4Config("gptq")), context)
    with pytest.raises(OptionError, match="needs a float model, this one is quantized") as error:
        pipeline.run(model)
    assert "\n" not in str(error.value)
    assert ir.to_proto(model).opset_import[0].version == 17  # nothing ran


def test_gptq_without_data_is_refused_before_any_pass(no_data_pass):
    with pytest.raises(OptionError, match="--int4-weights --weight-rounding gptq reads"):
        Pipeline.from_options(PipelineOptions(int4=Int4Config("gptq"))).run(
            ir.from_proto(conv_gemm())
        )


def test_a_model_without_conv_or_gemm_is_refused():
    node = helper.make_node("Relu", ["x"], ["y"])
    proto = make_model([node], [("x", [1, 3])], ["y"], [])
    with pytest.raises(OptionError, match="no Conv or Gemm"):
        Int4WeightsPass(Int4Config()).check(ir.from_proto(proto))
