"""Unstructured magnitude pruning (Han et al. 2015, Deep Compression's first stage).

Rules:

1. Candidates are the weighted layers of ``core/layers.py`` (Conv, ConvTranspose, Gemm,
   MatMul) whose weight is a constant initializer used by that node only, in graph order
   (``core.layers.own_weight_layers``). The first of them stays dense unless
   ``first_layer``; it and a shared weight are ``skipped`` entries with their reason.
2. ``layer`` scope: in each layer the ``round(S x n)`` weights of smallest |w| become exactly
   0 (ties broken by position, so the count is exact). ``global`` scope: the ``round(S x N)``
   smallest |w| over all candidate weights together (N their total count) become 0.
3. The weights keep their names, shapes and dtype; the graph is unchanged (a float model ONNX
   Runtime runs as is). Biases are not pruned.
4. The model is marked in its metadata: ``onnxcomp.sparsity`` = JSON {weight name: fraction
   of zeros}, for the archive (``onnxcomp/storage/``) and ``sparse_storage.py``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.sparsify.config import SPARSITY_MARK, SparsityConfig
from onnxcomp.core.graph import label, set_constant
from onnxcomp.core.layers import WeightedLayer, own_weight_layers
from onnxcomp.core.ops import float_model_problem
from onnxcomp.core.units import format_bytes
from onnxcomp.errors import OptionError


def candidate_layers(
    graph: ir.Graph, first_layer: bool
) -> tuple[list[WeightedLayer], list[Skipped]]:
    """Rule 1: the layers whose weights are pruned, and why the others are not."""
    layers, left = own_weight_layers(graph, first_layer)
    return layers, [Skipped(label(node), reason) for node, reason in left]


def smallest_mask(values: np.ndarray, count: int) -> np.ndarray:
    """A boolean mask of the ``count`` entries of smallest |value| (exactly ``count``)."""
    flat = np.abs(values.ravel())
    mask = np.zeros(flat.size, dtype=bool)
    if count > 0:
        mask[np.argsort(flat, kind="stable")[:count]] = True
    return mask.reshape(values.shape)


def prune_masks(weights: list[np.ndarray], sparsity: float, scope: str) -> list[np.ndarray]:
    """Rule 2: per weight, the mask of the entries set to zero."""
    if scope == "layer":
        return [smallest_mask(w, round(sparsity * w.size)) for w in weights]
    flat = np.concatenate([w.ravel() for w in weights]) if weights else np.zeros(0)
    mask = smallest_mask(flat, round(sparsity * flat.size))
    masks, start = [], 0
    for w in weights:
        masks.append(mask[start : start + w.size].reshape(w.shape))
        start += w.size
    return masks


class SparsifyPass(CompressionPass):
    """``--sparsity S``: the smallest weights set to zero (see the module docstring)."""

    name = "sparsify"
    lossless = False

    def __init__(self, config: SparsityConfig, context: PassContext | None = None) -> None:
        super().__init__(context)
        self.config = config

    def check(self, model: ir.Model) -> None:
        problem = float_model_problem(model, "--sparsity", "sparsify before")
        if problem:
            raise OptionError(problem)

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        layers, record.skipped = candidate_layers(model.graph, self.config.first_layer)
        weights = [layer.weight_array() for layer in layers]
        masks = prune_masks(weights, self.config.sparsity, self.config.scope)
        fractions: dict[str, float] = {}
        zeros = total = 0
        for layer, weight, mask in zip(layers, weights, masks, strict=True):
            pruned = np.where(mask, np.zeros((), weight.dtype), weight)
            value = layer.weight
            set_constant(value, pruned)
            fraction = float(np.mean(pruned == 0)) if pruned.size else 0.0
            fractions[str(value.name)] = round(fraction, 6)
            zeros += int(np.count_nonzero(pruned == 0))
            total += pruned.size
            record.changes.append(
                f"{label(layer.node)}: {fraction:.1%} zeros, {format_bytes(weight.nbytes)} dense, "
                f"{format_bytes(sparse_bytes(int(np.count_nonzero(pruned)), weight.itemsize))} "
                "sparse"
            )
        if not layers:
            record.summary = "no weight to prune"
            return
        model.metadata_props[SPARSITY_MARK] = json.dumps(fractions, sort_keys=True)
        record.modified = True
        itemsize = weights[0].dtype.itemsize
        record.summary = (
            f"{len(layers)} weights {zeros / total:.1%} zeros ({self.config.scope} scope); "
            f"{format_bytes(total * itemsize)} dense, "
            f"{format_bytes(sparse_bytes(total - zeros, itemsize))} as ONNX sparse tensors"
        )


def sparse_bytes(nonzeros: int, itemsize: int) -> int:
    """Bytes of an ONNX sparse tensor: values plus linearized int64 indices."""
    return nonzeros * (itemsize + 8)
