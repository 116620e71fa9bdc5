"""An ONNX graph as the TFLite lowering sees it: float-domain nodes, constants, quantization.

Rules, applied in graph order by :func:`read_graph`:

1. ``DequantizeLinear`` of a constant (weights, biases) becomes a :class:`QConst`: the
   integer values with their scales, zero points and axis, kept exact for the lowering.
2. ``QuantizeLinear(x)`` gives ``x`` its activation parameters and its output becomes another
   name of ``x``; when ``x`` already has other parameters the output is a new tensor made by
   a ``Requantize`` node.
3. ``DequantizeLinear`` of an activation is another name of its input (whose parameters it
   gives when the input has none yet: the output of an op run on quantized values, such as
   a Pad island).
4. Activation parameters move to TFLite's int8 domain: uint8 zero points minus 128, same
   scale (exact: every uint8 value maps to one int8 value).
5. A Pad's integer constant value (a zero point) becomes the real value it stands for.
6. ``Identity`` is another name; ``Constant`` nodes are constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.deploy.tflite.flatbuf import Quant
from onnxcomp.errors import OnnxcompError


@dataclass(frozen=True)
class QConst:
    """A constant stored quantized in the ONNX graph: real = scale * (values - zero_point)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def real(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        scale = self.scale.reshape(shape).astype(np.float64)
        zero = self.zero_point.reshape(shape).astype(np.float64)
        return ((self.values.astype(np.float64) - zero) * scale).astype(np.float32)


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, object]


@dataclass
class Graph:
    nodes: list[Node]
    consts: dict[str, np.ndarray]
    qconsts: dict[str, QConst]
    quant: dict[str, Quant]
    shapes: dict[str, tuple[int, ...]]
    inputs: list[str]
    outputs: list[str]
    quantized: bool
    notes: list[str] = field(default_factory=list)

    def is_const(self, name: str) -> bool:
        return name in self.consts or name in self.qconsts

    def real(self, name: str) -> np.ndarray:
        """The float value of a constant (dequantized when stored quantized)."""
        if name in self.qconsts:
            return self.qconsts[name].real()
        return self.consts[name]

    def readers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]


def _int8_domain(scale: np.ndarray, zero: np.ndarray) -> Quant:
    shift = 128 if zero.dtype == np.uint8 else 0
    if scale.size != 1:
        raise OnnxcompError(
            "an activation is quantized per channel; TFLite takes per-tensor activation "
            "parameters: re-quantize the model with onnxcomp convert --int8"
        )
    return Quant.per_tensor(float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]) - shift)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Reader:
    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.alias: dict[str, str] = {}
        self.qconsts: dict[str, QConst] = {}
        self.quant: dict[str, Quant] = {}
        self.raw_zero: dict[str, tuple[float, int]] = {}  # ONNX-domain (scale, zero point)
        self.nodes: list[Node] = []
        self.quantized = False

    def name(self, value: str) -> str:
        return self.alias.get(value, value)

    def read(self, node: onnx.NodeProto) -> None:
        attrs = _attrs(node)
        inputs = [self.name(i) for i in node.input]
        if node.op_type == "Constant":
            self.consts[node.output[0]] = numpy_helper.to_array(attrs["value"])  # type: ignore[arg-type]
        elif node.op_type == "Identity":
            self.alias[node.output[0]] = inputs[0]
        elif node.op_type == "DequantizeLinear" and inputs[0] in self.consts:
            self.quantized = True
            values = self.consts[inputs[0]]
            scale = self.consts[inputs[1]]
            zero = (
                self.consts[inputs[2]]
                if len(inputs) > 2 and inputs[2]
                else np.zeros(1, values.dtype)
            )
            axis = int(attrs.get("axis", 1)) % max(values.ndim, 1)  # type: ignore[call-overload]
            self.qconsts[node.output[0]] = QConst(values, scale.reshape(-1), zero.reshape(-1), axis)
        elif node.op_type == "QuantizeLinear":
            self.quantized = True
            self._quantize(node, inputs)
        elif node.op_type == "DequantizeLinear":
            source = inputs[0]
            if source not in self.quant:
                self._set_quant(source, inputs[1:])
            self.alias[node.output[0]] = source
        else:
            if node.op_type == "Pad" and len(inputs) > 2 and inputs[2] in self.consts:
                inputs[2] = self._pad_value(inputs[0], inputs[2])
            name = node.name or f"{node.op_type}_{len(self.nodes)}"
            self.nodes.append(Node(node.op_type, name, inputs, list(node.output), attrs))

    def _set_quant(self, name: str, params: list[str]) -> Quant:
        scale = self.consts[params[0]]
        zero = self.consts[params[1]] if len(params) > 1 and params[1] else np.zeros(1, np.uint8)
        quant = _int8_domain(scale, zero)
        self.quant[name] = quant
        self.raw_zero[name] = (float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]))
        return quant

    def _quantize(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        source, out = inputs[0], node.output[0]
        previous = self.quant.get(source)
        if previous is None:
            self._set_quant(source, inputs[1:])
            self.alias[out] = source
            return
        new = self._set_quant(out, inputs[1:])
        if new.same_as(previous):
            del self.quant[out]
            self.alias[out] = source
        else:
            self.nodes.append(Node("Requantize", node.name or out, [source], [out], {}))

    def _pad_value(self, data: str, value: str) -> str:
        array = self.consts[value]
        if array.dtype.kind == "f" or data not in self.raw_zero:
            return value
        scale, zero = self.raw_zero[data]
        real_name = f"{value}__real"
        self.consts[real_name] = np.asarray(
            (float(array.reshape(-1)[0]) - zero) * scale, np.float32
        )
        return real_name


def read_graph(proto: onnx.ModelProto) -> Graph:
    """The float-domain view of ``proto`` (see the module rules); shapes must be inferred."""
    reader = _Reader(proto)
    for node in proto.graph.node:
        reader.read(node)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for alias, source in reader.alias.items():
        if source in shapes:
            shapes.setdefault(alias, shapes[source])
    inputs = [i.name for i in proto.graph.input if i.name not in reader.consts]
    outputs = [reader.name(o.name) for o in proto.graph.output]
    return Graph(
        nodes=reader.nodes,
        consts=reader.consts,
        qconsts=reader.qconsts,
        quant=reader.quant,
        shapes=shapes,
        inputs=inputs,
        outputs=outputs,
        quantized=reader.quantized,
    )
