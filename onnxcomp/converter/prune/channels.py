"""Channel dependency analysis: which channels of an ONNX graph must be removed together.

Every channel of every activation tensor (axis 1; the feature axis of 2-D tensors) is an
*element*. Operators tie elements with a union-find, one rule per op type (the per-op registry
of onnxruntime's quantizer, applied to channels):

* per-channel ops (Relu, pooling, BatchNormalization, depthwise Conv, ...) tie input channel c
  to output channel c; element-wise ops with two activations (residual Add, Mul) tie both inputs
  to the output;
* Concat, Split and Slice on the channel axis tie with offsets; Pad on the channel axis adds
  zero channels (the parameter-free ResNet shortcut) that are elements of their own;
* Flatten (or a flattening Reshape) ties channel c to its H x W features of the flattened tensor;
* Conv (group 1), Gemm and MatMul with constant weights *produce* their output channels (weight
  rows, bias) and *consume* their input channels (weight columns): they end a chain.

A *class* is a connected set of elements: removing one element means removing all of its class.
Classes that touch the same set of tensors form a :class:`ChannelGroup`, the unit a pruning
criterion ranks (e.g. the residual stream of a ResNet stage with every block's output). Any
op without a rule, a graph input or output, a grouped convolution, a shared or non-constant
weight, or a dynamic channel dimension *blocks* the classes it touches, with the reason.

:meth:`ChannelAnalysis.remove` deletes a set of classes: weights, biases and per-channel
parameters are sliced, Split sizes, Slice bounds, Pad amounts and Reshape shapes adjusted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.core.graph import attr_int, label, set_constant, static_dims
from onnxcomp.core.layers import node_macs, weighted_layer

DEFAULT_DOMAINS = ("", "ai.onnx")

PER_CHANNEL_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
        "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Shrink",
        "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log", "Erf", "Reciprocal", "Clip",
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "Resize", "Upsample",
        "Cast",
    }
)  # fmt: skip
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})


@dataclass(eq=False)
class Space:
    """The channels (axis 1) of one activation tensor: elements offset .. offset + size - 1."""

    value: ir.Value
    size: int
    offset: int

    @property
    def name(self) -> str:
        return self.value.name or "?"


@dataclass(eq=False)
class ParamEdit:
    """Delete entries of a constant along ``axis`` where ``space`` loses channels."""

    value: ir.Value
    axis: int
    space: Space


@dataclass(eq=False)
class Producer:
    """A Conv (group 1), Gemm or MatMul whose weight rows make the channels of ``space``."""

    node: ir.Node
    space: Space
    weight: ir.Value
    axis: int

    def weight_array(self) -> np.ndarray:
        return self.weight.const_value.numpy()  # type: ignore[union-attr]


@dataclass(eq=False)
class Consumer:
    """A Conv (group 1), Gemm or MatMul summing over the channels of ``space``."""

    node: ir.Node
    space: Space
    weight: ir.Value
    axis: int
    bias: ir.Value | None

    @property
    def kind(self) -> str:
        return "conv" if self.node.op_type == "Conv" else "matrix"

    def weight_array(self) -> np.ndarray:
        return self.weight.const_value.numpy()  # type: ignore[union-attr]

    def as_matrix(self, weight: np.ndarray | None = None) -> np.ndarray:
        """A weight of this layer (its own by default) as (outputs, input features): a Conv's
        (C kh kw), a Gemm/MatMul's K."""
        weight = self.weight_array() if weight is None else weight
        if self.kind == "conv":
            return weight.reshape(weight.shape[0], -1)
        return weight if self.axis == 1 else weight.T

    def from_matrix(self, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The inverse of :meth:`as_matrix`: a weight of ``shape`` from (outputs, features)."""
        if self.kind == "conv":
            return matrix.reshape(shape)
        return matrix if self.axis == 1 else matrix.T


@dataclass(eq=False)
class StructuralEdit:
    """Split sizes, Slice bounds, Pad amounts or a Reshape shape to recompute after removal."""

    node: ir.Node
    apply: Callable[[dict[Space, np.ndarray]], None]


@dataclass(eq=False)
class ChannelGroup:
    """Classes that touch the same tensors: pruned by one decision (k of ``channels`` kept)."""

    index: int
    classes: np.ndarray  # class roots, canonical order
    spaces: list[Space]
    producers: list[Producer]
    consumers: list[Consumer]
    blocked: str | None = None

    @property
    def channels(self) -> int:
        return len(self.classes)

    @property
    def name(self) -> str:
        if self.producers:
            return self.producers[0].node.name or "?"
        maker = self.spaces[0].value.producer()
        return (maker.name or "?") if maker is not None else self.spaces[0].name

    @property
    def names(self) -> list[str]:
        return [p.node.name or "" for p in self.producers]

    def describe(self) -> str:
        first = self.producers[0].node if self.producers else None
        text = label(first) if first else f"tensor '{self.spaces[0].name}'"
        if first is not None and len(self.producers) == 1 and 1 <= len(self.consumers) <= 3:
            return f"{text} -> {', '.join(label(c.node) for c in self.consumers)}"
        extra = len(self.producers) - 1
        if extra > 0:
            text += f" and {extra} more layer{'s' if extra > 1 else ''} tied to it"
        return text


@dataclass
class _Pending:
    value: ir.Value
    reason: str


class ChannelAnalysis:
    """The channel dependency graph of one model's main graph (shapes must be inferred)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.spaces: dict[ir.Value, Space] = {}
        self.parent: list[int] = []
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.params: list[ParamEdit] = []
        self.structural: list[StructuralEdit] = []
        self.element_block: dict[int, str] = {}
        self._pending: list[_Pending] = []
        self._edited: dict[ir.Value, ir.Node] = {}
        for node in self.graph:
            self._visit(node)
        for value in self.graph.inputs:
            self._pending.append(_Pending(value, f"graph input '{value.name}'"))
        for value in self.graph.outputs:
            self._pending.append(_Pending(value, f"graph output '{value.name}'"))
        for pending in self._pending:
            space = self.spaces.get(pending.value)
            if space is not None:
                for element in range(space.offset, space.offset + space.size):
                    self.element_block.setdefault(element, pending.reason)
        self.groups = self._groups()

    # -- union-find ---------------------------------------------------------------------------

    def find(self, element: int) -> int:
        parent = self.parent
        while parent[element] != element:
            parent[element] = parent[parent[element]]
            element = parent[element]
        return element

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, space: Space) -> np.ndarray:
        return np.array([self.find(space.offset + i) for i in range(space.size)], np.int64)

    # -- spaces -------------------------------------------------------------------------------

    def space(self, value: ir.Value | None) -> Space | None:
        """The channel space of an activation, created on first use; None if it has no
        static channel axis (the caller blocks what it ties to it)."""
        if value is None or value.const_value is not None:
            return None
        if value in self.spaces:
            return self.spaces[value]
        shape = value.shape
        if shape is None or shape.rank() < 2 or not shape.is_static(1):
            return None
        size = int(shape[1])
        space = Space(value, size, len(self.parent))
        self.parent.extend(range(space.offset, space.offset + size))
        self.spaces[value] = space
        return space

    def block(self, value: ir.Value | None, reason: str) -> None:
        if value is not None and value.const_value is None:
            self._pending.append(_Pending(value, reason))

    def block_node(self, node: ir.Node, reason: str) -> None:
        for value in [*node.inputs, *node.outputs]:
            self.block(value, reason)

    def tie(self, a: Space, b: Space, a_start: int = 0, b_start: int = 0, count: int = -1) -> None:
        count = min(a.size - a_start, b.size - b_start) if count < 0 else count
        for i in range(count):
            self.union(a.offset + a_start + i, b.offset + b_start + i)

    def _edit_const(self, value: ir.Value, node: ir.Node) -> str | None:
        """Why the constant ``value`` cannot be sliced for ``node``, or None."""
        if value.const_value is None or value.is_graph_input():
            return f"'{value.name}' is not a constant initializer"
        readers = {use.node for use in value.uses()}
        if readers - {node}:
            return f"'{value.name}' is shared by {len(readers)} nodes"
        return None

    def param(self, node: ir.Node, value: ir.Value, axis: int, space: Space) -> bool:
        problem = self._edit_const(value, node)
        if problem:
            self.block(space.value, f"{label(node)}: {problem}")
            return False
        self.params.append(ParamEdit(value, axis, space))
        return True

    # -- rules --------------------------------------------------------------------------------

    def _visit(self, node: ir.Node) -> None:
        if node.domain not in DEFAULT_DOMAINS:
            self.block_node(node, f"{label(node)} (domain {node.domain}) has no channel rule")
            return
        rule = _RULES.get(node.op_type)
        if rule is None:
            if node.op_type in PER_CHANNEL_OPS:
                rule = _per_channel
            elif node.op_type in ELEMENTWISE_OPS:
                rule = _elementwise
        if rule is None:
            self.block_node(node, f"{label(node)}: channels cannot be followed through it")
            return
        rule(self, node)

    # -- groups -------------------------------------------------------------------------------

    def _groups(self) -> list[ChannelGroup]:
        members: dict[int, set[int]] = defaultdict(set)  # class root -> space indices
        first: dict[int, tuple[int, int]] = {}
        spaces = list(self.spaces.values())
        for index, space in enumerate(spaces):
            for i, root in enumerate(self.roots(space)):
                members[int(root)].add(index)
                first.setdefault(int(root), (index, i))
        blocked: dict[int, str] = {}
        for element, reason in self.element_block.items():
            blocked.setdefault(self.find(element), reason)
        by_signature: dict[frozenset[int], list[int]] = defaultdict(list)
        for root, indices in members.items():
            by_signature[frozenset(indices)].append(root)
        groups = []
        ordered = sorted(by_signature.items(), key=lambda item: first[item[1][0]])
        for signature, roots in ordered:
            roots.sort(key=lambda r: first[r])
            group_spaces = [spaces[i] for i in sorted(signature)]
            space_set = set(group_spaces)
            reason = next((blocked[r] for r in roots if r in blocked), None)
            producers = [p for p in self.producers if p.space in space_set]
            consumers = [c for c in self.consumers if c.space in space_set]
            if reason is None and not producers:
                reason = "no layer produces these channels"
            groups.append(
                ChannelGroup(
                    len(groups), np.asarray(roots, np.int64), group_spaces, producers,
                    consumers, reason,
                )
            )  # fmt: skip
        return groups

    def positions(self, group: ChannelGroup, space: Space) -> np.ndarray:
        """For each channel of ``space``: its class's position in ``group``, or -1."""
        lookup = {int(r): i for i, r in enumerate(group.classes)}
        return np.array([lookup.get(int(r), -1) for r in self.roots(space)], np.int64)

    # -- MACs ---------------------------------------------------------------------------------

    def layer_macs(self) -> list[tuple[ir.Node, int, Space | None, Space | None]]:
        """(node, MACs per sample, input space, output space) of every Conv/Gemm/MatMul whose
        MACs scale with the channels it reads or writes."""
        out = []
        for node in self.graph:
            if node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            macs = node_macs(node)
            if macs is None:
                continue
            space_in = self.spaces.get(node.inputs[0])  # type: ignore[arg-type]
            space_out = self.spaces.get(node.outputs[0])
            if node.op_type == "Conv" and attr_int(node, "group", 1) != 1:
                space_in = None  # depthwise: MACs follow the output channels only
            out.append((node, macs, space_in, space_out))
        return out

    def macs_after(self, removed: dict[Space, int]) -> tuple[int, int]:
        """(MACs before, MACs after) per sample when each space loses ``removed[space]``."""
        before = after = 0
        for _, macs, space_in, space_out in self.layer_macs():
            factor = 1.0
            for space in (space_in, space_out):
                if space is not None and space.size:
                    factor *= 1.0 - removed.get(space, 0) / space.size
            before += macs
            after += macs * factor
        return before, round(after)

    def removed_per_space(self, classes: Iterable[int]) -> dict[Space, np.ndarray]:
        """Per space, the sorted channel indices that removing these classes deletes."""
        chosen = set(int(c) for c in classes)
        out = {}
        for space in self.spaces.values():
            roots = self.roots(space)
            mask = np.fromiter((int(r) in chosen for r in roots), bool, len(roots))
            if mask.any():
                out[space] = np.flatnonzero(mask)
        return out

    # -- removal ------------------------------------------------------------------------------

    def remove(
        self,
        classes: Iterable[int],
        before_edit: Callable[[dict[Space, np.ndarray]], None] | None = None,
    ) -> dict[Space, np.ndarray]:
        """Delete these classes from the graph; returns the removed indices per space.

        ``before_edit`` runs first with those indices (e.g. to rescale consumers' weights
        while their columns still line up with the unpruned channels).
        """
        removed = self.removed_per_space(classes)
        if not removed:
            return removed
        if before_edit is not None:
            before_edit(removed)
        for edit in self.structural:
            edit.apply(removed)
        edits: list[tuple[ir.Value, int, Space]] = [
            (p.weight, p.axis, p.space) for p in self.producers
        ]
        edits += [(c.weight, c.axis, c.space) for c in self.consumers]
        edits += [(e.value, e.axis, e.space) for e in self.params]
        for value, axis, space in edits:
            if space in removed:
                array = value.const_value.numpy()  # type: ignore[union-attr]
                if array.shape[axis] == space.size:  # broadcast (size 1) entries stay
                    set_constant(value, np.delete(array, removed[space], axis=axis))
        for space, indices in removed.items():
            _set_channels(space.value, space.size - len(indices))
        return removed


def prepare_analysis(model: ir.Model) -> ChannelAnalysis:
    """Infer shapes, name every unnamed node (``Conv_3``), and analyse the channels."""
    ir_passes.ShapeInferencePass()(model)
    for index, node in enumerate(model.graph):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    return ChannelAnalysis(model)


# ---------------------------------------------------------------------------------------------
# Helpers


def _ints_input(node: ir.Node, index: int) -> list[int] | None:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    if value.const_value is None:  # type: ignore[union-attr]
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]  # type: ignore[union-attr]


def _set_channels(value: ir.Value, channels: int) -> None:
    if value.shape is not None and value.shape.rank() >= 2:
        dims = list(value.shape)
        dims[1] = channels
        value.shape = ir.Shape(dims)


def _unknown(a: ChannelAnalysis, node: ir.Node, otherwise: str = "channels unknown") -> str:
    """Why a rule gives up: the first tensor without a static channel count, or ``otherwise``."""
    for value in [*node.inputs, *node.outputs]:
        if value is not None and value.const_value is None and a.space(value) is None:
            return (
                f"{label(node)}: the channel count of '{value.name}' is unknown "
                "(shape inference could not follow it)"
            )
    return f"{label(node)} {otherwise}"


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return value.shape.rank()


_RULES: dict[str, Callable[[ChannelAnalysis, ir.Node], None]] = {}


def rule(*op_types: str):
    """Register the channel rule of these op types."""

    def register(function: Callable[[ChannelAnalysis, ir.Node], None]):
        for op in op_types:
            _RULES[op] = function
        return function

    return register


def _tie_or_block(a: ChannelAnalysis, node: ir.Node, x: ir.Value | None, y: ir.Value) -> None:
    sx, sy = a.space(x), a.space(y)
    if sx is None or sy is None or sx.size != sy.size:
        a.block_node(node, _unknown(a, node, "changes the channel count"))
        return
    a.tie(sx, sy)


def _per_channel(a: ChannelAnalysis, node: ir.Node) -> None:
    """Channel c in, channel c out; per-channel constant parameters are sliced."""
    x, y = node.inputs[0], node.outputs[0]
    for extra in node.outputs[1:]:
        if extra is not None and extra.uses():
            a.block_node(node, f"{label(node)}: its output '{extra.name}' is used")
            return
    if node.op_type in ("Resize", "Upsample") and len(node.inputs) > 3 and node.inputs[3]:
        a.block_node(node, f"{label(node)} has explicit output sizes")
        return
    _tie_or_block(a, node, x, y)
    sy = a.space(y)
    if sy is None:
        return
    rank = _rank(y) or 0
    for value in node.inputs[1:]:
        if value is None:
            continue
        if value.const_value is None:
            if node.op_type in ("Resize", "Upsample", "Clip"):
                continue
            a.block_node(node, f"{label(node)}: input '{value.name}' is not constant")
            return
        shape = tuple(value.const_value.shape)
        if node.op_type in ("BatchNormalization", "InstanceNormalization"):
            a.param(node, value, 0, sy)
        elif node.op_type == "PRelu":
            axis = 1 - (rank - len(shape))
            if 0 <= axis < len(shape) and shape[axis] == sy.size:
                a.param(node, value, axis, sy)


@rule(*ELEMENTWISE_OPS)
def _elementwise(a: ChannelAnalysis, node: ir.Node) -> None:
    """Activations of the same channel count are tied to the output (residual Add, gating
    Mul); constants with a channel axis are sliced; broadcasting over channels is fine."""
    y = node.outputs[0]
    sy = a.space(y)
    rank = _rank(y)
    if sy is None or rank is None:
        a.block_node(node, _unknown(a, node))
        return
    for value in node.inputs:
        if value is None:
            continue
        shape = value.shape if value.const_value is None else ir.Shape(value.const_value.shape)
        if shape is None:
            a.block_node(node, f"{label(node)}: input '{value.name}' has no known shape")
            return
        axis = 1 - (rank - shape.rank())
        if axis < 0 or (shape.is_static(axis) and int(shape[axis]) == 1):
            if value.const_value is None and a.space(value) is not None and axis != 1:
                a.block(value, f"{label(node)} broadcasts '{value.name}' on another axis")
            continue
        if not shape.is_static(axis) or int(shape[axis]) != sy.size:
            a.block_node(node, f"{label(node)}: inputs do not share the channel axis")
            return
        if value.const_value is not None:
            a.param(node, value, axis, sy)
        elif axis != 1:
            a.block_node(node, f"{label(node)}: inputs of different rank")
            return
        else:
            _tie_or_block(a, node, value, y)


def _weight_problem(a: ChannelAnalysis, node: ir.Node, indices: Sequence[int]) -> str | None:
    for index in indices:
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            continue
        problem = a._edit_const(value, node)
        if problem:
            return f"{label(node)}: {problem}"
        if not np.issubdtype(value.const_value.dtype.numpy(), np.floating):  # type: ignore
            return f"{label(node)}: '{value.name}' is not floating point"
    return None


@rule("Conv")
def _conv(a: ChannelAnalysis, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    weight = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    problem = _weight_problem(a, node, (1, 2))
    if problem is None and (weight is None or len(weight.const_value.shape) != 4):  # type: ignore
        problem = f"{label(node)} is not a 2-D convolution"
    if problem:
        a.block_node(node, problem)
        return
    sx, sy = a.space(x), a.space(y)
    if sx is None or sy is None:
        a.block_node(node, _unknown(a, node))
        return
    group = attr_int(node, "group", 1)
    w_shape = tuple(weight.const_value.shape)  # type: ignore[union-attr]
    if group == 1:
        a.consumers.append(Consumer(node, sx, weight, 1, bias))  # type: ignore[arg-type]
        a.producers.append(Producer(node, sy, weight, 0))  # type: ignore[arg-type]
        if bias is not None:
            a.params.append(ParamEdit(bias, 0, sy))
        return
    if group == sx.size == sy.size and w_shape[1] == 1:
        a.tie(sx, sy)  # depthwise: channel c in, channel c out
        a.params.append(ParamEdit(weight, 0, sy))  # type: ignore[arg-type]
        if bias is not None:
            a.params.append(ParamEdit(bias, 0, sy))

        def adjust(removed: dict[Space, np.ndarray]) -> None:
            left = sy.size - len(removed.get(sy, ()))
            node.attributes["group"] = ir.AttrInt64("group", left)

        a.structural.append(StructuralEdit(node, adjust))
        return
    kind = "depthwise with a channel multiplier" if w_shape[1] == 1 else "grouped"
    a.block_node(node, f"{label(node)} is a {kind} convolution (group={group})")


@rule("Gemm", "MatMul")
def _matrix(a: ChannelAnalysis, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    weight = node.inputs[1]
    problem = _weight_problem(a, node, (1, 2) if node.op_type == "Gemm" else (1,))
    if problem:
        a.block_node(node, problem)
        return
    layer = weighted_layer(node)
    if layer is None or _rank(x) != 2 or len(layer.weight_shape) != 2:
        a.block_node(node, f"{label(node)} is not a 2-D product with a constant weight")
        return
    if node.op_type == "Gemm" and attr_int(node, "transA", 0):
        a.block_node(node, f"{label(node)} transposes its input (transA)")
        return
    sx, sy = a.space(x), a.space(y)
    if sx is None or sy is None:
        a.block_node(node, _unknown(a, node))
        return
    bias = layer.bias
    a.consumers.append(Consumer(node, sx, weight, layer.in_axis, bias))  # type: ignore[arg-type]
    a.producers.append(Producer(node, sy, weight, layer.out_axis))  # type: ignore[arg-type]
    if bias is not None:
        shape = tuple(bias.const_value.shape)  # type: ignore[union-attr]
        if shape and shape[-1] == sy.size:
            a.params.append(ParamEdit(bias, len(shape) - 1, sy))


def _axis(node: ir.Node, rank: int | None, default: int = 0) -> int | None:
    axis = attr_int(node, "axis", default)
    if axis < 0:
        if rank is None:
            return None
        axis += rank
    return axis


def _channel_parts(
    a: ChannelAnalysis, node: ir.Node, whole: ir.Value, parts: Sequence[ir.Value]
) -> tuple[Space, list[Space]] | None:
    """The spaces of a Concat's output (or a Split's input) and of its parts, when they join
    along the channel axis; otherwise the node is handled (blocked, or its parts tied to the
    whole when the axis is not the channel axis) and None is returned."""
    axis = _axis(node, _rank(whole))
    whole_space = a.space(whole)
    spaces = [a.space(v) for v in parts]
    if whole_space is None or any(s is None for s in spaces) or axis is None:
        a.block_node(node, _unknown(a, node))
        return None
    if axis != 1:
        for s in spaces:
            a.tie(s, whole_space)  # type: ignore[arg-type]
        return None
    return whole_space, spaces  # type: ignore[return-value]


def _tie_in_order(a: ChannelAnalysis, whole: Space, parts: list[Space]) -> None:
    """Tie the parts' channels to consecutive channels of the whole (Concat and Split)."""
    offset = 0
    for part in parts:
        a.tie(part, whole, 0, offset, part.size)
        offset += part.size


@rule("Concat")
def _concat(a: ChannelAnalysis, node: ir.Node) -> None:
    joined = _channel_parts(a, node, node.outputs[0], node.inputs)  # type: ignore[arg-type]
    if joined is None:
        return
    _tie_in_order(a, *joined)


@rule("Split")
def _split(a: ChannelAnalysis, node: ir.Node) -> None:
    joined = _channel_parts(a, node, node.inputs[0], node.outputs)  # type: ignore[arg-type]
    if joined is None:
        return
    sx, outs = joined
    sizes_value = node.inputs[1] if len(node.inputs) > 1 else None
    if sizes_value is None or sizes_value.const_value is None:
        a.block_node(node, f"{label(node)} splits channels without a constant 'split' input")
        return
    problem = a._edit_const(sizes_value, node)
    if problem:
        a.block_node(node, f"{label(node)}: {problem}")
        return
    _tie_in_order(a, sx, outs)

    def adjust(removed: dict[Space, np.ndarray]) -> None:
        sizes = [s.size - len(removed.get(s, ())) for s in outs]  # type: ignore[union-attr]
        set_constant(sizes_value, np.asarray(sizes, np.int64))

    a.structural.append(StructuralEdit(node, adjust))


@rule("Slice")
def _slice(a: ChannelAnalysis, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(x)
    starts, ends = _ints_input(node, 1), _ints_input(node, 2)
    axes = _ints_input(node, 3) if len(node.inputs) > 3 and node.inputs[3] else None
    steps = _ints_input(node, 4) if len(node.inputs) > 4 and node.inputs[4] else None
    if starts is None or ends is None or rank is None:
        a.block_node(node, f"{label(node)}: bounds are not constant")
        return
    axes = axes if axes is not None else list(range(len(starts)))
    axes = [ax + rank if ax < 0 else ax for ax in axes]
    steps = steps if steps is not None else [1] * len(starts)
    sx, sy = a.space(x), a.space(y)
    if sx is None or sy is None:
        a.block_node(node, _unknown(a, node))
        return
    if 1 not in axes:
        a.tie(sx, sy)
        return
    k = axes.index(1)
    if steps[k] != 1:
        a.block_node(node, f"{label(node)} slices channels with step {steps[k]}")
        return
    for i in (1, 2):
        problem = a._edit_const(node.inputs[i], node)  # type: ignore[arg-type]
        if problem:
            a.block_node(node, f"{label(node)}: {problem}")
            return
    start = max(0, min(sx.size, starts[k] + sx.size if starts[k] < 0 else starts[k]))
    a.tie(sx, sy, start, 0, sy.size)
    starts_value, ends_value = node.inputs[1], node.inputs[2]

    def adjust(removed: dict[Space, np.ndarray]) -> None:
        gone = removed.get(sx, np.zeros(0, np.int64))
        new_start = start - int(np.sum(gone < start))
        new_end = new_start + sy.size - len(removed.get(sy, ()))
        for value, new in ((starts_value, new_start), (ends_value, new_end)):
            array = value.const_value.numpy().copy()  # type: ignore[union-attr]
            array.reshape(-1)[k] = new
            set_constant(value, array)  # type: ignore[arg-type]

    a.structural.append(StructuralEdit(node, adjust))


@rule("Pad")
def _pad(a: ChannelAnalysis, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(x)
    pads_value = node.inputs[1] if len(node.inputs) > 1 else None
    pads = _ints_input(node, 1)
    if pads is None:
        attr = node.attributes.get("pads")
        pads = list(attr.as_ints()) if attr is not None else None
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    sx, sy = a.space(x), a.space(y)
    if pads is None or rank is None or has_axes or sx is None or sy is None:
        a.block_node(node, f"{label(node)}: pads are not constant over all axes")
        return
    before, after = pads[1], pads[rank + 1]
    if before == 0 and after == 0:
        a.tie(sx, sy)
        return
    mode = node.attributes.get("mode")
    if (mode is not None and mode.as_string() != "constant") or before < 0 or after < 0:
        a.block_node(node, f"{label(node)} pads channels in a way that cannot be sliced")
        return
    if pads_value is None:
        a.block_node(node, f"{label(node)}: channel pads given as an attribute")
        return
    problem = a._edit_const(pads_value, node)
    if problem:
        a.block_node(node, f"{label(node)}: {problem}")
        return
    a.tie(sx, sy, 0, before, sx.size)

    def adjust(removed: dict[Space, np.ndarray]) -> None:
        gone = removed.get(sy, np.zeros(0, np.int64))
        array = pads_value.const_value.numpy().copy()  # type: ignore[union-attr]
        flat = array.reshape(-1)
        flat[1] = before - int(np.sum(gone < before))
        flat[rank + 1] = after - int(np.sum(gone >= before + sx.size))
        set_constant(pads_value, array)

    a.structural.append(StructuralEdit(node, adjust))


def _tie_flattened(a: ChannelAnalysis, node: ir.Node, sx: Space, sy: Space, block: int) -> None:
    for c in range(sx.size):
        for j in range(block):
            a.union(sx.offset + c, sy.offset + c * block + j)


@rule("Flatten")
def _flatten(a: ChannelAnalysis, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    dims = static_dims(x)
    sx, sy = a.space(x), a.space(y)
    if attr_int(node, "axis", 1) != 1 or dims is None or sx is None or sy is None:
        a.block_node(node, f"{label(node)} does not flatten from the channel axis")
        return
    block = math.prod(dims[2:])
    if sy.size != sx.size * block:
        a.block_node(node, f"{label(node)}: feature count does not match")
        return
    _tie_flattened(a, node, sx, sy, block)


@rule("Reshape")
def _reshape(a: ChannelAnalysis, node: ir.Node) -> None:
    """Flattening (N, C, ...) to (N, C*...) or a reshape that changes nothing but the batch."""
    x, y = node.inputs[0], node.outputs[0]
    dims_x, dims_y = static_dims(x), static_dims(y)
    shape_value = node.inputs[1]
    target = _ints_input(node, 1)
    sx, sy = a.space(x), a.space(y)
    if None in (dims_x, dims_y, target, sx, sy):
        a.block_node(
            node,
            f"{label(node)}: its shape is computed at run time, channels cannot be followed "
            "(a static batch size or a simplified model may help)",
        )
        return
    block = math.prod(dims_x[2:])  # type: ignore[index]
    if len(dims_y) == 2 and dims_y[1] == sx.size * block:  # type: ignore[arg-type,union-attr]
        explicit = len(target) == 2 and target[1] == dims_y[1]  # type: ignore[arg-type,index]
        if explicit:
            problem = a._edit_const(shape_value, node)  # type: ignore[arg-type]
            if problem:
                a.block_node(node, f"{label(node)}: {problem}")
                return
        _tie_flattened(a, node, sx, sy, block)  # type: ignore[arg-type]
        if explicit:

            def adjust(removed: dict[Space, np.ndarray]) -> None:
                left = sy.size - len(removed.get(sy, ()))  # type: ignore[union-attr]
                set_constant(shape_value, np.asarray([target[0], left], np.int64))  # type: ignore

            a.structural.append(StructuralEdit(node, adjust))
        return
    if dims_x == dims_y and len(target) == len(dims_x) and target[1] in (0, -1):  # type: ignore
        a.tie(sx, sy)  # type: ignore[arg-type]
        return
    a.block_node(node, f"{label(node)}: channels cannot be followed through the reshape")


@rule("Squeeze", "Unsqueeze")
def _squeeze(a: ChannelAnalysis, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    axes = _ints_input(node, 1)
    if axes is None:
        attr = node.attributes.get("axes")
        axes = list(attr.as_ints()) if attr is not None else None
    rank = _rank(y) if node.op_type == "Unsqueeze" else _rank(x)
    if axes is None or rank is None:
        a.block_node(node, f"{label(node)}: axes unknown")
        return
    axes = [ax + rank if ax < 0 else ax for ax in axes]
    if min(axes) < 2:
        a.block_node(node, f"{label(node)} moves the channel axis")
        return
    _tie_or_block(a, node, x, y)


@rule("Shape")
def _shape(a: ChannelAnalysis, node: ir.Node) -> None:
    """Reading only the batch size (x.view(x.size(0), -1)) does not depend on channels."""
    end = node.attributes.get("end")
    start = attr_int(node, "start", 0)
    if start == 0 and end is not None and end.as_int() == 1:
        return
    for use in node.outputs[0].uses():
        reader = use.node
        index = _ints_input(reader, 1) if reader.op_type == "Gather" else None
        if index != [0] or attr_int(reader, "axis", 0) != 0:
            a.block(node.inputs[0], f"{label(node)}: its result may depend on the channels")
            return
