"""Per-op converters of the ONNX -> torch importer: a registry, op type -> converter.

A converter reads a node's attributes once, at import, and returns what runs it: a function
``f(inputs) -> outputs`` (inputs in the node's order, None where omitted; outputs a tuple) or,
where the op has state or depends on train/eval mode, an ``nn.Module`` with the same call.
``trainable`` names the input slots whose float initializers become ``nn.Parameter``s (weights,
biases, BatchNorm scale and bias); every other initializer stays a buffer. Shape-like inputs
(Reshape's shape, Slice's bounds, Pad's pads...) are read at run time, so shapes computed by
Shape/Gather/Concat chains work as well as constants. Adding an op is adding a function and a
``@register`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxcomp.core.graph import attr_float, attr_int, attr_ints

Tensor = torch.Tensor
Run = Callable[[Sequence[Tensor | None]], tuple[Tensor, ...]]


@dataclass(frozen=True)
class Converter:
    build: Callable[[ir.Node], Run | nn.Module]
    trainable: tuple[int, ...] = ()


CONVERTERS: dict[str, Converter] = {}


def register(*op_types: str, trainable: tuple[int, ...] = ()) -> Callable:
    def decorate(build: Callable[[ir.Node], Run | nn.Module]) -> Callable:
        for op_type in op_types:
            CONVERTERS[op_type] = Converter(build, trainable)
        return build

    return decorate


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _opt(inputs: Sequence[Tensor | None], i: int) -> Tensor | None:
    return inputs[i] if len(inputs) > i else None


def _attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return attr.as_string() if attr is not None else default


# ---- weighted layers -------------------------------------------------------------------


def _conv_geometry(node: ir.Node, spatial: int) -> tuple[list[int], list[int], list[int]]:
    strides = attr_ints(node, "strides") or [1] * spatial
    dilations = attr_ints(node, "dilations") or [1] * spatial
    pads = attr_ints(node, "pads") or [0] * (2 * spatial)
    return strides, dilations, pads


def _same_pads(x: Tensor, kernel: Sequence[int], strides, dilations, upper: bool) -> list[int]:
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
        out = -(-int(size) // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - int(size), 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] (spatial axes) -> F.pad's [b_last, e_last, ...]."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


@register("Conv", trainable=(1, 2))
def conv(node: ir.Node) -> Run:
    auto_pad = _attr_str(node, "auto_pad", "NOTSET")
    group = attr_int(node, "group", 1)

    def run(inputs):
        x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
        spatial = w.dim() - 2
        strides, dilations, pads = _conv_geometry(node, spatial)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            kernel = list(w.shape[2:])
            pads = _same_pads(x, kernel, strides, dilations, auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = [0] * (2 * spatial)
        fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
        if pads[:spatial] == pads[spatial:]:
            return (fn(x, w, b, strides, pads[:spatial], dilations, group),)
        x = F.pad(x, _torch_pads(pads))
        return (fn(x, w, b, strides, 0, dilations, group),)

    return run


@register("ConvTranspose", trainable=(1, 2))
def conv_transpose(node: ir.Node) -> Run:
    group = attr_int(node, "group", 1)

    def run(inputs):
        x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
        spatial = w.dim() - 2
        strides, dilations, pads = _conv_geometry(node, spatial)
        extra = attr_ints(node, "output_padding") or [0] * spatial
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
        y = fn(x, w, b, strides, 0, extra, group, dilations)
        index = [slice(None), slice(None)]
        for i in range(spatial):
            index.append(slice(pads[i], y.shape[2 + i] - pads[spatial + i]))
        return (y[tuple(index)],)

    return run


@register("Gemm", trainable=(1, 2))
def gemm(node: ir.Node) -> Run:
    alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)

    def run(inputs):
        a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        y = y * alpha if alpha != 1.0 else y
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return (y,)

    return run


@register("MatMul", trainable=(0, 1))
def matmul(node: ir.Node) -> Run:
    return lambda inputs: (torch.matmul(inputs[0], inputs[1]),)


@register("PRelu", trainable=(1,))
def prelu(node: ir.Node) -> Run:
    return lambda inputs: (torch.where(inputs[0] >= 0, inputs[0], inputs[0] * inputs[1]),)


# ---- element-wise ------------------------------------------------------------------------


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": torch.pow}
_TRAINABLE_BINARY = ("Add", "Sub", "Mul")  # a bias added after MatMul, a learned scale
_UNARY = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Erf": torch.erf,
    "Identity": lambda x: x,
}


@register("Div", "Pow")
@register(*_TRAINABLE_BINARY, trainable=(0, 1))
def binary(node: ir.Node) -> Run:
    fn = _BINARY[node.op_type]
    return lambda inputs: (fn(inputs[0], inputs[1]),)


@register(*_UNARY)
def unary(node: ir.Node) -> Run:
    fn = _UNARY[node.op_type]
    return lambda inputs: (fn(inputs[0]),)


@register("LeakyRelu")
def leaky_relu(node: ir.Node) -> Run:
    alpha = attr_float(node, "alpha", 0.01)
    return lambda inputs: (F.leaky_relu(inputs[0], alpha),)


@register("HardSigmoid")
def hard_sigmoid(node: ir.Node) -> Run:
    alpha, beta = attr_float(node, "alpha", 0.2), attr_float(node, "beta", 0.5)
    return lambda inputs: (torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0),)


@register("HardSwish")
def hard_swish(node: ir.Node) -> Run:
    return lambda inputs: (F.hardswish(inputs[0]),)


@register("Clip")
def clip(node: ir.Node) -> Run:
    low = node.attributes.get("min")
    high = node.attributes.get("max")
    attr_low = low.as_float() if low is not None else None
    attr_high = high.as_float() if high is not None else None

    def run(inputs):
        lo, hi = _opt(inputs, 1), _opt(inputs, 2)
        lo = attr_low if lo is None else lo
        hi = attr_high if hi is None else hi
        x = inputs[0]
        if lo is not None:
            x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
        if hi is not None:
            x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
        return (x,)

    return run


class Dropout(nn.Module):
    """Identity in eval mode, dropout with the node's ratio in train mode."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, inputs):
        ratio = self.ratio if _opt(inputs, 1) is None else float(inputs[1])
        return (F.dropout(inputs[0], ratio, self.training),)


@register("Dropout")
def dropout(node: ir.Node) -> nn.Module:
    return Dropout(attr_float(node, "ratio", 0.5))


class BatchNorm(nn.Module):
    """ONNX BatchNormalization (inputs x, scale, bias, mean, var).

    eval(): running statistics. train(): batch statistics (population variance, as the ONNX
    reference), and the running statistics (buffers of the importer) updated in place by the
    ONNX rule ``running = momentum * running + (1 - momentum) * batch``.
    """

    def __init__(self, epsilon: float, momentum: float) -> None:
        super().__init__()
        self.epsilon, self.momentum = epsilon, momentum

    def forward(self, inputs):
        x, scale, bias, mean, var = inputs[:5]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            axes = [0, *range(2, x.dim())]
            batch_mean = x.mean(dim=axes)
            batch_var = x.var(dim=axes, unbiased=False)
            with torch.no_grad():
                mean.mul_(self.momentum).add_(batch_mean.detach(), alpha=1 - self.momentum)
                var.mul_(self.momentum).add_(batch_var.detach(), alpha=1 - self.momentum)
            mean, var = batch_mean, batch_var
        inv = torch.rsqrt(var + self.epsilon) * scale
        return ((x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape),)


@register("BatchNormalization", trainable=(1, 2))
def batch_norm(node: ir.Node) -> nn.Module:
    return BatchNorm(attr_float(node, "epsilon", 1e-5), attr_float(node, "momentum", 0.9))


# ---- pooling and reductions ------------------------------------------------------------------


def _pool_setup(node: ir.Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = attr_ints(node, "kernel_shape") or []
    spatial = len(kernel)
    strides = attr_ints(node, "strides") or [1] * spatial
    dilations = attr_ints(node, "dilations") or [1] * spatial
    auto_pad = _attr_str(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x, kernel, strides, dilations, auto_pad == "SAME_UPPER")
    else:
        pads = attr_ints(node, "pads") or [0] * (2 * spatial)
    return kernel, strides, dilations, pads


@register("MaxPool")
def max_pool(node: ir.Node) -> Run:
    ceil = bool(attr_int(node, "ceil_mode", 0))

    def run(inputs):
        x = inputs[0]
        kernel, strides, dilations, pads = _pool_setup(node, x)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
        if any(pads):
            x = F.pad(x, _torch_pads(pads), value=float("-inf"))
        return (fn(x, kernel, strides, 0, dilations, ceil_mode=ceil),)

    return run


@register("AveragePool")
def average_pool(node: ir.Node) -> Run:
    ceil = bool(attr_int(node, "ceil_mode", 0))
    include_pad = bool(attr_int(node, "count_include_pad", 0))

    def run(inputs):
        x = inputs[0]
        kernel, strides, _, pads = _pool_setup(node, x)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
        if not any(pads):
            return (fn(x, kernel, strides, 0, ceil_mode=ceil),)
        total = fn(F.pad(x, _torch_pads(pads)), kernel, strides, 0, ceil_mode=ceil)
        if include_pad:
            return (total,)
        ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pads(pads))
        return (total / fn(ones, kernel, strides, 0, ceil_mode=ceil),)

    return run


@register("GlobalAveragePool")
def global_average_pool(node: ir.Node) -> Run:
    return lambda inputs: (inputs[0].mean(dim=tuple(range(2, inputs[0].dim())), keepdim=True),)


@register("GlobalMaxPool")
def global_max_pool(node: ir.Node) -> Run:
    return lambda inputs: (inputs[0].amax(dim=tuple(range(2, inputs[0].dim())), keepdim=True),)


@register("ReduceMean")
def reduce_mean(node: ir.Node) -> Run:
    keep = bool(attr_int(node, "keepdims", 1))
    noop = bool(attr_int(node, "noop_with_empty_axes", 0))
    attr_axes = attr_ints(node, "axes")

    def run(inputs):
        x = inputs[0]
        axes = _ints(_opt(inputs, 1)) or attr_axes
        if not axes:
            if noop:
                return (x,)
            axes = list(range(x.dim()))
        return (x.mean(dim=tuple(axes), keepdim=keep),)

    return run


@register("Softmax")
def softmax(node: ir.Node) -> Run:
    old = (node.version or 13) < 13
    axis = attr_int(node, "axis", 1 if old else -1)

    def run(inputs):
        x = inputs[0]
        if not old:
            return (torch.softmax(x, dim=axis),)
        flat = x.reshape(int(np.prod(x.shape[: axis % x.dim()])), -1)
        return (torch.softmax(flat, dim=1).reshape(x.shape),)

    return run


# ---- shapes and data movement ----------------------------------------------------------------


@register("Flatten")
def flatten(node: ir.Node) -> Run:
    axis = attr_int(node, "axis", 1)

    def run(inputs):
        x = inputs[0]
        a = axis % x.dim() if x.dim() else 0
        return (x.reshape(int(np.prod(x.shape[:a])), -1),)

    return run


@register("Reshape")
def reshape(node: ir.Node) -> Run:
    allow_zero = bool(attr_int(node, "allowzero", 0))

    def run(inputs):
        x, shape = inputs[0], _ints(inputs[1])
        if not allow_zero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return (x.reshape(shape),)

    return run


@register("Transpose")
def transpose(node: ir.Node) -> Run:
    perm = attr_ints(node, "perm")
    return lambda inputs: (inputs[0].permute(perm or list(reversed(range(inputs[0].dim())))),)


@register("Concat")
def concat(node: ir.Node) -> Run:
    axis = attr_int(node, "axis", 0)
    return lambda inputs: (torch.cat([t for t in inputs if t is not None], dim=axis),)


@register("Split")
def split(node: ir.Node) -> Run:
    axis = attr_int(node, "axis", 0)
    attr_split = attr_ints(node, "split")
    count = len(node.outputs)

    def run(inputs):
        x = inputs[0]
        sizes = _ints(_opt(inputs, 1)) or attr_split
        if not sizes:
            size = -(-x.shape[axis] // count)
            sizes = [min(size, x.shape[axis] - i * size) for i in range(count)]
        return tuple(torch.split(x, sizes, dim=axis))

    return run


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    size = x.shape[axis]
    if step > 0:
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        index = [slice(None)] * x.dim()
        index[axis] = slice(start, end, step)
        return x[tuple(index)]
    start = min(max(start + size if start < 0 else start, -1), size - 1)
    end = min(max(end + size if end < 0 else end, -1), size - 1)
    picked = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, picked)


@register("Slice")
def slice_(node: ir.Node) -> Run:
    attrs = [attr_ints(node, k) for k in ("starts", "ends", "axes")]

    def run(inputs):
        x = inputs[0]
        if len(inputs) > 1:
            starts, ends = _ints(inputs[1]), _ints(inputs[2])
            axes, steps = _ints(_opt(inputs, 3)), _ints(_opt(inputs, 4))
        else:
            (starts, ends, axes), steps = attrs, None
        axes = axes or list(range(len(starts)))
        steps = steps or [1] * len(starts)
        for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
            x = _slice_axis(x, axis % x.dim(), start, end, step)
        return (x,)

    return run


@register("Pad")
def pad(node: ir.Node) -> Run:
    mode = _attr_str(node, "mode", "constant")
    attr_pads = attr_ints(node, "pads")
    attr_value = attr_float(node, "value", 0.0)
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]

    def run(inputs):
        x = inputs[0]
        pads = _ints(_opt(inputs, 1)) or attr_pads
        value = _opt(inputs, 2)
        value = attr_value if value is None else float(value)
        axes = _ints(_opt(inputs, 3)) or list(range(x.dim()))
        full = [0] * (2 * x.dim())
        for i, axis in enumerate(axes):
            full[axis % x.dim()] = pads[i]
            full[x.dim() + axis % x.dim()] = pads[len(axes) + i]
        order = _torch_pads(full)
        while len(order) > 2 and order[-1] == 0 and order[-2] == 0:
            order = order[:-2]
        if torch_mode == "constant":
            return (F.pad(x, order, value=value),)
        return (F.pad(x, order, mode=torch_mode),)

    return run


@register("Squeeze")
def squeeze(node: ir.Node) -> Run:
    attr_axes = attr_ints(node, "axes")

    def run(inputs):
        x = inputs[0]
        axes = _ints(_opt(inputs, 1)) or attr_axes
        if axes is None:
            return (x.squeeze(),)
        return (x.squeeze(tuple(a % x.dim() for a in axes)),)

    return run


@register("Unsqueeze")
def unsqueeze(node: ir.Node) -> Run:
    attr_axes = attr_ints(node, "axes")

    def run(inputs):
        x = inputs[0]
        axes = _ints(_opt(inputs, 1)) or attr_axes
        rank = x.dim() + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = x.unsqueeze(axis)
        return (x,)

    return run


@register("Shape")
def shape(node: ir.Node) -> Run:
    start, end = attr_int(node, "start", 0), node.attributes.get("end")
    stop = end.as_int() if end is not None else None

    def run(inputs):
        dims = list(inputs[0].shape)[start:stop]
        return (torch.tensor(dims, dtype=torch.int64, device=inputs[0].device),)

    return run


@register("Gather")
def gather(node: ir.Node) -> Run:
    axis = attr_int(node, "axis", 0)

    def run(inputs):
        x, index = inputs[0], inputs[1].long()
        index = torch.where(index < 0, index + x.shape[axis], index)
        flat = x.index_select(axis, index.reshape(-1))
        shape = list(x.shape[:axis]) + list(index.shape) + list(x.shape[axis + 1 :])
        return (flat.reshape(shape),)

    return run


@register("Cast")
def cast(node: ir.Node) -> Run:
    dtype = _torch_dtype(ir.DataType(attr_int(node, "to", 1)))
    return lambda inputs: (inputs[0].to(dtype),)


@register("Constant")
def constant(node: ir.Node) -> Run:
    value = torch.from_numpy(np.array(_constant_array(node)))
    return lambda inputs: (value,)


@register("ConstantOfShape")
def constant_of_shape(node: ir.Node) -> Run:
    attr = node.attributes.get("value")
    fill = torch.from_numpy(np.array(attr.as_tensor().numpy()).reshape(-1)[:1]) if attr else None

    def run(inputs):
        value = fill if fill is not None else torch.zeros(1)
        return (value.to(inputs[0].device).expand(_ints(inputs[0])).clone(),)

    return run


def _constant_array(node: ir.Node) -> np.ndarray:
    for name, attr in node.attributes.items():
        if name == "value":
            return attr.as_tensor().numpy()
        if name == "value_float":
            return np.array(attr.as_float(), np.float32)
        if name == "value_floats":
            return np.array(attr.as_floats(), np.float32)
        if name == "value_int":
            return np.array(attr.as_int(), np.int64)
        if name == "value_ints":
            return np.array(attr.as_ints(), np.int64)
    raise ValueError(f"Constant '{node.name}' has no value the importer reads")


def _torch_dtype(dtype: ir.DataType) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype.numpy())).dtype


def dequantize(node: ir.Node) -> Run:
    """A DequantizeLinear that is not part of a trainable pair: (x - zero point) * scale."""
    axis = attr_int(node, "axis", 1)

    def run(inputs):
        x, scale, zero = inputs[0], inputs[1], _opt(inputs, 2)
        shape = [1] * x.dim()
        if scale.numel() > 1:
            shape[axis % x.dim()] = -1
        y = x.to(torch.float32)
        if zero is not None:
            y = y - zero.to(torch.float32).reshape(shape if zero.numel() > 1 else [])
        return (y * scale.reshape(shape if scale.numel() > 1 else []),)

    return run
