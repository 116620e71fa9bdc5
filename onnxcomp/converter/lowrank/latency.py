"""Latency of a layer against its factorized chain: both as tiny one-input models, timed in
ONNX Runtime at batch 1."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.backends.ort import SessionConfig, create_session
from onnxcomp.converter.lowrank.candidates import Stage
from onnxcomp.converter.lowrank.layer import Layer

Timer = Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]


def ort_timer(session_config: Any = None, runs: int = 200, warmup: int = 10) -> Timer:
    """A timer: the median seconds of one ONNX Runtime run of a model on its feeds."""

    def measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        session = create_session(model.SerializeToString(), session_config or SessionConfig())
        for _ in range(warmup):
            session.run(None, feeds)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return measure


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
