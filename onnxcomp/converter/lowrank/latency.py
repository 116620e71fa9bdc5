"""Latency of a layer against its factorized chain: both as tiny one-input models, timed in
ONNX Runtime at batch 1 by :func:`onnxcomp.backends.kernel_latency.ort_timer`."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.backends.kernel_latency import Timer, ort_timer
from onnxcomp.converter.lowrank.candidates import Stage
from onnxcomp.converter.lowrank.layer import Layer

__all__ = ["Timer", "chain_model", "ort_timer"]


def chain_model(
    layer: Layer, stages: list[Stage] | None, opset: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-input model of the layer (``stages`` None) or of its chain, batch 1, and feeds.

    Nodes are named like in the compressed model: the layer's name, or ``name.lowrank{i}``.
    """
    node = layer.node
    dtype = layer.weight.const_value.dtype  # type: ignore[union-attr]
    x_type = node.inputs[0].type if node.inputs[0] is not None else None
    x_dtype = x_type.dtype if x_type is not None else dtype
    dims = layer.input_dims or []
    x = ir.Value(name="x", type=ir.TensorType(x_dtype), shape=ir.Shape(dims))
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = bias_value.const_value if bias_value is not None else None
    if stages is None:
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        layers = [(layer.weight.const_value.numpy(), attributes, layer.name)]  # type: ignore[union-attr]
    else:
        names = [f"{layer.name}.lowrank{i}" for i in range(len(stages))]
        layers = [
            (stage.weight.astype(dtype.numpy()), stage.attributes, name)
            for stage, name in zip(stages, names, strict=True)
        ]
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="latency")
    current = x
    for i, (array, attributes, name) in enumerate(layers):
        tensor = ir.tensor(array)
        weight = ir.Value(
            name=f"w{i}", type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor
        )
        graph.register_initializer(weight)
        inputs = [current, weight]
        if i == len(layers) - 1 and bias is not None:
            bias_input = ir.Value(
                name="bias", type=ir.TensorType(bias.dtype), shape=bias.shape, const_value=bias
            )
            graph.register_initializer(bias_input)
            inputs.append(bias_input)
        new = ir.node(node.op_type, inputs, attributes, name=name, num_outputs=1)
        new.outputs[0].name = f"y{i}"
        graph.append(new)
        current = new.outputs[0]
    graph.outputs.append(current)
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=dims).astype(x_dtype.numpy())}
    return proto, feeds
