"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For two layers joined by a positive-homogeneous function f (ReLU: f(s x) = s f(x) for s > 0),
scaling output channel i of the first layer by 1/s_i and input channel i of the second by s_i
leaves the network's function unchanged. Choosing s_i = sqrt(r1_i r2_i) / r2_i makes both
per-channel weight ranges equal to sqrt(r1_i r2_i), which is what per-tensor int8 weights
(and depthwise convolutions under per-channel weights' activation ranges) need. Ranges are
max |w| per channel (the range of symmetric int8 weights); the ratio is the same as max - min
for symmetric ranges. Arithmetic is float64, cast back to the weights' type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.core.graph import attr_int, constant, input_at, label, only_used_by
from onnxcomp.core.layers import WeightedLayer, weighted_layer
from onnxcomp.errors import OptionError

# Per-channel, positive-homogeneous ops that may sit between the two layers.
HOMOGENEOUS_OPS = frozenset(
    {"Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
)
# Ops that turn (N, C, ...) into (N, C * ...) channel-major, allowed before Gemm/MatMul.
FLATTEN_OPS = frozenset({"Flatten", "Reshape"})
# Elementwise activations that keep channels but are not positive homogeneous.
NOT_HOMOGENEOUS_OPS = frozenset(
    {
        "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Celu",
        "Softplus", "Softsign", "Gelu", "Mish", "Erf", "ThresholdedRelu",
    }
)  # fmt: skip
FIRST_LAYERS = frozenset({"Conv", "Gemm"})
SECOND_LAYERS = frozenset({"Conv", "Gemm", "MatMul"})


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip (None for an absent bound), or None if they are not constants."""
    if node.op_type != "Clip":
        return None
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        low = node.attributes.get("min")
        high = node.attributes.get("max")
        return (low.as_float() if low else None, high.as_float() if high else None)
    bounds: list[float | None] = []
    for i in (1, 2):
        value = input_at(node, i)
        if value is None:
            bounds.append(None)
            continue
        array = constant(value)
        if array is None or array.size != 1:
            return None
        bounds.append(float(array.reshape(())))
    return bounds[0], bounds[1]


def is_relu(node: ir.Node) -> bool:
    """Clip(0, +inf) is a ReLU."""
    return clip_bounds(node) == (0.0, None)


def is_relu6(node: ir.Node) -> bool:
    return clip_bounds(node) == (0.0, 6.0)


def as_layer(node: ir.Node, first: bool) -> tuple[WeightedLayer | None, str | None]:
    """The node as an equalizable layer, or the reason it is not one."""
    name = label(node)
    layer = weighted_layer(node)
    if node.op_type not in (FIRST_LAYERS if first else SECOND_LAYERS):
        return None, f"{name} has no weights to equalize"
    if layer is None:
        return None, f"the weight of {name} is not a constant initializer"
    problem = layer.problem()
    if problem:
        return None, problem
    if first and layer.bias is not None:
        bias = constant(layer.bias)
        if bias is None:
            return None, f"the bias of {name} is not a constant initializer"
        if not only_used_by(layer.bias, node):
            return None, f"the bias of {name} is shared with other nodes"
        if bias.size != layer.out_channels:
            return None, f"the bias of {name} is not one value per output channel"
    return layer, None


@dataclass
class Pair:
    """Two layers joined by positive-homogeneous ops; ``between`` are those ops."""

    first: WeightedLayer
    second: WeightedLayer
    between: list[ir.Node]
    block: int = 1  # input features of ``second`` per channel of ``first`` (after a Flatten)
    relu6: list[ir.Node] = field(default_factory=list)

    def describe(self) -> str:
        ops = " -> ".join(n.op_type for n in self.between)
        middle = f" -> {ops}" if ops else ""
        return f"{label(self.first.node)}{middle} -> {label(self.second.node)}"


def _flatten_problem(node: ir.Node) -> str | None:
    """Why a Flatten/Reshape does not map (N, C, ...) to (N, C * ...) channel-major, or None."""
    if node.op_type == "Flatten":
        return None if attr_int(node, "axis", 1) == 1 else f"{label(node)} has axis != 1"
    source, result = node.inputs[0].shape, node.outputs[0].shape
    if source is None or result is None or result.rank() != 2 or source.rank() < 2:
        return f"{label(node)} is not known to reshape to (batch, features)"
    if str(source[0]) != str(result[0]):
        return f"{label(node)} changes the batch dimension"
    return None


def _spatial_size(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() < 2:
        return None
    dims = [shape[i] for i in range(2, shape.rank())]
    if not all(isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def follow(first: WeightedLayer, relu6_to_relu: bool) -> tuple[Pair | None, str | None]:
    """The layer that the first layer's output reaches through a single-use chain of
    channel-wise ops, or why there is none (or why it cannot be equalized)."""
    between: list[ir.Node] = []
    blockers: list[str] = []
    relu6: list[ir.Node] = []
    flatten: ir.Node | None = None
    current = first.node.outputs[0]
    name = label(first.node)
    while True:
        if current.is_graph_output():
            return None, f"the output of {name} is a graph output"
        uses = list(current.uses())
        if len(uses) != 1:
            return None, f"the output of {name} feeds {len(uses)} nodes, not only the next layer"
        node, index = uses[0]
        op = node.op_type
        if op in SECOND_LAYERS and index == 0:
            break
        if op in HOMOGENEOUS_OPS or is_relu(node):
            pass
        elif op in FLATTEN_OPS and index == 0:
            flatten = node
            problem = _flatten_problem(node)
            if problem:
                blockers.append(problem)
        elif relu6_to_relu and is_relu6(node):
            relu6.append(node)
        elif op in NOT_HOMOGENEOUS_OPS:
            kind = " (ReLU6)" if is_relu6(node) else ""
            blockers.append(
                f"{label(node)}{kind} is not positive homogeneous, so scaling channels "
                "would change the output"
            )
        else:
            return None, f"the output of {name} reaches {label(node)}, not a layer with weights"
        between.append(node)
        current = node.outputs[0]
    second, problem = as_layer(node, first=False)
    if second is None:
        return None, problem
    if blockers:
        return None, f"{name} -> {label(node)}: {blockers[0]}"
    return _shape_check(Pair(first, second, between, relu6=relu6), flatten)


def _shape_check(pair: Pair, flatten: ir.Node | None) -> tuple[Pair | None, str | None]:
    """Match the first layer's output channels with the second layer's inputs."""
    first, second = pair.first, pair.second
    channels = first.out_channels
    shape = second.weight_shape
    what = pair.describe()
    if second.node.op_type == "Conv":
        if flatten is not None or first.node.op_type != "Conv":
            return None, f"{what}: the Conv does not read the first layer's channels on axis 1"
        if shape[1] * second.group != channels:
            return None, f"{what}: {channels} output channels but {shape[1]} x group inputs"
        return pair, None
    features = int(shape[second.in_axis])
    if first.node.op_type == "Conv" and flatten is None:
        return None, f"{what}: {second.node.op_type} contracts the last axis, not the channels"
    if features % channels:
        return None, f"{what}: {features} input features are not a multiple of {channels}"
    pair.block = features // channels
    if flatten is not None and first.node.op_type == "Conv":
        spatial = _spatial_size(flatten.inputs[0])
        if spatial is not None and spatial != pair.block:
            return None, f"{what}: {features} input features but {channels} x {spatial} values"
    return pair, None


def find_pairs(graph: ir.Graph, relu6_to_relu: bool) -> tuple[list[Pair], list[Skipped]]:
    """Every equalizable pair in graph order, and the reasons for layers left alone."""
    pairs: list[Pair] = []
    skipped: list[Skipped] = []
    for node in graph:
        if node.op_type not in FIRST_LAYERS:
            continue
        first, problem = as_layer(node, first=True)
        pair = None
        if first is not None:
            pair, problem = follow(first, relu6_to_relu)
        if pair is not None:
            pairs.append(pair)
        else:
            skipped.append(Skipped(node.name or node.outputs[0].name, problem or "?"))
    return pairs, skipped


class Weights:
    """float64 working copies of the weights and biases the pairs touch."""

    def __init__(self) -> None:
        self.arrays: dict[int, tuple[ir.Value, np.ndarray]] = {}

    def get(self, value: ir.Value) -> np.ndarray:
        key = id(value)
        if key not in self.arrays:
            self.arrays[key] = (value, np.asarray(value.const_value.numpy(), np.float64).copy())
        return self.arrays[key][1]

    def write_back(self) -> None:
        for value, array in self.arrays.values():
            dtype = value.const_value.dtype.numpy()
            value.const_value = ir.tensor(array.astype(dtype), name=value.name)


def output_ranges(layer: WeightedLayer, weights: Weights) -> np.ndarray:
    """max |w| per output channel of the first layer."""
    w = np.moveaxis(weights.get(layer.weight), layer.out_axis, 0)
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def _grouped(layer: WeightedLayer, weights: Weights) -> np.ndarray:
    """A Conv weight as a (group, out per group, in per group, rest) view: input channel
    c = g * in_per_group + j is read only by the output channels of group g."""
    w = weights.get(layer.weight)
    return w.reshape(layer.group, w.shape[0] // layer.group, w.shape[1], -1)


def input_ranges(pair: Pair, weights: Weights) -> np.ndarray:
    """max |w| per input channel of the second layer (over its block of features)."""
    second = pair.second
    if second.node.op_type == "Conv":
        per_input = np.abs(_grouped(second, weights)).max(axis=(1, 3)).reshape(-1)
    else:
        per_input = np.abs(weights.get(second.weight)).max(axis=second.out_axis)
    return per_input.reshape(-1, pair.block).max(axis=1)


def apply_scale(pair: Pair, scale: np.ndarray, weights: Weights) -> None:
    """W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i (in the working copies)."""
    first, second = pair.first, pair.second
    w1 = weights.get(first.weight)
    shape = [1] * w1.ndim
    shape[first.out_axis] = -1
    w1 /= scale.reshape(shape)
    if first.bias is not None:
        b1 = weights.get(first.bias)
        b1 /= scale.reshape(b1.shape)
    per_input = np.repeat(scale, pair.block)
    if second.node.op_type == "Conv":
        view = _grouped(second, weights)
        view *= per_input.reshape(view.shape[0], 1, view.shape[2], 1)
    else:
        w2 = weights.get(second.weight)
        shape = [1, 1]
        shape[second.in_axis] = -1
        w2 *= per_input.reshape(shape)


def equalizing_scale(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i r2_i) / r2_i; 1 where a channel has no weights on either side."""
    alive = (r1 > 0) & (r2 > 0)
    scale = np.ones_like(r1)
    scale[alive] = np.sqrt(r1[alive] * r2[alive]) / r2[alive]
    return scale


def _spread(ranges: np.ndarray) -> float:
    alive = ranges[ranges > 0]
    return float(alive.max() / alive.min()) if alive.size else 1.0


def sweep(pairs: list[Pair], totals: list[np.ndarray], weights: Weights) -> float:
    """Equalize every pair once; returns the largest |log s| (how far it moved)."""
    moved = 0.0
    for total, pair in zip(totals, pairs, strict=True):
        scale = equalizing_scale(output_ranges(pair.first, weights), input_ranges(pair, weights))
        apply_scale(pair, scale, weights)
        total *= scale
        moved = max(moved, float(np.abs(np.log(scale)).max(initial=0.0)))
    return moved


class EqualizePass(CompressionPass):
    """Cross-layer equalization of consecutive layers' weight ranges (DFQ), before int8.

    Rules:

    1. Pairs: Conv -> Conv (either may be grouped or depthwise), Conv -> Flatten -> Gemm/MatMul
       and Gemm -> Gemm/MatMul, joined only by per-channel positive-homogeneous ops (Relu,
       Clip(0, inf), LeakyRelu, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool) and,
       before a Gemm/MatMul, a channel-major Flatten(axis=1) or Reshape to (batch, features).
    2. Per channel i: s_i = sqrt(r1_i r2_i) / r2_i with r1, r2 the max |w| of the first
       layer's output channel i and of the second layer's weights reading channel i (the
       group's rows in a grouped Conv, the block of features after a Flatten);
       W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i. A channel with no weights keeps s = 1.
    3. All pairs are equalized in graph order, repeatedly, until no scale moves by more
       than ``tolerance`` or ``max_iterations`` sweeps (a depthwise conv in two pairs needs
       several sweeps to converge).
    4. Never equalized: a first layer whose output feeds more than one node or a graph
       output, passes through a Clip with a finite bound (ReLU6), HardSwish, Sigmoid or
       other op that is not positive homogeneous, or reaches no Conv/Gemm/MatMul; weights
       or biases that are not constant initializers or are shared with other nodes; channel
       counts that do not match; Gemm with transA=1; MatMul reading a Conv output without a
       Flatten (it contracts the last axis). Each is reported with its reason.
    5. Float models only, after BatchNorm folding (a BatchNorm between the layers stops the
       chain). Exact up to float rounding.
    """

    name = "equalize"
    lossless = True
    min_opset = 9
    relu6_to_relu = False

    def __init__(
        self,
        context: PassContext | None = None,
        max_iterations: int = 50,
        tolerance: float = 1e-6,
    ) -> None:
        super().__init__(context)
        self.max_iterations = max_iterations
        self.tolerance = tolerance

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        ir_passes.ShapeInferencePass()(model)
        pairs, skipped = find_pairs(model.graph, self.relu6_to_relu)
        record.skipped.extend(skipped)
        if not pairs:
            record.summary = "no layer pair to equalize"
            return
        relu6 = {id(n): n for p in pairs for n in p.relu6}.values()
        for node in relu6:
            replace_relu6(node)
            record.changes.append(f"{label(node)} (ReLU6) replaced by Relu (lossy)")
        if relu6:
            ir_passes.RemoveUnusedNodesPass()(model)  # the Clips' bounds
        weights = Weights()
        before = [(_spread(output_ranges(p.first, weights)), p) for p in pairs]
        totals = [np.ones(p.first.out_channels) for p in pairs]
        sweeps, moved = 0, np.inf
        while sweeps < self.max_iterations and moved >= self.tolerance:
            sweeps += 1
            moved = sweep(pairs, totals, weights)
        weights.write_back()
        for (spread, pair), total in zip(before, totals, strict=True):
            after = _spread(output_ranges(pair.first, weights))
            record.changes.append(
                f"{pair.describe()}: {total.size} channels, output-channel range spread "
                f"{spread:.1f}x -> {after:.1f}x, scales {total.min():.3g}..{total.max():.3g}"
            )
        record.modified = True
        record.summary = f"equalized {len(pairs)} layer pair(s) in {sweeps} sweep(s)"


class EqualizeRelu6Pass(EqualizePass):
    """:class:`EqualizePass` that first replaces ReLU6 (Clip(0, 6)) by Relu where it joins
    a pair, as the DFQ paper does for MobileNetV2. LOSSY: activations above 6 are no longer
    clipped, so the model's outputs change even before equalization."""

    name = "equalize-relu6"
    lossless = False
    relu6_to_relu = True


def replace_relu6(node: ir.Node) -> None:
    """Turn Clip(x, 0, 6) into Relu(x) in place."""
    node.op_type = "Relu"
    node.resize_inputs(1)
    node.attributes.clear()


# ``--equalize MODE`` -> the pass it runs.
MODES: dict[str, type[EqualizePass]] = {"exact": EqualizePass, "relu6": EqualizeRelu6Pass}


@dataclass(frozen=True)
class EqualizeConfig:
    """``--equalize exact|relu6`` and the sweep settings; checked when built (before any pass)."""

    mode: str = "exact"
    max_iterations: int = 50
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"--equalize {self.mode}: choose {' or '.join(MODES)}")
        if self.max_iterations < 1:
            raise OptionError(
                f"equalize max_iterations must be at least 1, got {self.max_iterations}"
            )
        if self.tolerance <= 0:
            raise OptionError(f"equalize tolerance must be positive, got {self.tolerance}")

    def build(self, context: PassContext | None = None) -> EqualizePass:
        """The pass for this mode."""
        return MODES[self.mode](context, self.max_iterations, self.tolerance)
