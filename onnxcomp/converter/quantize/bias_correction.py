"""Analytical bias correction of int8 weights (Nagel et al. 2019, "Data-Free Quantization" 4.2).

Quantizing W to int8 adds an error dW = dequant(W_q) - W, which shifts a layer's output by
E[dW x] = dW E[x] on average: a bias that per-tensor weights (and depthwise convolutions, with
few weights per channel) make large. With the per-channel means of each layer's float input,
collected in the calibration pass, the shift is subtracted from the layer's bias in the QDQ
graph that :func:`onnxcomp.converter.quantize.qdq.place_qdq` produced. The bias there is an int32
initializer dequantized with scale s_in x s_w; it is requantized (and created where the layer
had none). Border effects of padded convolutions (fewer taps at the edges) are ignored, as in
the paper.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp.converter.base import Skipped
from onnxcomp.core.proto import (
    Dequantized,
    attr,
    consumers_of,
    dequantized,
    initializers,
    label,
    node_key,
    producers_of,
)

QUANTIZED_SUFFIX = "_quantized"  # ORT names the int8 copy of weight W "W_quantized"
INT32 = np.iinfo(np.int32)


def bias_correction_inputs(float_model: onnx.ModelProto) -> list[str]:
    """Float tensors whose per-channel means bias correction needs: the data input of every
    Conv, Gemm and MatMul whose weight is an initializer."""
    initializers = {i.name for i in float_model.graph.initializer}
    names: dict[str, None] = {}
    for node in float_model.graph.node:
        if (
            node.op_type in LAYERS
            and len(node.input) > 1
            and node.input[1] in initializers
            and node.input[0] not in initializers
        ):
            names[node.input[0]] = None
    return list(names)


def float_weights(float_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float model's initializers by name (the weights :func:`correct_bias` compares to)."""
    return {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}


class Graph:
    """Producers, consumers and initializers of a ModelProto's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = initializers(model)
        self.producer = producers_of(model)
        self.consumers = consumers_of(model)
        self.outputs = {o.name for o in model.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def set_array(self, name: str, array: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(array, name))

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        tensor = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = self.model.graph.initializer[-1]
        return name

    def unique(self, name: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.model.graph.input}
        candidate, i = name, 1
        while candidate in taken:
            candidate, i = f"{name}_{i}", i + 1
        return candidate

    def dequantized(self, name: str) -> Dequantized | None:
        """``name`` as the output of a DequantizeLinear of initializers, else None."""
        return dequantized(self.producer.get(name), self.inits)

    def only_user(self, name: str, node: onnx.NodeProto) -> bool:
        users = self.consumers.get(name, [])
        return len(users) == 1 and users[0] is node and name not in self.outputs


def float_input(graph: Graph, node: onnx.NodeProto) -> str:
    """The float tensor behind a layer's data input (before its QuantizeLinear)."""
    name = node.input[0]
    dq = graph.producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = graph.producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
    return name


def _bias_scale(graph: Graph, node: onnx.NodeProto, weight: Dequantized) -> np.ndarray | None:
    """s_in x s_w for a new int32 bias, or None when the data input is not dequantized."""
    data = dequantized_activation(graph, node.input[0])
    if data is None:
        return None
    scale = (data * weight.scale.astype(np.float64)).astype(np.float32)
    return scale.reshape(-1) if scale.size > 1 else scale.reshape(())


def dequantized_activation(graph: Graph, name: str) -> float | None:
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale = graph.array(node.input[1])
    return None if scale is None or scale.size != 1 else float(scale.reshape(()))


def _update_input_bias(
    graph: Graph, node: onnx.NodeProto, weight: Dequantized, delta: np.ndarray
) -> str | None:
    """Add ``delta`` (per output channel) to the bias input 2; None, or why it cannot."""
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if not bias_name:
        return _create_bias(graph, node, weight, delta)
    if not graph.only_user(bias_name, node):
        return f"the bias '{bias_name}' is shared with other nodes"
    plain = graph.array(bias_name)
    if plain is not None:
        if plain.size != delta.size:
            return f"the bias '{bias_name}' is not one value per output channel"
        graph.set_array(bias_name, (plain + delta.reshape(plain.shape)).astype(plain.dtype))
        return None
    bias = graph.dequantized(bias_name)
    if bias is None or bias.q.dtype != np.int32 or bias.q.size != delta.size:
        return f"the bias '{bias_name}' is not a per-channel int32 DequantizeLinear"
    if any(u is not bias.node for u in graph.consumers.get(bias.node.input[0], [])):
        return f"the quantized bias '{bias.node.input[0]}' is shared with other nodes"
    new = bias.values().reshape(-1) + delta
    graph.set_array(bias.node.input[0], requantize(new, bias).reshape(bias.q.shape))
    return None


def requantize(values: np.ndarray, like: Dequantized) -> np.ndarray:
    """Float values as int32 with ``like``'s scale and zero point."""
    scale = like.scale.astype(np.float64).reshape(-1)
    zp = like.zero_point.astype(np.float64).reshape(-1)
    q = np.round(values / scale) + zp
    return np.clip(q, INT32.min, INT32.max).astype(np.int32)


def _create_bias(
    graph: Graph, node: onnx.NodeProto, weight: Dequantized, delta: np.ndarray
) -> str | None:
    """A new bias: int32 with scale s_in x s_w behind a DequantizeLinear, as ORT places it."""
    base = node_key(node)
    while len(node.input) < 3:
        node.input.append("")
    scale = _bias_scale(graph, node, weight)
    if scale is None:
        node.input[2] = graph.add_initializer(f"{base}_corrected_bias", delta.astype(np.float32))
        return None
    q = np.clip(np.round(delta / scale.astype(np.float64)), INT32.min, INT32.max)
    q_name = graph.add_initializer(f"{base}_corrected_bias_quantized", q.astype(np.int32))
    s_name = graph.add_initializer(f"{base}_corrected_bias_scale", scale)
    z_name = graph.add_initializer(
        f"{base}_corrected_bias_zero_point",
        np.zeros(scale.shape if scale.size > 1 else (), np.int32),
    )
    out = graph.unique(f"{base}_corrected_bias")
    attrs = {"axis": 0} if scale.size > 1 else {}
    dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=out, **attrs)
    nodes = graph.model.graph.node
    nodes.insert(list(nodes).index(node), dq)
    graph.producer[out] = dq
    node.input[2] = out
    return None


def _update_matmul_bias(graph: Graph, node: onnx.NodeProto, delta: np.ndarray) -> str | None:
    """A MatMul's bias is the float constant of the Add that follows it, if there is one."""
    users = graph.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in graph.outputs:
        return "no bias to correct (the MatMul is not followed by an Add of a constant)"
    add = users[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    plain = graph.array(other)
    if plain is None or plain.size != delta.size or not graph.only_user(other, add):
        return f"the Add after it does not add a float per-column constant ('{other}')"
    graph.set_array(other, (plain + delta.reshape(plain.shape)).astype(plain.dtype))
    return None


# --- per-op handlers --------------------------------------------------------------------------


class BiasHandler:
    """How bias correction treats one op type: the output shift, and where the bias is."""

    def output_shift(
        self, node: onnx.NodeProto, dw: np.ndarray, mean: np.ndarray
    ) -> np.ndarray | str:
        """E[dW x] per output channel from the input's channel means, or why it cannot."""
        raise NotImplementedError

    def creates_bias(self, node: onnx.NodeProto) -> bool:
        """Whether correcting the layer adds a bias it did not have."""
        return len(node.input) < 3 or not node.input[2]

    def update_bias(
        self, graph: Graph, node: onnx.NodeProto, weight: Dequantized, delta: np.ndarray
    ) -> str | None:
        """Add ``delta`` (per output channel) to the layer's bias; None, or why it cannot."""
        return _update_input_bias(graph, node, weight, delta)


class ConvBias(BiasHandler):
    """Conv: weight [M, C/group, k...]; the shift sums each output channel's taps."""

    def output_shift(self, node, dw, mean):
        group = int(attr(node, "group", 1))
        per_group = dw.shape[1]
        if per_group * group != mean.size:
            return f"{mean.size} input channel means for {per_group} x {group} weight inputs"
        taps = dw.reshape(dw.shape[0], per_group, -1).sum(axis=2)  # (M, C/g)
        group_of = np.arange(dw.shape[0]) // (dw.shape[0] // group)
        return (taps * mean.reshape(group, per_group)[group_of]).sum(axis=1)


class GemmBias(BiasHandler):
    """Gemm: alpha x mean @ B (B transposed with transB); the bias C is scaled by beta."""

    def output_shift(self, node, dw, mean):
        w = dw.T if int(attr(node, "transB", 0)) else dw
        if int(attr(node, "transA", 0)):
            return "Gemm with transA=1"
        if w.shape[0] != mean.size:
            return f"{mean.size} input feature means for {w.shape[0]} weight rows"
        return float(attr(node, "alpha", 1.0)) * (mean @ w)

    def update_bias(self, graph, node, weight, delta):
        if len(node.input) > 2 and node.input[2]:
            delta = delta / float(attr(node, "beta", 1.0))
        return _update_input_bias(graph, node, weight, delta)


class MatMulBias(BiasHandler):
    """MatMul: mean @ W (2-D weight); the bias is the constant of the Add that follows."""

    def output_shift(self, node, dw, mean):
        if dw.ndim != 2 or dw.shape[0] != mean.size:
            return (
                f"MatMul: {mean.size} means on axis 1 do not match the weight's {dw.shape[0]} rows"
            )
        return mean @ dw

    def creates_bias(self, node: onnx.NodeProto) -> bool:
        return False

    def update_bias(self, graph, node, weight, delta):
        return _update_matmul_bias(graph, node, delta)


LAYERS: dict[str, BiasHandler] = {"Conv": ConvBias(), "Gemm": GemmBias(), "MatMul": MatMulBias()}


def _correct_layer(
    graph: Graph,
    node: onnx.NodeProto,
    weights: Mapping[str, np.ndarray],
    means: Mapping[str, np.ndarray],
) -> str:
    """Correct one layer; returns the change line. Raises ValueError with the reason not to."""
    weight = graph.dequantized(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.q.dtype not in (np.int8, np.uint8):
        raise ValueError("its weight is not a DequantizeLinear of an int8 initializer")
    q_name = weight.node.input[0]
    name = q_name.removesuffix(QUANTIZED_SUFFIX)
    if name not in weights:
        raise ValueError(f"no float weight '{name}' for '{q_name}'")
    w = np.asarray(weights[name], np.float64)
    if w.shape != weight.q.shape:
        raise ValueError(f"float weight '{name}' has shape {w.shape}, not {weight.q.shape}")
    source = float_input(graph, node)
    if source not in means:
        raise ValueError(f"no channel means of its input '{source}'")
    handler = LAYERS[node.op_type]
    shift = handler.output_shift(node, weight.values() - w, np.asarray(means[source], np.float64))
    if isinstance(shift, str):
        raise ValueError(shift)
    created = handler.creates_bias(node)
    problem = handler.update_bias(graph, node, weight, -shift)
    if problem:
        raise ValueError(problem)
    what = ", bias created" if created else ""
    return (
        f"{label(node)}: bias corrected on {shift.size} channels by "
        f"mean |shift| {np.abs(shift).mean():.3g}, max {np.abs(shift).max():.3g}{what}"
    )


def correct_bias(
    qdq: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
    channel_means: Mapping[str, np.ndarray],
    skipped: list[Skipped] | None = None,
) -> list[str]:
    """Subtract E[dW x] = dW E[x] from the bias of every int8 Conv, Gemm and MatMul of ``qdq``
    (changed in place). ``float_weights`` maps the float weights' names (ORT's quantized copy
    of W is ``W_quantized``); ``channel_means`` maps the float input tensors named by
    :func:`bias_correction_inputs` to their per-channel means (axis 1). Returns one line per
    corrected layer; layers left alone go to ``skipped`` with the reason."""
    graph = Graph(qdq)
    changes: list[str] = []
    for node in list(qdq.graph.node):
        if node.op_type not in LAYERS:
            continue
        try:
            changes.append(_correct_layer(graph, node, float_weights, channel_means))
        except ValueError as reason:
            if skipped is not None:
                skipped.append(Skipped(node_key(node), str(reason)))
    return changes
