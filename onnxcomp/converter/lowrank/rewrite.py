"""Graph edits of the low-rank pass: a layer replaced by its chain, with unique new names."""

from __future__ import annotations

import onnx_ir as ir

from onnxcomp.converter.lowrank.candidates import Candidate
from onnxcomp.converter.lowrank.layer import Layer


def value_names(graph: ir.Graph) -> set[str]:
    """Every value and node name in use in the graph, to keep new names unique."""
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in graph:
        if node.name:
            names.add(node.name)
        names.update(v.name for v in node.outputs if v.name)
    return names


def unique_name(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is free; the name is then taken."""
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def replace_layer(graph: ir.Graph, layer: Layer, chosen: Candidate, names: set[str]) -> None:
    """Put the candidate's chain in place of the layer; drop the old weight if now unused."""
    node = layer.node
    dtype = layer.weight.const_value.dtype.numpy()  # type: ignore[union-attr]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    current = node.inputs[0]
    new_nodes: list[ir.Node] = []
    for i, stage in enumerate(chosen.stages):
        prefix = f"{layer.name}.lowrank{i}"
        tensor = ir.tensor(stage.weight.astype(dtype))
        weight = ir.Value(
            name=unique_name(names, f"{prefix}.weight"),
            type=ir.TensorType(tensor.dtype),
            shape=tensor.shape,
            const_value=tensor,
        )
        graph.register_initializer(weight)
        last = i == len(chosen.stages) - 1
        inputs = [current, weight, *([bias] if last and bias is not None else [])]
        new = ir.node(
            node.op_type, inputs, stage.attributes, name=unique_name(names, prefix), num_outputs=1
        )
        new.outputs[0].name = unique_name(names, f"{prefix}.out")
        new.outputs[0].type = node.outputs[0].type
        current = new.outputs[0]
        new_nodes.append(new)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], new_nodes, [node.outputs[0]], [current]
    )
    old = layer.weight
    if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
        graph.initializers.pop(old.name)
