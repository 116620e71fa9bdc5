"""The weighted layers (Conv, ConvTranspose, Gemm, MatMul) seen through their weight.

One registry, op type -> :class:`LayerKind`, says for each op where its weight and bias are,
which weight axis indexes output channels and which input features, its group count and its
MACs; :func:`weighted_layer` wraps a node as a :class:`WeightedLayer`. Passes ask this module
instead of testing op types and ``transB`` themselves.

Rules:

1. Conv: weight ``[Cout, Cin/group, k...]`` (out axis 0, in axis 1), bias input 2, ``group``.
2. ConvTranspose: weight ``[Cin, Cout/group, k...]`` (out axis 1, in axis 0), bias input 2.
3. Gemm: weight B ``[K, N]`` (out axis 1, in axis 0), or ``[N, K]`` with ``transB=1`` (out axis
   0); bias C input 2. ``transA=1`` is reported by :meth:`WeightedLayer.problem`.
4. MatMul: weight ``[K, N]`` (out axis 1, in axis 0), 2-D only; no bias input.
5. Not a weighted layer: any other op, or a weight that is not a constant initializer.
6. :func:`own_weight_layers` (the passes that rewrite weight values in place: sparsity, weight
   sharing): the weighted layers in graph order whose weight is used by that node only; the
   first weighted layer is left out unless asked for, and so is a shared weight, each as a
   (node, reason) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp.core.graph import attr_int, input_at, is_constant, label, only_used_by, static_dims
from onnxcomp.core.macs import conv_macs, conv_transpose_macs


class LayerKind:
    """How one op type holds its weight. Subclasses override what differs."""

    op_type: str = ""
    bias_index: int | None = 2

    def out_axis(self, node: ir.Node) -> int:
        return 0

    def in_axis(self, node: ir.Node) -> int:
        return 1

    def group(self, node: ir.Node) -> int:
        return 1

    def macs_per_sample(self, node: ir.Node, weight_shape: tuple[int, ...]) -> int | None:
        """MACs for one sample (batch dimension 1), or None when a shape is unknown."""
        a = static_dims(node.inputs[0])
        if a is None or len(a) != 2 or len(weight_shape) != 2:
            return None
        return a[1] * weight_shape[self.out_axis(node)]

    def problem(self, node: ir.Node) -> str | None:
        """Why this node's weight cannot be read as [out, in] channels, or None."""
        return None


class ConvKind(LayerKind):
    op_type = "Conv"

    def group(self, node: ir.Node) -> int:
        return attr_int(node, "group", 1)

    def macs_per_sample(self, node: ir.Node, weight_shape: tuple[int, ...]) -> int | None:
        out = static_dims(node.outputs[0])
        return None if out is None else conv_macs(tuple(out), weight_shape)


class ConvTransposeKind(ConvKind):
    op_type = "ConvTranspose"

    def out_axis(self, node: ir.Node) -> int:
        return 1

    def in_axis(self, node: ir.Node) -> int:
        return 0

    def macs_per_sample(self, node: ir.Node, weight_shape: tuple[int, ...]) -> int | None:
        x = static_dims(node.inputs[0])
        return None if x is None else conv_transpose_macs(tuple(x), weight_shape)


class GemmKind(LayerKind):
    op_type = "Gemm"

    def out_axis(self, node: ir.Node) -> int:
        return 0 if attr_int(node, "transB", 0) else 1

    def in_axis(self, node: ir.Node) -> int:
        return 1 - self.out_axis(node)

    def problem(self, node: ir.Node) -> str | None:
        return f"{label(node)} has transA=1" if attr_int(node, "transA", 0) else None


class MatMulKind(LayerKind):
    op_type = "MatMul"
    bias_index = None

    def out_axis(self, node: ir.Node) -> int:
        return 1

    def in_axis(self, node: ir.Node) -> int:
        return 0


LAYER_KINDS: dict[str, LayerKind] = {
    kind.op_type: kind for kind in (ConvKind(), ConvTransposeKind(), GemmKind(), MatMulKind())
}


@dataclass(frozen=True)
class WeightedLayer:
    """A node of a registered op type whose weight is a constant initializer."""

    node: ir.Node
    kind: LayerKind

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]  # type: ignore[return-value]

    @property
    def bias(self) -> ir.Value | None:
        index = self.kind.bias_index
        return None if index is None else input_at(self.node, index)

    @property
    def out_axis(self) -> int:
        return self.kind.out_axis(self.node)

    @property
    def in_axis(self) -> int:
        return self.kind.in_axis(self.node)

    @property
    def group(self) -> int:
        return self.kind.group(self.node)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight.const_value.shape)  # type: ignore[union-attr]

    @property
    def out_channels(self) -> int:
        return self.weight_shape[self.out_axis]

    def weight_array(self) -> np.ndarray:
        return np.asarray(self.weight.const_value.numpy())  # type: ignore[union-attr]

    def macs_per_sample(self) -> int | None:
        return self.kind.macs_per_sample(self.node, self.weight_shape)

    def problem(self) -> str | None:
        """Why the layer cannot be edited channel-wise (transA, 3-D MatMul weight, a weight
        shared with other nodes), or None."""
        if self.kind.op_type == "MatMul" and len(self.weight_shape) != 2:
            return f"the weight of {label(self.node)} is not 2-D"
        if not only_used_by(self.weight, self.node):
            return f"the weight of {label(self.node)} is shared with other nodes"
        return self.kind.problem(self.node)


def weighted_layer(node: ir.Node) -> WeightedLayer | None:
    """The node as a weighted layer, or None (not a registered op, or no constant weight)."""
    kind = LAYER_KINDS.get(node.op_type)
    if kind is None or node.domain not in ("", "ai.onnx") or not is_constant(input_at(node, 1)):
        return None
    return WeightedLayer(node, kind)


FIRST_LAYER_LEFT = "the first layer is left as it is"
SHARED_WEIGHT = "its weight is shared with other nodes"


def own_weight_layers(
    graph: ir.Graph, first_layer: bool
) -> tuple[list[WeightedLayer], list[tuple[ir.Node, str]]]:
    """Rule 6: the layers whose own weight may be rewritten, and (node, reason) for the others."""
    layers: list[WeightedLayer] = []
    left: list[tuple[ir.Node, str]] = []
    seen_first = False
    for node in graph:
        layer = weighted_layer(node)
        if layer is None:
            continue
        if not seen_first:
            seen_first = True
            if not first_layer:
                left.append((node, FIRST_LAYER_LEFT))
                continue
        if len(layer.weight.uses()) != 1:
            left.append((node, SHARED_WEIGHT))
            continue
        layers.append(layer)
    return layers, left


def node_macs(node: ir.Node) -> int | None:
    """MACs per sample of a weighted layer, or None (not one, or a shape is unknown)."""
    layer = weighted_layer(node)
    return None if layer is None else layer.macs_per_sample()


def is_depthwise(layer: WeightedLayer) -> bool:
    """A grouped Conv with one input channel per group (depthwise, any channel multiplier)."""
    return layer.kind.op_type == "Conv" and layer.group > 1 and layer.weight_shape[1] == 1


def depthwise_layers(graph: ir.Graph) -> list[ir.Node]:
    """The depthwise convolutions of a graph (its top level)."""
    found = []
    for node in graph:
        layer = weighted_layer(node)
        if layer is not None and is_depthwise(layer):
            found.append(node)
    return found
