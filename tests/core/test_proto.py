"""Protobuf graph helpers (core/proto.py): attributes, maps, constants, dequantized values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import make_model, tensor
from onnx import helper

from onnxcomp.core.proto import (
    attr,
    constant_tensors,
    consumers_of,
    dequantize,
    dequantized,
    initializers,
    label,
    node_key,
    producers_of,
    with_outputs,
)


def qdq_model() -> onnx.ModelProto:
    """x -> Add(c) -> y; DQ(wq, ws, wz, axis=0) -> w; a Constant node k; y -> Mul(y, y) -> z."""
    nodes = [
        helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq", axis=0),
        helper.make_node(
            "Constant", [], ["k"], value=helper.make_tensor("kv", onnx.TensorProto.FLOAT, [1], [2])
        ),
        helper.make_node("Mul", ["y", "y"], ["z"]),
    ]
    inits = [
        tensor("c", np.ones(2, np.float32)),
        tensor("wq", np.array([[-2, 4], [6, 8]], np.int8)),
        tensor("ws", np.array([0.5, 0.25], np.float32)),
        tensor("wz", np.array([0, 2], np.int8)),
    ]
    return make_model(nodes, [("x", [2])], ["z", "w"], inits)


def test_attributes_names_and_labels():
    model = qdq_model()
    add, dq, _, mul = model.graph.node
    assert attr(dq, "axis", 1) == 0 and attr(add, "axis", 1) == 1 and attr(add, "axis") is None
    assert node_key(add) == "add" and node_key(mul) == "z"
    assert label(dq) == "DequantizeLinear 'dq'" and label(mul) == "Mul 'z'"


def test_producer_and_consumer_maps():
    model = qdq_model()
    add, dq, _, mul = model.graph.node
    producers = producers_of(model)
    assert producers["y"] is add and producers["w"] is dq and "x" not in producers
    users = consumers_of(model)
    assert users["x"] == [add] and users["y"] == [mul, mul]  # once per input slot
    assert "" not in users and users["missing"] == []


def test_constants_and_initializers():
    model = qdq_model()
    assert set(initializers(model)) == {"c", "wq", "ws", "wz"}
    constants = constant_tensors(model)
    assert set(constants) == {"c", "wq", "ws", "wz", "k"}
    assert onnx.numpy_helper.to_array(constants["k"]).tolist() == [2.0]


def test_dequantized_per_channel_values():
    model = qdq_model()
    dq = model.graph.node[1]
    found = dequantized(dq, initializers(model))
    assert found is not None and found.axis == 0 and found.node is dq
    expected = np.array([[-1.0, 2.0], [1.0, 1.5]])  # (q - z) * s per row
    np.testing.assert_allclose(found.values(), expected)
    np.testing.assert_allclose(dequantize(dq, constant_tensors(model)), expected)
    assert dequantized(model.graph.node[0], initializers(model)) is None  # not a DQ
    assert dequantize(dq, {"wq": initializers(model)["wq"]}) is None  # scale not constant


def test_dequantized_per_tensor_without_zero_point_and_negative_axis():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=-1)]
    inits = [tensor("q", np.array([[1, -3]], np.int8)), tensor("s", np.array(0.5, np.float32))]
    model = make_model(nodes, [], ["y"], inits)
    found = dequantized(model.graph.node[0], initializers(model))
    assert found is not None and found.axis == 1
    np.testing.assert_allclose(found.values(), [[0.5, -1.5]])


def test_with_outputs_copies_and_adds_each_name_once():
    model = qdq_model()
    extended = with_outputs(model, ["y", "y", "z"])
    assert [o.name for o in extended.graph.output] == ["z", "w", "y"]
    assert [o.name for o in model.graph.output] == ["z", "w"]


@pytest.mark.parametrize("name", ["wq", "ws"])
def test_dequantized_needs_every_input_constant(name):
    model = qdq_model()
    constants = {k: v for k, v in initializers(model).items() if k != name}
    assert dequantized(model.graph.node[1], constants) is None
