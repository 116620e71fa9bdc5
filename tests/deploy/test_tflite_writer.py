"""The TFLite writer against ONNX Runtime on hand-built graphs and onnxcomp's int8 output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from int8_models import minmax_ranges, quantize, small_cnn
from onnx import helper

from onnxcomp.errors import OnnxcompError, OptionError

pytest.importorskip("ai_edge_litert")
from ai_edge_litert.interpreter import Interpreter

from onnxcomp.deploy.tflite import write_tflite

RNG = np.random.default_rng(0)


def w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return RNG.normal(0, scale, shape).astype(np.float32)


def run_tflite(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Runs the file on NCHW ``x`` given as NHWC (4-D) and returns its outputs."""
    interpreter = Interpreter(str(path), num_threads=1)
    detail = interpreter.get_input_details()[0]
    feed = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    interpreter.resize_tensor_input(detail["index"], list(feed.shape))
    interpreter.allocate_tensors()
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        feed = np.clip(np.round(feed / scale) + zero, info.min, info.max)
    interpreter.set_tensor(detail["index"], np.ascontiguousarray(feed, dtype=detail["dtype"]))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def conv(name, x, y, cin, cout, k=3, group=1, **attrs):
    inits = [tensor(f"{name}.w", w(cout, cin // group, k, k)), tensor(f"{name}.b", w(cout))]
    node = helper.make_node(
        "Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, group=group, **attrs
    )
    return node, inits


def graph_conv_same_and_strided():
    n1, i1 = conv("c1", "input", "a", 3, 8, pads=[1, 1, 1, 1])
    n2, i2 = conv("c2", "r", "b", 8, 8, pads=[1, 1, 1, 1], strides=[2, 2])  # explicit PAD
    nodes = [n1, helper.make_node("Relu", ["a"], ["r"], name="relu"), n2]
    return make_model(nodes, [("input", ["N", 3, 8, 8])], ["b"], i1 + i2)


def graph_depthwise_relu6():
    n1, i1 = conv("c1", "input", "a", 3, 8, k=1)
    n2, i2 = conv("dw", "a", "b", 8, 8, group=8, pads=[1, 1, 1, 1])
    clip = helper.make_node("Clip", ["b", "lo", "hi"], ["c"], name="relu6")
    inits = [*i1, *i2, tensor("lo", np.float32(0)), tensor("hi", np.float32(6))]
    return make_model([n1, n2, clip], [("input", ["N", 3, 8, 8])], ["c"], inits)


def graph_add_mul_pools():
    n1, i1 = conv("c1", "input", "a", 3, 4, pads=[1, 1, 1, 1])
    nodes = [
        n1,
        helper.make_node("Add", ["a", "input4"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "scale"], ["m"], name="mul"),
        helper.make_node("MaxPool", ["m"], ["p"], name="mp", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p"], ["q"], name="ap", kernel_shape=[3, 3], pads=[1] * 4),
    ]
    inits = [*i1, tensor("input4", w(1, 4, 1, 1)), tensor("scale", w(4, 1, 1) + 1)]
    return make_model(nodes, [("input", ["N", 3, 8, 8])], ["q"], inits)


def graph_head():
    """GAP -> Flatten -> Gemm -> Softmax, and a MatMul head after a spatial Reshape."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1),
        helper.make_node("Reshape", ["input", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "mw"], ["mm"], name="matmul"),
    ]
    inits = [
        tensor("fw", w(5, 3)),
        tensor("fb", w(5)),
        tensor("shape", np.int64([-1, 3 * 4 * 4])),
        tensor("mw", w(48, 6)),
    ]
    return make_model(nodes, [("input", [2, 3, 4, 4])], ["prob", "mm"], inits)


def graph_option_a_shortcut():
    """The CIFAR ResNet option-A shortcut: x[:, :, ::2, ::2] zero-padded on channels, then
    concatenated with a conv branch."""
    n1, i1 = conv("c1", "input", "a", 3, 4, pads=[1, 1, 1, 1], strides=[2, 2])
    n2, i2 = conv("c2", "input", "a2", 3, 5, k=1, strides=[2, 2])
    nodes = [
        n2,
        helper.make_node("Slice", ["input", "st", "en", "ax", "sp"], ["s"], name="slice"),
        helper.make_node("Pad", ["s", "pads", "zero"], ["p"], name="pad"),
        n1,
        helper.make_node("Add", ["p", "a2"], ["sum"], name="add"),
        helper.make_node("Concat", ["sum", "a"], ["cat"], name="concat", axis=1),
    ]
    inits = [
        *i1, *i2,
        tensor("st", np.int64([0, 0])), tensor("en", np.int64([2**62, 2**62])),
        tensor("ax", np.int64([2, 3])), tensor("sp", np.int64([2, 2])),
        tensor("pads", np.int64([0, 1, 0, 0, 0, 1, 0, 0])), tensor("zero", np.float32(0)),
    ]  # fmt: skip
    return make_model(nodes, [("input", ["N", 3, 8, 8])], ["cat"], inits)


FLOAT_GRAPHS = {
    "conv_same_and_strided": graph_conv_same_and_strided,
    "depthwise_relu6": graph_depthwise_relu6,
    "add_mul_pools": graph_add_mul_pools,
    "head": graph_head,
    "option_a_shortcut": graph_option_a_shortcut,
}


@pytest.mark.parametrize("name", list(FLOAT_GRAPHS))
def test_float_graphs_match_onnx_runtime(name: str, tmp_path: Path):
    model = FLOAT_GRAPHS[name]()
    path = tmp_path / "m.tflite"
    notes = write_tflite(ir.serde.deserialize_model(model), path)
    assert path.is_file() and any("float32" in n for n in notes)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 3
    dims = model.graph.input[0].type.tensor_type.shape.dim
    x = RNG.normal(0, 1, (batch, 3, *[d.dim_value for d in dims[2:]])).astype(np.float32)
    expected = run(model, {"input": x})
    got = run_tflite(path, x)
    assert len(got) == len(expected)
    for value, ref in zip(got, expected, strict=True):
        if value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        assert value.shape == ref.shape
        assert np.abs(value - ref).max() <= 1e-4 * np.abs(ref).max()


def test_batchnorm_is_folded_before_writing(tmp_path: Path):
    from graphs import bn_node, bn_params

    n1, i1 = conv("c1", "input", "a", 3, 4, pads=[1, 1, 1, 1])
    model = make_model(
        [n1, bn_node("bn", "a", "y")], [("input", ["N", 3, 6, 6])], ["y"], i1 + bn_params("bn", 4)
    )
    write_tflite(ir.serde.deserialize_model(model), tmp_path / "m.tflite")
    x = RNG.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    (got,) = run_tflite(tmp_path / "m.tflite", x)
    (ref,) = run(model, {"input": x})
    assert np.abs(got.transpose(0, 3, 1, 2) - ref).max() <= 1e-4 * np.abs(ref).max()


def int8_pair(group: int = 1):
    model = small_cnn(seed=1, group=group)
    calib = RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    ranges = minmax_ranges(model, calib)
    return model, quantize(model, ranges), ranges


@pytest.mark.parametrize("group", [1, 8])
def test_int8_qdq_becomes_full_int8_matching_onnx_runtime(group: int, tmp_path: Path):
    float_model, qdq, ranges = int8_pair(group)
    path = tmp_path / "m.tflite"
    table = {name: (r.low, r.high) for name, r in ranges.items()}
    notes = write_tflite(ir.serde.deserialize_model(qdq), path, ranges=table)
    assert any("int8 model" in n for n in notes)
    interpreter = Interpreter(str(path))
    types = {np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    assert np.dtype(np.int8) in types
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert ("DEPTHWISE_CONV_2D" in ops) == (group == 8) and "FULLY_CONNECTED" in ops
    x = RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    (got,) = run_tflite(path, x)
    (ref,) = run(qdq, {"input": x})
    step = (ranges["logits"].high - ranges["logits"].low) / 255
    assert np.abs(got - ref).max() <= 3 * step
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    # the float model is the reference the int8 pair approximates
    (fp,) = run(float_model, {"input": x})
    assert (got.argmax(1) == fp.argmax(1)).mean() >= 0.85


@pytest.mark.parametrize("io_dtype", ["int8", "uint8"])
def test_integer_io_matches_float_io(io_dtype: str, tmp_path: Path):
    _, qdq, _ = int8_pair()
    model = ir.serde.deserialize_model(qdq)
    write_tflite(model, tmp_path / "f.tflite")
    write_tflite(model, tmp_path / "i.tflite", io_dtype=io_dtype)
    interpreter = Interpreter(str(tmp_path / "i.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.dtype(io_dtype)
    out = interpreter.get_output_details()[0]
    assert out["dtype"] == np.dtype(io_dtype)
    x = RNG.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    (as_float,) = run_tflite(tmp_path / "f.tflite", x)
    (as_int,) = run_tflite(tmp_path / "i.tflite", x)
    scale, zero = out["quantization"]
    assert np.allclose((as_int.astype(np.float32) - zero) * scale, as_float, atol=scale * 1.01)


def test_logits_without_ranges_are_bounded_and_noted(tmp_path: Path):
    _, qdq, _ = int8_pair()
    notes = write_tflite(ir.serde.deserialize_model(qdq), tmp_path / "m.tflite")
    assert any("no calibrated range" in n for n in notes)
    x = RNG.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    (got,) = run_tflite(tmp_path / "m.tflite", x)
    (ref,) = run(qdq, {"input": x})
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_unsupported_op_is_one_line_naming_it_and_nothing_is_written(tmp_path: Path):
    node = helper.make_node("Sigmoid", ["input"], ["y"], name="gate")
    model = make_model([node], [("input", [1, 4])], ["y"], [])
    path = tmp_path / "m.tflite"
    with pytest.raises(OnnxcompError, match=r"op Sigmoid \(node 'gate'\) is not supported") as e:
        write_tflite(ir.serde.deserialize_model(model), path)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_io_dtype_options(tmp_path: Path):
    model = ir.serde.deserialize_model(graph_head())
    with pytest.raises(OptionError, match="io_dtype 'int16'"):
        write_tflite(model, tmp_path / "m.tflite", io_dtype="int16")
    with pytest.raises(OptionError, match="needs an int8 QDQ model"):
        write_tflite(model, tmp_path / "m.tflite", io_dtype="int8")


def test_grouped_convolution_is_refused(tmp_path: Path):
    n1, i1 = conv("g", "input", "y", 4, 4, group=2, pads=[1, 1, 1, 1])
    model = make_model([n1], [("input", [1, 4, 6, 6])], ["y"], i1)
    with pytest.raises(OnnxcompError, match="grouped convolution with group 2"):
        write_tflite(ir.serde.deserialize_model(model), tmp_path / "m.tflite")


def test_missing_ai_edge_litert_names_the_extra(monkeypatch, tmp_path: Path):
    import sys

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    with pytest.raises(OnnxcompError, match=r"pip install 'onnxcomp\[tflite\]'"):
        write_tflite(ir.serde.deserialize_model(graph_head()), tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []
