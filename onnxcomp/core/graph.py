"""Small helpers on onnx-ir graphs that every technique uses: attributes, labels, constants."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def attr_ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def label(node: ir.Node) -> str:
    """How reports name a node: ``Conv 'layer1.0.conv1'`` (the output name if it has none)."""
    return f"{node.op_type} '{node.name or node.outputs[0].name}'"


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant initializer (not a graph input), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return np.asarray(value.const_value.numpy())


def is_constant(value: ir.Value | None) -> bool:
    """Whether the value is a constant initializer (not a graph input)."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace a constant's array (and its recorded shape) in place."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def only_used_by(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``node`` is the value's only reader (a weight that is not shared)."""
    return all(user is node for user, _ in value.uses())


def static_dims(value: ir.Value | None) -> list[int] | None:
    """The shape with the batch dimension as 1, or None if another dimension is not static."""
    if value is None or value.shape is None:
        return None
    shape = value.shape
    if not all(shape.is_static(i) for i in range(1, shape.rank())):
        return None
    return [1] + [int(shape[i]) for i in range(1, shape.rank())]


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """The node's input ``index``, or None when it is absent or omitted."""
    return node.inputs[index] if len(node.inputs) > index else None


def fold_constant_of_shape(node: ir.Node) -> bool | None:
    """For onnxscript's constant folder: also fold ConstantOfShape (onnxscript keeps it by
    default to keep files small; the folder's size limit still applies). Exporters build
    Pad's pads with it."""
    return True if node.op_type == "ConstantOfShape" else None
