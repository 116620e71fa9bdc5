"""Which weights unstructured magnitude pruning touches: one rule for ``convert --sparsity``
(one-shot) and ``finetune --sparsity`` (gradual, `onnxcomp.training.gradual`).

Rules:

1. Candidates are the weighted layers of ``core/layers.py`` (Conv, ConvTranspose, Gemm,
   MatMul) whose weight is a constant initializer, in graph order.
2. The first of them stays dense unless ``first_layer`` (it holds few weights and sees the raw
   input).
3. A weight read by more than one node is left alone (pruning it would prune another layer).
4. Biases are never candidates.

Every layer left alone comes back with its reason (node label, reason), for the report.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxcomp.core.graph import label
from onnxcomp.core.layers import WeightedLayer, weighted_layer

FIRST_LAYER = "the first layer stays dense"
SHARED_WEIGHT = "its weight is shared with other nodes"


def prunable_layers(
    graph: ir.Graph, first_layer: bool = False
) -> tuple[list[WeightedLayer], list[tuple[str, str]]]:
    """Rules 1-3: the layers whose weights magnitude pruning may zero, and (label, reason) for
    the weighted layers it leaves alone."""
    layers: list[WeightedLayer] = []
    skipped: list[tuple[str, str]] = []
    seen_first = False
    for node in graph:
        layer = weighted_layer(node)
        if layer is None:
            continue
        if not seen_first:
            seen_first = True
            if not first_layer:
                skipped.append((label(node), FIRST_LAYER))
                continue
        if len(layer.weight.uses()) != 1:
            skipped.append((label(node), SHARED_WEIGHT))
            continue
        layers.append(layer)
    return layers, skipped
