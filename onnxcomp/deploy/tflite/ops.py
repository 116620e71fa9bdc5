"""ONNX ops lowered to TFLite builtins, one handler per op type (``HANDLERS``).

Layout: every 4-D activation lives in NHWC (``Lowering.get`` inserts a TRANSPOSE when an op
needs the other layout, once per tensor); other ranks keep ONNX's order. In int8 graphs,
ops whose input and output parameters must be equal in TFLite (MaxPool, AveragePool, Reshape,
Pad, StridedSlice, Concat inputs, Softmax's fixed output) take the parameters they need and
a QUANTIZE requantizes to the ONNX graph's parameters where those differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from onnxcomp.deploy.tflite.flatbuf import FlatModel, Quant
from onnxcomp.deploy.tflite.qdq import Graph, Node, QConst
from onnxcomp.errors import OnnxcompError

NHWC, PLAIN = "nhwc", "plain"
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
NCHW_AXIS_IN_NHWC = {0: 0, 1: 3, 2: 1, 3: 2}
# Operator versions for int8 kernels (the interpreter matches kernels by version).
INT8_VERSIONS = {
    "CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MUL": 2,
    "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "MEAN": 2, "CONCATENATION": 2, "PAD": 2,
    "STRIDED_SLICE": 2, "SOFTMAX": 2, "QUANTIZE": 2, "DEQUANTIZE": 2, "TRANSPOSE": 2,
    "RELU": 2, "RELU6": 2, "RESHAPE": 1,
}  # fmt: skip


class Lowering:
    """The state of one lowering: graph, flatbuffer, tensor map and notes."""

    def __init__(self, graph: Graph, flat: FlatModel, ranges: dict[str, tuple[float, float]]):
        self.g = graph
        self.flat = flat
        self.ranges = ranges
        self.tensors: dict[str, tuple[int, str]] = {}
        self.transposed: dict[tuple[str, str], int] = {}
        self.skip: set[int] = set()
        self.notes: list[str] = []

    # -- tensors -------------------------------------------------------------------------
    @property
    def act_dtype(self) -> type:
        return np.int8 if self.g.quantized else np.float32

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.g.shapes:
            raise OnnxcompError(
                f"TFLite writer: tensor '{name}' has no static shape; TFLite needs static "
                "shapes: fix the input shapes (onnxsim or --input-shape) and export again"
            )
        return self.g.shapes[name]

    def quant(self, name: str) -> Quant | None:
        if not self.g.quantized:
            return None
        if name in self.g.quant:
            return self.g.quant[name]
        if name in self.ranges:
            low, high = self.ranges[name]
            quant = range_quant(low, high)
            self.g.quant[name] = quant
            return quant
        raise OnnxcompError(
            f"TFLite writer: tensor '{name}' has no quantization parameters in the QDQ model "
            "and no calibrated range; pass the calibration table's ranges"
        )

    def new_act(self, name: str, layout: str, quant: Quant | None = None, shape=None) -> int:
        """A new activation tensor for ONNX tensor ``name`` in ``layout``."""
        shape = tuple(shape if shape is not None else self.shape(name))
        if layout == NHWC and len(shape) == 4:
            shape = tuple(shape[i] for i in TO_NHWC)
        if quant is None and self.g.quantized:
            quant = self.quant(name)
        index = self.flat.tensor(name, shape, self.act_dtype, quant=quant)
        self.tensors[name] = (index, layout if len(shape) == 4 else PLAIN)
        return index

    def layout(self, name: str) -> str:
        return self.tensors[name][1]

    def get(self, name: str, layout: str) -> int:
        """The TFLite tensor of activation ``name`` in ``layout`` (transposed once if needed)."""
        if name not in self.tensors:
            raise OnnxcompError(f"TFLite writer: tensor '{name}' is not produced by any lowered op")
        index, current = self.tensors[name]
        if current == layout or len(self.shape(name)) != 4:
            return index
        key = (name, layout)
        if key not in self.transposed:
            perm = TO_NHWC if layout == NHWC else TO_NCHW
            tensor = self.flat.tensors[index]
            shape = tuple(int(tensor.shape[i]) for i in perm)
            quant = self.g.quant.get(name) if self.g.quantized else None
            out = self.flat.tensor(f"{name}__{layout}", shape, self.act_dtype, quant=quant)
            self.op("TRANSPOSE", [index, self.flat.const(f"{name}__perm", np.int32(perm))], [out])
            self.transposed[key] = out
        return self.transposed[key]

    def op(self, code: str, inputs: list[int], outputs: list[int], options=None) -> None:
        version = INT8_VERSIONS.get(code, 1) if self.g.quantized else 1
        self.flat.op(code, inputs, outputs, options, version)

    def requantize_to(self, name: str, source: int, have: Quant | None) -> None:
        """Register ``name``: ``source`` itself, or a QUANTIZE of it when parameters differ."""
        index, layout = source, self.flat_layout(source)
        if self.g.quantized:
            if name not in self.g.quant and name not in self.ranges and have is not None:
                self.g.quant[name] = have
            want = self.quant(name)
            if not want.same_as(have):
                shape = tuple(int(d) for d in self.flat.tensors[source].shape)
                index = self.flat.tensor(name, shape, np.int8, quant=want)
                self.op("QUANTIZE", [source], [index])
        self.tensors[name] = (index, layout)

    def flat_layout(self, index: int) -> str:
        for tensor_index, layout in self.tensors.values():
            if tensor_index == index:
                return layout
        return NHWC

    def fused_activation(self, node: Node) -> tuple[str, str]:
        """(activation, output name): a following Relu / Clip(0, 6) is fused when it is the
        only reader; its node is then skipped."""
        out = node.outputs[0]
        readers = self.g.readers(out)
        if out in self.g.outputs or len(readers) != 1:
            return "NONE", out
        reader = readers[0]
        kind = activation_kind(self.g, reader)
        if kind is None:
            return "NONE", out
        self.skip.add(id(reader))
        if self.g.quantized and out in self.g.quant and reader.outputs[0] not in self.g.quant:
            self.g.quant[reader.outputs[0]] = self.g.quant[out]
        if reader.outputs[0] in self.g.shapes or out not in self.g.shapes:
            return kind, reader.outputs[0]
        self.g.shapes[reader.outputs[0]] = self.g.shapes[out]
        return kind, reader.outputs[0]


def range_quant(low: float, high: float) -> Quant:
    """int8 asymmetric parameters covering [low, high] and zero."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-8)
    zero = int(np.clip(round(-128 - low / scale), -128, 127))
    return Quant.per_tensor(scale, zero)


def activation_kind(graph: Graph, node: Node) -> str | None:
    if node.op == "Relu":
        return "RELU"
    if node.op == "Clip":
        low, high = clip_bounds(graph, node)
        if low == 0.0 and high == 6.0:
            return "RELU6"
        if low == 0.0 and high == math.inf:
            return "RELU"
    return None


def clip_bounds(graph: Graph, node: Node) -> tuple[float, float]:
    low, high = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
    if len(node.inputs) > 1 and node.inputs[1]:
        low = float(graph.real(node.inputs[1]))
    if len(node.inputs) > 2 and node.inputs[2]:
        high = float(graph.real(node.inputs[2]))
    return float(low), float(high)  # type: ignore[arg-type]


def unsupported(node: Node, why: str = "") -> OnnxcompError:
    known = ", ".join(sorted(HANDLERS))
    detail = f" ({why})" if why else ""
    return OnnxcompError(
        f"TFLite writer: op {node.op} (node '{node.name}') is not supported{detail}; "
        f"supported ops: {known}"
    )


# -- weights ---------------------------------------------------------------------------------
def int8_weights(low: Lowering, name: str, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values (ONNX layout) and per-output-channel scales, zero point 0.

    Kept exact when the ONNX weights are int8 with zero point 0 (a per-tensor scale repeats
    per channel); requantized symmetric per channel otherwise (noted)."""
    graph, channels = low.g, low.g.real(name).shape[out_axis]
    qc = graph.qconsts.get(name)
    exact = qc is not None and qc.values.dtype == np.int8 and not np.any(qc.zero_point)
    if exact and (qc.scale.size == 1 or qc.axis == out_axis):
        return qc.values, np.broadcast_to(qc.scale.astype(np.float64), (channels,)).copy()
    why = "float" if qc is None else f"{qc.values.dtype} zero point/axis"
    low.notes.append(f"weights '{name}' ({why}) requantized to int8 symmetric per channel")
    real = np.moveaxis(graph.real(name).astype(np.float64), out_axis, 0)
    scale = np.abs(real.reshape(channels, -1)).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    values = np.clip(np.round(real / scale.reshape(-1, *[1] * (real.ndim - 1))), -127, 127)
    return np.moveaxis(values.astype(np.int8), 0, out_axis), scale


def int32_bias(low: Lowering, name: str | None, s_in: float, s_w: np.ndarray) -> np.ndarray:
    """Bias at scale s_in * s_w: the ONNX int32 values when they use that scale."""
    expected = s_in * s_w
    if not name:
        return np.zeros(len(s_w), np.int32)
    qc: QConst | None = low.g.qconsts.get(name)
    if (
        qc is not None
        and qc.values.dtype == np.int32
        and not np.any(qc.zero_point)
        and np.allclose(np.broadcast_to(qc.scale, expected.shape), expected, rtol=1e-5)
    ):
        return qc.values.reshape(-1).astype(np.int32)
    low.notes.append(f"bias '{name}' requantized to int32 at input scale x weight scale")
    real = low.g.real(name).reshape(-1).astype(np.float64)
    return np.clip(np.round(real / expected), -(2**31), 2**31 - 1).astype(np.int32)


def float_bias(low: Lowering, name: str | None, channels: int) -> np.ndarray:
    if not name:
        return np.zeros(channels, np.float32)
    return low.g.real(name).reshape(-1).astype(np.float32)


# -- padding ---------------------------------------------------------------------------------
def padding_mode(hw, kernel, strides, dilations, pads) -> str | None:
    """'SAME' or 'VALID' when TFLite's padding equals ONNX's explicit ``pads``, else None."""
    if not any(pads):
        return "VALID"
    same = []
    for size, k, s, d in zip(hw, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        same.append((total // 2, total - total // 2))
    if list(pads) == [same[0][0], same[1][0], same[0][1], same[1][1]]:
        return "SAME"
    return None


def spatial(node: Node, x_shape, kernel) -> tuple[list[int], list[int], list[int], str | None]:
    strides = list(node.attrs.get("strides", [1, 1]))  # type: ignore[call-overload]
    dilations = list(node.attrs.get("dilations", [1, 1]))  # type: ignore[call-overload]
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    auto = node.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "VALID"):
        return strides, dilations, [0] * 4, "SAME" if auto == "SAME_UPPER" else "VALID"
    if auto not in ("NOTSET", ""):
        raise unsupported(node, f"auto_pad {auto}")
    return strides, dilations, pads, padding_mode(x_shape[2:], kernel, strides, dilations, pads)


def explicit_pad(low: Lowering, name: str, x: int, pads: list[int]) -> int:
    """A PAD (zeros; the zero point in int8) before an op whose padding TFLite cannot say."""
    tensor = low.flat.tensors[x]
    n, h, w, c = (int(d) for d in tensor.shape)
    shape = (n, h + pads[0] + pads[2], w + pads[1] + pads[3], c)
    paddings = np.int32([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]])
    quant = low.g.quant.get(name) if low.g.quantized else None
    out = low.flat.tensor(f"{name}__padded", shape, low.act_dtype, quant=quant)
    low.op("PAD", [x, low.flat.const(f"{name}__paddings", paddings)], [out])
    return out


# -- handlers --------------------------------------------------------------------------------
def lower_conv(low: Lowering, node: Node) -> None:
    x_name, w_name = node.inputs[0], node.inputs[1]
    b_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if not low.g.is_const(w_name):
        raise unsupported(node, "weights are not constant")
    weight = low.g.real(w_name)
    x_shape = low.shape(x_name)
    if len(x_shape) != 4:
        raise unsupported(node, f"{len(x_shape) - 2}-D convolution; only 2-D")
    group = int(node.attrs.get("group", 1))  # type: ignore[call-overload]
    cout, cin = weight.shape[0], x_shape[1]
    depthwise = group > 1 and group == cin and weight.shape[1] == 1
    if group != 1 and not depthwise:
        raise unsupported(node, f"grouped convolution with group {group}")
    strides, dilations, pads, mode = spatial(node, x_shape, weight.shape[2:])
    x = low.get(x_name, NHWC)
    if mode is None:
        x, mode = explicit_pad(low, x_name, x, pads), "VALID"
    activation, out_name = low.fused_activation(node)
    if low.g.quantized:
        values, s_w = int8_weights(low, w_name, 0)
        s_in = low.g.quant[x_name].scale[0]
        bias = low.flat.const(
            f"{node.name}__bias",
            int32_bias(low, b_name, s_in, s_w),
            Quant(tuple(s_in * s_w), (0,) * cout),
        )
        w_quant_axis = 3 if depthwise else 0
        w_quant = Quant(tuple(s_w), (0,) * cout, w_quant_axis)
    else:
        values, w_quant = weight.astype(np.float32), None
        bias = low.flat.const(f"{node.name}__bias", float_bias(low, b_name, cout))
    # depthwise [Cout, 1, kh, kw] -> [1, kh, kw, Cout]; otherwise OIHW -> OHWI
    values = values.transpose(1, 2, 3, 0) if depthwise else values.transpose(0, 2, 3, 1)
    w = low.flat.const(f"{w_name}__tfl", np.ascontiguousarray(values), w_quant)
    out = low.new_act(out_name, NHWC, shape=low.shape(node.outputs[0]))
    fields = dict(
        padding=getattr(low.flat.fb.Padding, mode),
        strideH=strides[0],
        strideW=strides[1],
        dilationHFactor=dilations[0],
        dilationWFactor=dilations[1],
        fusedActivationFunction=getattr(low.flat.fb.ActivationFunctionType, activation),
    )
    if depthwise:
        options = low.flat.options("DepthwiseConv2DOptions", depthMultiplier=cout // cin, **fields)
        low.op("DEPTHWISE_CONV_2D", [x, w, bias], [out], options)
    else:
        low.op("CONV_2D", [x, w, bias], [out], low.flat.options("Conv2DOptions", **fields))


def lower_gemm(low: Lowering, node: Node) -> None:
    a_name, w_name = node.inputs[0], node.inputs[1]
    b_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if not low.g.is_const(w_name) or low.g.real(w_name).ndim != 2:
        raise unsupported(node, "the weight is not a 2-D constant")
    if len(low.shape(a_name)) != 2:
        raise unsupported(node, "input is not 2-D")
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
            raise unsupported(node, "transA or alpha != 1")
        if b_name and node.attrs.get("beta", 1.0) != 1.0:
            raise unsupported(node, "beta != 1")
        out_axis = 0 if node.attrs.get("transB", 0) else 1
    else:
        out_axis = 1
    cout = low.g.real(w_name).shape[out_axis]
    if b_name and low.g.real(b_name).size != cout:
        raise unsupported(node, "bias is not one value per output")
    x = low.get(a_name, PLAIN)
    activation, out_name = low.fused_activation(node)
    if low.g.quantized:
        values, s_w = int8_weights(low, w_name, out_axis)
        s_in = low.g.quant[a_name].scale[0]
        bias_values = int32_bias(low, b_name, s_in, s_w)
        bias = low.flat.const(
            f"{node.name}__bias", bias_values, Quant(tuple(s_in * s_w), (0,) * cout)
        )
        w_quant = Quant(tuple(s_w), (0,) * cout, 0)
        if out_name not in low.g.quant and out_name not in low.ranges:
            low.g.quant[out_name] = bound_quant(
                low, a_name, values, s_w, bias_values, s_in, out_axis
            )
    else:
        values, w_quant = low.g.real(w_name).astype(np.float32), None
        bias = low.flat.const(f"{node.name}__bias", float_bias(low, b_name, cout))
    values = values if out_axis == 0 else values.T
    w = low.flat.const(f"{w_name}__tfl", np.ascontiguousarray(values), w_quant)
    out = low.new_act(out_name, PLAIN, shape=low.shape(node.outputs[0]))
    options = low.flat.options(
        "FullyConnectedOptions",
        fusedActivationFunction=getattr(low.flat.fb.ActivationFunctionType, activation),
    )
    low.op("FULLY_CONNECTED", [x, w, bias], [out], options)


def bound_quant(low, a_name, values, s_w, bias, s_in, out_axis) -> Quant:
    """Output parameters of an int8 layer the QDQ graph leaves float (a classifier's logits),
    from the range its input's parameters allow: a safe bound, coarser than calibration."""
    q = low.g.quant[a_name]
    x_low = (-128 - q.zero_point[0]) * q.scale[0]
    x_high = (127 - q.zero_point[0]) * q.scale[0]
    w = np.moveaxis(values.astype(np.float64), out_axis, 0) * s_w[:, None]
    b = bias.astype(np.float64) * s_in * s_w
    high = (np.maximum(w * x_low, w * x_high).sum(axis=1) + b).max()
    lowest = (np.minimum(w * x_low, w * x_high).sum(axis=1) + b).min()
    low.notes.append(
        f"'{a_name}' -> FULLY_CONNECTED output has no calibrated range in the QDQ model: "
        f"int8 range [{lowest:.3g}, {high:.3g}] bounded from its input range (coarser than a "
        "calibrated one; pass the calibration table for a tighter range)"
    )
    return range_quant(float(lowest), float(high))


def lower_binary(low: Lowering, node: Node) -> None:
    code = {"Add": "ADD", "Mul": "MUL"}[node.op]
    out_shape = low.shape(node.outputs[0])
    layout = NHWC if len(out_shape) == 4 else PLAIN
    operands = [operand(low, node, name, layout, len(out_shape)) for name in node.inputs[:2]]
    activation, out_name = low.fused_activation(node)
    out = low.new_act(out_name, layout, shape=out_shape)
    kind = "AddOptions" if code == "ADD" else "MulOptions"
    fused = getattr(low.flat.fb.ActivationFunctionType, activation)
    low.op(code, operands, [out], low.flat.options(kind, fusedActivationFunction=fused))


def operand(low: Lowering, node: Node, name: str, layout: str, rank: int) -> int:
    if not low.g.is_const(name):
        return low.get(name, layout)
    value = low.g.real(name).astype(np.float32)
    value = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if layout == NHWC and rank == 4:
        value = value.transpose(TO_NHWC)
    if not low.g.quantized:
        return low.flat.const(f"{name}__{node.name}", np.ascontiguousarray(value))
    quant = range_quant(float(value.min()), float(value.max()))
    q = np.clip(np.round(value / quant.scale[0]) + quant.zero_point[0], -128, 127)
    low.notes.append(f"constant '{name}' of {node.op} '{node.name}' quantized to int8")
    return low.flat.const(f"{name}__{node.name}", q.astype(np.int8), quant)


def lower_activation(low: Lowering, node: Node) -> None:
    kind = activation_kind(low.g, node)
    if kind is None:
        raise unsupported(node, "Clip bounds other than [0, 6] or [0, inf)")
    x = node.inputs[0]
    layout = low.layout(x)
    out = low.new_act(node.outputs[0], layout, shape=low.shape(node.outputs[0]))
    low.op(kind, [low.get(x, layout)], [out])


def same_params_op(low: Lowering, node: Node, x_name: str, layout: str, build) -> None:
    """Lower an op whose TFLite output parameters equal its input's, then requantize to
    the ONNX output parameters where they differ."""
    x = low.get(x_name, layout)
    have = low.g.quant.get(x_name) if low.g.quantized else None
    shape = low.shape(node.outputs[0])
    if layout == NHWC and len(shape) == 4:
        shape = tuple(shape[i] for i in TO_NHWC)
    tmp = low.flat.tensor(f"{node.outputs[0]}__raw", shape, low.act_dtype, quant=have)
    build(x, tmp)
    low.tensors[node.outputs[0]] = (tmp, layout if len(shape) == 4 else PLAIN)
    low.requantize_to(node.outputs[0], tmp, have)


def lower_pool(low: Lowering, node: Node) -> None:
    x_name = node.inputs[0]
    x_shape = low.shape(x_name)
    if node.attrs.get("ceil_mode", 0):
        raise unsupported(node, "ceil_mode=1")
    kernel = list(node.attrs["kernel_shape"])  # type: ignore[call-overload]
    strides, dilations, pads, mode = spatial(node, x_shape, kernel)
    if any(d != 1 for d in dilations):
        raise unsupported(node, "dilated pooling")
    include = node.attrs.get("count_include_pad", 0)
    if mode is None and not (node.op == "AveragePool" and include):
        raise unsupported(node, f"padding {pads} is neither TFLite SAME nor VALID")
    if mode == "SAME" and node.op == "AveragePool" and include:
        mode = None
    code = "MAX_POOL_2D" if node.op == "MaxPool" else "AVERAGE_POOL_2D"
    options = low.flat.options(
        "Pool2DOptions",
        padding=getattr(low.flat.fb.Padding, mode or "VALID"),
        strideH=strides[0],
        strideW=strides[1],
        filterHeight=kernel[0],
        filterWidth=kernel[1],
    )

    def build(x: int, out: int) -> None:
        if mode is None:
            x = explicit_pad(low, x_name, x, pads)
        low.op(code, [x], [out], options)

    same_params_op(low, node, x_name, NHWC, build)


def lower_global_pool(low: Lowering, node: Node) -> None:
    x_name = node.inputs[0]
    if len(low.shape(x_name)) != 4:
        raise unsupported(node, "input is not 4-D")
    x = low.get(x_name, NHWC)
    axes = low.flat.const(f"{node.name}__axes", np.int32([1, 2]))
    out = low.new_act(node.outputs[0], NHWC)
    low.op("MEAN", [x, axes], [out], low.flat.options("ReducerOptions", keepDims=True))


def lower_reshape(low: Lowering, node: Node) -> None:
    x_name = node.inputs[0]
    x_shape, out_shape = low.shape(x_name), low.shape(node.outputs[0])
    if node.op == "Reshape" and not low.g.is_const(node.inputs[1]):
        raise unsupported(node, "shape is not constant")
    nhwc_ok = len(x_shape) == 4 and x_shape[2] == x_shape[3] == 1 and low.layout(x_name) == NHWC
    layout = NHWC if nhwc_ok else PLAIN
    new_shape = list(out_shape)
    if x_shape and out_shape and x_shape[0] == out_shape[0]:
        new_shape[0] = -1
    out_layout = PLAIN

    def build(x: int, out: int) -> None:
        shape_const = low.flat.const(f"{node.name}__shape", np.int32(new_shape))
        low.op("RESHAPE", [x, shape_const], [out])

    if len(out_shape) == 4 and layout == NHWC:
        raise unsupported(node, "reshape of NHWC data to 4-D")
    x = low.get(x_name, layout)
    have = low.g.quant.get(x_name) if low.g.quantized else None
    tmp = low.flat.tensor(f"{node.outputs[0]}__raw", out_shape, low.act_dtype, quant=have)
    build(x, tmp)
    low.tensors[node.outputs[0]] = (tmp, out_layout)
    low.requantize_to(node.outputs[0], tmp, have)


def lower_concat(low: Lowering, node: Node) -> None:
    out_shape = low.shape(node.outputs[0])
    rank = len(out_shape)
    layout = NHWC if rank == 4 else PLAIN
    axis = int(node.attrs.get("axis", 0)) % rank  # type: ignore[call-overload]
    if layout == NHWC:
        axis = NCHW_AXIS_IN_NHWC[axis]
    want = low.quant(node.outputs[0]) if low.g.quantized else None
    inputs = []
    for name in node.inputs:
        index = operand(low, node, name, layout, rank)
        if want is not None and not want.same_as(low.g.quant.get(name)):
            shape = tuple(int(d) for d in low.flat.tensors[index].shape)
            requantized = low.flat.tensor(f"{name}__for_{node.name}", shape, np.int8, quant=want)
            low.op("QUANTIZE", [index], [requantized])
            index = requantized
        inputs.append(index)
    out = low.new_act(node.outputs[0], layout, quant=want)
    low.op("CONCATENATION", inputs, [out], low.flat.options("ConcatenationOptions", axis=axis))


def lower_pad(low: Lowering, node: Node) -> None:
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise unsupported(node, f"mode {mode}")
    if len(node.inputs) > 1 and node.inputs[1]:
        pads = [int(p) for p in low.g.real(node.inputs[1]).reshape(-1)]
    else:
        pads = list(node.attrs.get("pads", []))  # type: ignore[call-overload]
    if len(node.inputs) > 2 and node.inputs[2] and float(low.g.real(node.inputs[2])) != 0.0:
        raise unsupported(node, "constant value other than 0")
    if len(node.inputs) > 3 and node.inputs[3]:
        raise unsupported(node, "axes input")
    x_name = node.inputs[0]
    rank = len(low.shape(x_name))
    layout = NHWC if rank == 4 else PLAIN
    pairs = [[pads[i], pads[i + rank]] for i in range(rank)]
    if any(p < 0 for pair in pairs for p in pair):
        raise unsupported(node, "negative pads")
    if layout == NHWC:
        pairs = [pairs[i] for i in TO_NHWC]
    paddings = low.flat.const(f"{node.name}__paddings", np.int32(pairs))
    same_params_op(low, node, x_name, layout, lambda x, out: low.op("PAD", [x, paddings], [out]))


def lower_slice(low: Lowering, node: Node) -> None:
    x_name = node.inputs[0]
    shape = low.shape(x_name)
    rank = len(shape)
    const = [low.g.real(n).reshape(-1).astype(np.int64) if n else None for n in node.inputs[1:5]]
    if any(c is None for c in const[:2]) or any(
        n and not low.g.is_const(n) for n in node.inputs[1:5]
    ):
        raise unsupported(node, "starts/ends not constant")
    starts, ends = const[0], const[1]
    axes = const[2] if len(const) > 2 and const[2] is not None else np.arange(len(starts))
    steps = const[3] if len(const) > 3 and const[3] is not None else np.ones(len(starts), np.int64)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    sliced = set()
    for start, stop, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) % rank
        if step <= 0:
            raise unsupported(node, "negative steps")
        size = shape[axis]
        start = int(np.clip(start + size if start < 0 else start, 0, size))
        stop = int(np.clip(stop + size if stop < 0 else stop, 0, size))
        begin[axis], end[axis], stride[axis] = start, stop, int(step)
        sliced.add(axis)
    layout = NHWC if rank == 4 else PLAIN
    if layout == NHWC:
        begin, end, stride = ([v[i] for i in TO_NHWC] for v in (begin, end, stride))
    tensors = [low.flat.const(f"{node.name}__{k}", np.int32(v)) for k, v in
               (("begin", begin), ("end", end), ("strides", stride))]  # fmt: skip
    whole = [axis not in sliced for axis in range(rank)]  # masks keep a resized batch whole
    if layout == NHWC:
        whole = [whole[i] for i in TO_NHWC]
    mask = sum(1 << i for i, flag in enumerate(whole) if flag)
    options = low.flat.options("StridedSliceOptions", beginMask=mask, endMask=mask)
    same_params_op(
        low,
        node,
        x_name,
        layout,
        lambda x, out: low.op("STRIDED_SLICE", [x, *tensors], [out], options),
    )


def lower_softmax(low: Lowering, node: Node) -> None:
    x_name = node.inputs[0]
    rank = len(low.shape(x_name))
    axis = int(node.attrs.get("axis", -1)) % rank  # type: ignore[call-overload]
    if axis != rank - 1 or rank == 4:
        raise unsupported(node, "softmax over an axis other than the last of a 2-D/3-D tensor")
    x = low.get(x_name, PLAIN)
    fixed = Quant.per_tensor(1.0 / 256.0, -128) if low.g.quantized else None
    tmp = low.flat.tensor(
        f"{node.outputs[0]}__raw", low.shape(node.outputs[0]), low.act_dtype, quant=fixed
    )
    low.op("SOFTMAX", [x], [tmp], low.flat.options("SoftmaxOptions", beta=1.0))
    low.tensors[node.outputs[0]] = (tmp, PLAIN)
    if low.g.quantized and node.outputs[0] not in low.g.quant and node.outputs[0] not in low.ranges:
        low.g.quant[node.outputs[0]] = fixed  # type: ignore[assignment]
    low.requantize_to(node.outputs[0], tmp, fixed)


def lower_requantize(low: Lowering, node: Node) -> None:
    x_name = node.inputs[0]
    layout = low.layout(x_name)
    low.requantize_to(node.outputs[0], low.get(x_name, layout), low.g.quant.get(x_name))


HANDLERS: dict[str, Callable[[Lowering, Node], None]] = {
    "Conv": lower_conv,
    "Gemm": lower_gemm,
    "MatMul": lower_gemm,
    "Add": lower_binary,
    "Mul": lower_binary,
    "Relu": lower_activation,
    "Clip": lower_activation,
    "MaxPool": lower_pool,
    "AveragePool": lower_pool,
    "GlobalAveragePool": lower_global_pool,
    "Flatten": lower_reshape,
    "Reshape": lower_reshape,
    "Concat": lower_concat,
    "Pad": lower_pad,
    "Slice": lower_slice,
    "Softmax": lower_softmax,
    "Requantize": lower_requantize,
}
