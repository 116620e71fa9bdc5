"""Tests for onnxcomp.core.analysis (MACs against hand counts, parameters, I/O) and its
rendering by onnxcomp.report."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxcomp.core.analysis import ModelSummary, summarize
from onnxcomp.errors import OnnxcompError
from onnxcomp.report import render_summary

FLOAT = TensorProto.FLOAT
OPSET = 17


def _weight(name: str, shape: tuple[int, ...], seed: int = 0) -> TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int | str] | None]],
    outputs: list[str],
    initializers: list[TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    return model


def _run_shape(model: onnx.ModelProto, **shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The real shape of the first output, from onnxruntime (also checks the model is valid)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    return tuple(session.run(None, feeds)[0].shape)


def _conv_out(size: int, kernel: int, stride: int, dilation: int, pad0: int, pad1: int) -> int:
    """Output length of one conv spatial axis (the ONNX/PyTorch formula)."""
    return (size + pad0 + pad1 - dilation * (kernel - 1) - 1) // stride + 1


def _single_layer_macs(model: onnx.ModelProto, **kwargs: int) -> int:
    summary = summarize(model, **kwargs)
    assert summary.unknown_shape_layers == []
    assert len(summary.layers) == 1
    assert summary.total_macs == summary.layers[0].macs
    return summary.total_macs


# ---------------------------------------------------------------------------------------------
# Conv


@pytest.mark.parametrize(
    ("n", "cin", "cout", "group", "hw", "kernel", "strides", "dilations", "pads"),
    [
        (1, 3, 16, 1, (32, 32), (3, 3), (2, 1), (2, 2), (1, 1, 2, 2)),  # strides/dilations/pads
        (2, 8, 12, 4, (17, 13), (3, 3), (1, 2), (1, 1), (1, 1, 1, 1)),  # grouped
        (1, 6, 6, 6, (20, 20), (5, 5), (1, 1), (1, 1), (2, 2, 2, 2)),  # depthwise
        (3, 4, 8, 1, (9, 11), (1, 3), (3, 1), (1, 3), (0, 0, 0, 0)),  # 1x3 kernel, no pads
    ],
)
def test_conv_macs(
    n: int,
    cin: int,
    cout: int,
    group: int,
    hw: tuple[int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilations: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> None:
    node = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        name="conv",
        group=group,
        kernel_shape=list(kernel),
        strides=list(strides),
        dilations=list(dilations),
        pads=list(pads),
    )
    weight = _weight("w", (cout, cin // group, *kernel))
    model = _model([node], [("x", [n, cin, *hw])], ["y"], [weight])

    out_h = _conv_out(hw[0], kernel[0], strides[0], dilations[0], pads[0], pads[2])
    out_w = _conv_out(hw[1], kernel[1], strides[1], dilations[1], pads[1], pads[3])
    expected = n * cout * out_h * out_w * (cin // group) * kernel[0] * kernel[1]

    assert _run_shape(model, x=(n, cin, *hw)) == (n, cout, out_h, out_w)

    summary = summarize(model)
    assert summary.total_macs == expected
    assert summary.layers[0].output_shape == (n, cout, out_h, out_w)
    assert summary.layers[0].weight_shape == (cout, cin // group, *kernel)


def test_depthwise_is_cheaper_than_dense_by_channels() -> None:
    """A depthwise 3x3 conv over C channels costs 1/C of the dense one."""
    c, size = 32, 14

    def build(group: int) -> onnx.ModelProto:
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])
        weight = _weight("w", (c, c // group, 3, 3))
        return _model([node], [("x", [1, c, size, size])], ["y"], [weight])

    dense = _single_layer_macs(build(1))
    depthwise = _single_layer_macs(build(c))
    assert dense == size * size * c * c * 9
    assert depthwise == size * size * c * 9


@pytest.mark.parametrize(
    ("n", "cin", "cout", "group", "hw", "kernel", "stride"),
    [
        (2, 4, 6, 2, (5, 5), 3, 2),
        (1, 8, 8, 1, (7, 3), 4, 2),
        (1, 6, 6, 6, (4, 4), 3, 1),
    ],
)
def test_conv_transpose_macs(
    n: int, cin: int, cout: int, group: int, hw: tuple[int, int], kernel: int, stride: int
) -> None:
    node = helper.make_node(
        "ConvTranspose", ["x", "w"], ["y"], group=group, strides=[stride, stride]
    )
    weight = _weight("w", (cin, cout // group, kernel, kernel))
    model = _model([node], [("x", [n, cin, *hw])], ["y"], [weight])
    # every input element is scattered into (Cout/group) * k*k outputs
    expected = n * cin * hw[0] * hw[1] * (cout // group) * kernel * kernel
    assert _single_layer_macs(model) == expected
    out = (n, cout, (hw[0] - 1) * stride + kernel, (hw[1] - 1) * stride + kernel)
    assert _run_shape(model, x=(n, cin, *hw)) == out
    assert summarize(model).layers[0].output_shape == out


# ---------------------------------------------------------------------------------------------
# Gemm and MatMul


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_macs(trans_a: int, trans_b: int) -> None:
    m, k, n = 5, 7, 3
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = (n, k) if trans_b else (k, n)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=trans_b)
    model = _model([node], [("a", a_shape)], ["y"], [_weight("b", b_shape), _weight("c", (n,))])
    assert _run_shape(model, a=tuple(a_shape)) == (m, n)
    assert _single_layer_macs(model) == m * n * k
    assert summarize(model).layers[0].output_shape == (m, n)


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "expected"),
    [
        ((4, 6), (6, 5), 4 * 6 * 5),  # 2-D
        ((3, 4, 6), (6, 5), 3 * 4 * 6 * 5),  # batched 3-D x 2-D
        ((2, 1, 4, 6), (3, 6, 5), 2 * 3 * 4 * 6 * 5),  # broadcast batch dims
        ((6,), (6, 5), 6 * 5),  # 1-D first operand: a vector times a matrix
        ((4, 6), (6,), 4 * 6),  # 1-D second operand: a matrix times a vector
        ((2, 4, 6), (6,), 2 * 4 * 6),
        ((6,), (6,), 6),  # dot product
    ],
)
def test_matmul_macs(a_shape: tuple[int, ...], b_shape: tuple[int, ...], expected: int) -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    model = _model([node], [("a", list(a_shape))], ["y"], [_weight("b", b_shape)])
    assert _single_layer_macs(model) == expected
    # the output shape recorded is numpy's
    out = np.matmul(np.zeros(a_shape), np.zeros(b_shape)).shape
    assert _run_shape(model, a=a_shape) == out
    assert summarize(model).layers[0].output_shape == out


def test_matmul_between_two_activations() -> None:
    """Attention-style MatMul: both operands computed, the sequence dim dynamic."""
    heads, seq, dim = 4, "seq", 8
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
    ]
    model = _model(
        nodes,
        [("q", ["batch", heads, seq, dim]), ("k", ["batch", heads, seq, dim])],
        ["scores"],
        [],
    )
    summary = summarize(model, batch=2, dim_default=10)
    assert summary.total_macs == 2 * heads * 10 * 10 * dim
    assert summary.layers[0].weight_shape == (2, heads, dim, 10)


def test_unknown_shapes_are_reported_not_zero() -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="blind")
    model = _model([node], [("a", None)], ["y"], [_weight("b", (6, 5))])
    summary = summarize(model)
    assert summary.unknown_shape_layers == ["blind"]
    assert summary.layers == []
    out = io.StringIO()
    render_summary(summary, Console(file=out, width=200))
    assert "blind" in out.getvalue()


def test_dynamic_dims_use_batch_and_dim_default() -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = _model([node], [("x", ["batch", "seq", 16])], ["y"], [_weight("w", (16, 8))])
    assert _single_layer_macs(model) == 1 * 1 * 16 * 8
    assert _single_layer_macs(model, batch=4, dim_default=7) == 4 * 7 * 16 * 8
    # the input model itself keeps its dynamic dims
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_invalid_batch_is_rejected() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    model = _model([node], [("x", [1, 2])], ["y"], [])
    with pytest.raises(OnnxcompError, match="batch"):
        summarize(model, batch=0)


# ---------------------------------------------------------------------------------------------
# Parameters, histogram, I/O, file size


def _mixed_model() -> onnx.ModelProto:
    """Conv -> Relu -> Add(Constant) -> Relu -> Add -> Relu, with a Constant node."""
    constant = helper.make_tensor("cval", FLOAT, [1, 4, 1, 1], [0.5, 1.0, 1.5, 2.0])
    nodes = [
        helper.make_node("Conv", ["x", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r1"]),
        helper.make_node("Constant", [], ["k"], value=constant),
        helper.make_node("Add", ["r1", "k"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r2"]),
        helper.make_node("Add", ["r2", "r1"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["y"]),
    ]
    inits = [_weight("w", (4, 3, 3, 3)), _weight("bias", (4,))]
    return _model(nodes, [("x", ["N", 3, 8, 8])], ["y"], inits)


def test_parameter_count_matches_initializers_and_constants() -> None:
    model = _mixed_model()
    init_sizes = [numpy_helper.to_array(t).size for t in model.graph.initializer]
    const_sizes = [
        numpy_helper.to_array(node.attribute[0].t).size
        for node in model.graph.node
        if node.op_type == "Constant"
    ]
    summary = summarize(model)
    assert summary.parameters == sum(init_sizes) + sum(const_sizes) == 4 * 27 + 4 + 4
    nbytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert summary.parameter_bytes == nbytes + 4 * 4


def test_op_histogram_inputs_outputs_and_metadata() -> None:
    model = _mixed_model()
    summary = summarize(model)
    assert summary.op_histogram == {"Relu": 3, "Add": 2, "Constant": 1, "Conv": 1}
    assert list(summary.op_histogram) == ["Relu", "Add", "Constant", "Conv"]
    assert summary.num_nodes == 7
    assert summary.opsets == {"ai.onnx": OPSET}
    assert summary.ir_version == model.ir_version
    assert [(i.name, i.dtype, i.shape) for i in summary.inputs] == [("x", "float", ["N", 3, 8, 8])]
    assert [o.name for o in summary.outputs] == ["y"]
    assert summary.total_macs == 4 * 8 * 8 * 3 * 9
    assert summary.path is None and summary.file_bytes is None


def test_file_size_includes_external_data(tmp_path: Path) -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = _model([node], [("x", ["b", 256])], ["y"], [_weight("w", (256, 128))])
    inline = tmp_path / "inline.onnx"
    onnx.save(model, inline)
    assert summarize(model, path=inline).file_bytes == inline.stat().st_size

    external = tmp_path / "ext.onnx"
    onnx.save(model, external, save_as_external_data=True, location="ext.data")
    data = tmp_path / "ext.data"
    expected = external.stat().st_size + data.stat().st_size
    assert data.stat().st_size >= 256 * 128 * 4
    # loaded with its data (external references gone from the proto) and without
    for load_data in (True, False):
        loaded = onnx.load(external, load_external_data=load_data)
        summary = summarize(loaded, path=external)
        assert summary.file_bytes == expected
        assert summary.parameters == 256 * 128
        assert summary.total_macs == 256 * 128


# ---------------------------------------------------------------------------------------------
# A torch-exported model against forward hooks


def _torch_net():  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return net.eval()


def _hook_macs(net, batch: int) -> int:  # type: ignore[no-untyped-def]
    """MACs from the torch modules' real output sizes, via forward hooks."""
    import torch

    total = 0

    def hook(module, _inputs, output) -> None:  # type: ignore[no-untyped-def]
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = math.prod(module.kernel_size)
            total += output.numel() * (module.in_channels // module.groups) * kernel
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.no_grad():
        net(torch.zeros(batch, 3, 32, 32))
    for handle in handles:
        handle.remove()
    return total


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import torch

    net = _torch_net()
    path = tmp_path_factory.mktemp("torch") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}},
        )
    return net, path


def test_torch_model_macs_match_hooks(torch_model) -> None:  # type: ignore[no-untyped-def]
    net, path = torch_model
    model = onnx.load(path)
    summary = summarize(model, path=path)
    assert summary.unknown_shape_layers == []
    assert summary.total_macs == _hook_macs(net, 1)
    assert summary.op_histogram["Conv"] == 2
    assert sum(summary.op_histogram.values()) == summary.num_nodes == len(model.graph.node)
    assert summary.inputs[0].shape == ["batch", 3, 32, 32]
    assert summary.file_bytes == path.stat().st_size
    init_numel = sum(math.prod(t.dims) for t in model.graph.initializer)
    const_numel = sum(
        numpy_helper.to_array(n.attribute[0].t).size
        for n in model.graph.node
        if n.op_type == "Constant"
    )
    assert summary.parameters == init_numel + const_numel


def test_torch_model_macs_scale_with_batch(torch_model) -> None:  # type: ignore[no-untyped-def]
    net, path = torch_model
    model = onnx.load(path)
    at_one = summarize(model).total_macs
    at_four = summarize(model, batch=4)
    assert at_four.batch == 4
    assert at_four.total_macs == 4 * at_one == _hook_macs(net, 4)
    assert all(layer.output_shape[0] == 4 for layer in at_four.layers)


# ---------------------------------------------------------------------------------------------
# Serialization and rendering


def test_to_dict_round_trips_through_json(torch_model) -> None:  # type: ignore[no-untyped-def]
    _, path = torch_model
    summary = summarize(onnx.load(path), path=path, batch=2)
    data = summary.to_dict()
    text = json.dumps(data)
    assert json.loads(text) == data
    assert ModelSummary.from_dict(json.loads(text)) == summary
    assert data["total_macs"] == summary.total_macs
    assert data["layers"][0]["output_shape"][0] == 2


def test_render_summary_prints_tables_and_total(torch_model) -> None:  # type: ignore[no-untyped-def]
    _, path = torch_model
    summary = summarize(onnx.load(path), path=path)
    out = io.StringIO()
    render_summary(summary, Console(file=out, width=200), top=2)
    text = out.getvalue()
    assert f"{summary.total_macs:,}" in text
    assert f"{summary.parameters:,}" in text
    assert "[batch, 3, 32, 32]" in text  # dynamic dims shown, not eaten as markup
    assert "Top 2 of 3 layers by MACs" in text
    top_layer = max(summary.layers, key=lambda layer: layer.macs)
    assert top_layer.node in text
    for op in summary.op_histogram:
        assert op in text
