"""Helpers on onnx protobuf models, for the edges that must not load weights into onnx-ir
(``inspect`` on models over 2 GB, external-data checks when loading): attributes, tensors,
subgraphs, external-data locations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import onnx
from onnx import TensorProto, helper

# The largest message protobuf serializes (2 GB - 1).
PROTOBUF_LIMIT = 2**31 - 1


def attr_value(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of the node's attribute ``name``, or ``default`` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def graph_tensors(graph: onnx.GraphProto, constants_only: bool = True) -> Iterator[TensorProto]:
    """Initializers and tensor attributes of a graph and all its subgraphs.

    With ``constants_only`` the tensor attributes are those of Constant nodes only.
    """
    yield from graph.initializer
    for node in graph.node:
        take = not constants_only or (node.op_type == "Constant" and node.domain in ("", "ai.onnx"))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and take:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS and take:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_tensors(attr.g, constants_only)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graph_tensors(sub, constants_only)


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """All subgraphs nested in a graph's nodes (not the graph itself)."""
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield sub
                yield from subgraphs(sub)


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external-data files (locations relative to the model) its tensors point to."""
    locations = set()
    for tensor in graph_tensors(model.graph, constants_only=False):
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations
