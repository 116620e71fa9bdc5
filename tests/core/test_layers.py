"""The weighted-layer registry against hand-built graphs and numpy MAC counts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import make_model, tensor
from onnx import helper

from onnxcomp.core.layers import LAYER_KINDS, node_macs, own_weight_layers, weighted_layer

RNG = np.random.default_rng(3)


def _node(model, op_type: str) -> ir.Node:
    graph = ir.from_proto(model).graph  # make_model annotated the output shapes
    return next(n for n in graph if n.op_type == op_type)


def _single(op_type: str, x_shape, w_shape, **attrs):
    w = RNG.normal(size=w_shape).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if op_type != "MatMul" else [])
    inits = [tensor("w", w)]
    if op_type != "MatMul":
        out_axis = {"Conv": 0, "ConvTranspose": 1}.get(op_type, 0 if attrs.get("transB") else 1)
        inits.append(tensor("b", np.zeros(w_shape[out_axis], np.float32)))
    node = helper.make_node(op_type, inputs, ["y"], name="layer", **attrs)
    return make_model([node], [("x", x_shape)], ["y"], inits)


@pytest.mark.parametrize(
    ("op_type", "x_shape", "w_shape", "attrs", "out_axis", "in_axis", "macs"),
    [
        ("Conv", [1, 4, 8, 8], (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}, 0, 1, 6 * 64 * 4 * 9),
        ("Conv", [1, 4, 8, 8], (4, 1, 3, 3), {"group": 4}, 0, 1, 4 * 36 * 9),
        ("ConvTranspose", [1, 4, 5, 5], (4, 3, 2, 2), {"strides": [2, 2]}, 1, 0, 4 * 25 * 12),
        ("Gemm", [1, 5], (5, 7), {}, 1, 0, 35),
        ("Gemm", [1, 5], (7, 5), {"transB": 1}, 0, 1, 35),
        ("MatMul", [1, 5], (5, 7), {}, 1, 0, 35),
    ],
)
def test_axes_and_macs(op_type, x_shape, w_shape, attrs, out_axis, in_axis, macs):
    node = _node(_single(op_type, x_shape, w_shape, **attrs), op_type)
    layer = weighted_layer(node)
    assert layer is not None
    assert (layer.out_axis, layer.in_axis) == (out_axis, in_axis)
    assert layer.weight_shape == w_shape
    assert layer.out_channels == w_shape[out_axis]
    assert layer.group == attrs.get("group", 1)
    assert layer.macs_per_sample() == macs == node_macs(node)
    assert (layer.bias is None) == (op_type == "MatMul")
    assert layer.problem() is None
    np.testing.assert_array_equal(layer.weight_array().shape, w_shape)


def test_problems_and_non_layers():
    node = _node(_single("Gemm", [5, 1], (5, 7), transA=1), "Gemm")
    assert "transA" in weighted_layer(node).problem()
    relu = _node(
        make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 3])], ["y"], []), "Relu"
    )
    assert weighted_layer(relu) is None
    # A weight that is a graph input is not a constant: not a weighted layer.
    dynamic = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, 5]), ("w", [5, 7])], ["y"], []
    )
    assert weighted_layer(_node(dynamic, "MatMul")) is None
    assert set(LAYER_KINDS) == {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def test_depthwise_convolutions_are_found():
    """Depthwise (group = channels, one input channel per group, any multiplier) vs grouped."""
    from onnxcomp.core.layers import depthwise_layers, is_depthwise

    nodes, inits = [], []
    for name, w_shape, group in (
        ("dw", (4, 1, 3, 3), 4),
        ("dw_x2", (8, 1, 3, 3), 4),
        ("grouped", (4, 2, 3, 3), 2),
        ("plain", (4, 4, 1, 1), 1),
    ):
        inits.append(tensor(f"{name}.w", RNG.normal(size=w_shape).astype(np.float32)))
        nodes.append(
            helper.make_node(
                "Conv", ["x", f"{name}.w"], [name], name=name, group=group, pads=[1, 1, 1, 1]
            )
        )
    model = make_model(nodes, [("x", [1, 4, 5, 5])], ["dw", "dw_x2", "grouped", "plain"], inits)
    graph = ir.from_proto(model).graph
    assert [n.name for n in depthwise_layers(graph)] == ["dw", "dw_x2"]
    assert [is_depthwise(weighted_layer(n)) for n in graph] == [True, True, False, False]


@pytest.mark.parametrize("first_layer", [False, True])
def test_own_weight_layers_leave_the_first_and_shared_weights(first_layer):
    """Conv 'a' (first), MatMuls 'b' and 'c' sharing one weight, Gemm 'd' with its own."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ya"], name="a"),
        helper.make_node("Flatten", ["ya"], ["f"]),
        helper.make_node("MatMul", ["f", "ws"], ["yb"], name="b"),
        helper.make_node("MatMul", ["f", "ws"], ["yc"], name="c"),
        helper.make_node("Add", ["yb", "yc"], ["s"]),
        helper.make_node("Gemm", ["s", "wd"], ["y"], name="d"),
    ]
    inits = [
        tensor("wa", np.ones((2, 3, 1, 1), np.float32)),
        tensor("ws", np.ones((8, 4), np.float32)),
        tensor("wd", np.ones((4, 5), np.float32)),
    ]
    graph = ir.from_proto(make_model(nodes, [("x", [1, 3, 2, 2])], ["y"], inits)).graph
    layers, left = own_weight_layers(graph, first_layer)
    assert [layer.node.name for layer in layers] == (["a", "d"] if first_layer else ["d"])
    reasons = [(node.name, reason) for node, reason in left]
    shared = [
        ("b", "its weight is shared with other nodes"),
        ("c", "its weight is shared with other nodes"),
    ]
    first = [] if first_layer else [("a", "the first layer is left as it is")]
    assert reasons == first + shared
