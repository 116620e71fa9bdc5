"""Protobuf helpers (core/proto.py) and report units (core/units.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.core.proto import attr, external_locations, graph_tensors, subgraphs
from onnxcomp.core.units import format_bytes, format_count


def _model_with_subgraph() -> onnx.ModelProto:
    """x -> If(cond) whose branches hold a Constant; one initializer in the main graph."""

    def branch(name: str) -> onnx.GraphProto:
        value = numpy_helper.from_array(np.ones(3, np.float32), f"{name}.c")
        node = helper.make_node("Constant", [], [f"{name}.y"], value=value)
        out = helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, [3])
        return helper.make_graph([node], name, [], [out])

    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node(
        "If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")
    )
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [cond]
    )
    return helper.make_model(graph)


def test_attr_reads_an_attribute_or_the_default() -> None:
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, alpha=0.5)
    assert attr(node, "transB", 0) == 1
    assert attr(node, "alpha", 1.0) == 0.5
    assert attr(node, "transA", 0) == 0


def test_graph_tensors_and_subgraphs_reach_nested_graphs() -> None:
    model = _model_with_subgraph()
    assert sorted(g.name for g in subgraphs(model.graph)) == ["else", "then"]
    assert sorted(t.name for t in graph_tensors(model.graph)) == ["cond", "else.c", "then.c"]


def test_external_locations(tmp_path) -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    model = helper.make_model(graph)
    assert external_locations(model) == set()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data")
    loaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert external_locations(loaded) == {"m.data"}


def test_units() -> None:
    assert (format_count(999), format_count(1234), format_count(5_600_000)) == (
        "999",
        "1.23 K",
        "5.60 M",
    )
    assert (format_bytes(None), format_bytes(512), format_bytes(3 * 1024**2)) == (
        "-",
        "512 B",
        "3.00 MB",
    )
