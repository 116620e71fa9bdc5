"""CleanupPass rules on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from graphs import RNG, make_model, ops, run, tensor
from onnx import helper

from onnxcomp.converter.cleanup.cleanup_pass import CleanupPass


def clean(model: onnx.ModelProto):
    result = CleanupPass()(ir.from_proto(model))
    return ir.to_proto(result.model), result.record


def test_dropout_identity_and_constant_subgraph_are_removed():
    inits = [
        tensor("a", np.full((3,), 2.0, np.float32)),
        tensor("b", np.full((3,), 3.0, np.float32)),
        tensor("unused", np.ones((5,), np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["ab"], name="const_mul"),  # constant: folded
        helper.make_node("Dropout", ["x"], ["d"], name="drop"),
        helper.make_node("Identity", ["d"], ["i"], name="ident"),
        helper.make_node("Add", ["i", "ab"], ["y"], name="add"),
        helper.make_node("Relu", ["x"], ["dead"], name="dead"),  # feeds nothing
    ]
    model = make_model(nodes, [("x", ["N", 3])], ["y"], inits)
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    cleaned, record = clean(model)
    assert ops(cleaned) == ["Add"]
    assert {i.name for i in cleaned.graph.initializer} == {"ab"} or len(
        cleaned.graph.initializer
    ) == 1
    np.testing.assert_allclose(run(cleaned, {"x": x})[0], x + 6.0, rtol=1e-6)
    assert record.op_delta == {"Dropout": -1, "Identity": -1, "Mul": -1, "Relu": -1}
    assert any("unused initializers" in c for c in record.changes)


def test_dropout_with_used_mask_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop")]
    model = make_model(nodes, [("x", ["N", 3])], ["d", "mask"], [])
    cleaned, record = clean(model)
    assert record.skipped[0].reason == "its mask output is a graph output"
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    d, mask = run(cleaned, {"x": x})
    np.testing.assert_array_equal(d, x)
    assert mask.dtype == np.bool_ and mask.shape == (2, 3) and mask.all()


def test_dropout_in_training_mode_is_kept():
    inits = [tensor("ratio", np.array(0.5, np.float32)), tensor("train", np.array(True))]
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["d"], name="drop")]
    model = make_model(nodes, [("x", ["N", 3])], ["d"], inits)
    cleaned, record = clean(model)
    assert "Dropout" in ops(cleaned)
    assert "training_mode is true" in record.skipped[0].reason


def test_dropout_feeding_graph_output_keeps_output_name():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["y"], name="drop"),
    ]
    model = make_model(nodes, [("x", ["N", 3])], ["y"], [])
    cleaned, _ = clean(model)
    assert ops(cleaned) == ["Relu"]
    assert [o.name for o in cleaned.graph.output] == ["y"]
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(cleaned, {"x": x})[0], np.maximum(x, 0))


def test_identity_from_input_to_output_is_kept():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", [2])], ["y"], [])
    cleaned, _ = clean(model)
    assert ops(cleaned) == ["Identity"]


def test_arithmetic_no_ops_are_removed():
    inits = [tensor("one", np.array(1.0, np.float32)), tensor("zero", np.array(0.0, np.float32))]
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["m"]),
        helper.make_node("Add", ["zero", "m"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    cleaned, _ = clean(make_model(nodes, [("x", [2, 3])], ["y"], inits))
    assert ops(cleaned) == ["Relu"]


def test_initializers_listed_as_inputs_stop_being_inputs():
    model = make_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [("x", [2]), ("w", [2])],
        ["y"],
        [tensor("w", np.ones(2, np.float32))],
    )
    cleaned, _ = clean(model)
    assert [i.name for i in cleaned.graph.input] == ["x"]
