"""Small hand-built ONNX graphs for the pass tests, and a plain way to run them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def bn_params(prefix: str, channels: int, rng: np.random.Generator = RNG) -> list[TensorProto]:
    """Random but realistic BatchNorm parameters (positive variance, non-trivial scale)."""
    return [
        tensor(f"{prefix}.gamma", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        tensor(f"{prefix}.beta", rng.normal(0, 1, channels).astype(np.float32)),
        tensor(f"{prefix}.mean", rng.normal(0, 1, channels).astype(np.float32)),
        tensor(f"{prefix}.var", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
    ]


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    names = [f"{prefix}.{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str],
    initializers: Sequence[TensorProto],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
        [helper.make_empty_tensor_value_info(n) for n in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for i, name in enumerate(outputs):
        if name in inferred:
            model.graph.output[i].CopyFrom(inferred[name])
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run in ONNX Runtime with its graph optimizations off, so ORT's own BN fusion does not
    turn the reference into the thing under test."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def conv_bn(
    cin: int = 4,
    cout: int = 6,
    group: int = 1,
    bias: bool = True,
    transpose: bool = False,
    opset: int = 17,
) -> onnx.ModelProto:
    """x -> Conv or ConvTranspose (optionally grouped, with or without bias) -> BN -> y."""
    op = "ConvTranspose" if transpose else "Conv"
    w_shape = (cin, cout // group, 3, 3) if transpose else (cout, cin // group, 3, 3)
    inits = [tensor("w", RNG.normal(0, 0.5, w_shape).astype(np.float32))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(tensor("b", RNG.normal(0, 0.5, cout).astype(np.float32)))
        conv_inputs.append("b")
    nodes = [
        helper.make_node(op, conv_inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "y", epsilon=1e-3),
    ]
    return make_model(nodes, [("x", ["N", cin, 5, 5])], ["y"], inits + bn_params("bn", cout), opset)
