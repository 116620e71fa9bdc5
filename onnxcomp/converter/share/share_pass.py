"""k-means weight sharing (Han et al. 2016, Deep Compression's second stage).

Rules:

1. Candidates are the weighted layers of ``core/layers.py`` whose weight is a constant
   initializer used by that node only, in graph order (``core.layers.own_weight_layers``);
   the first stays as it is unless ``first_layer``; it and a shared weight are ``skipped``
   entries, and so is a weight with at most K distinct values (nothing to gain).
2. Per layer, 1-D k-means with K centroids, linearly initialised between min and max, Lloyd
   iterations in float64 (``kmeans.py``); each weight becomes its centroid (cast to the
   weight's dtype). The graph is unchanged: a float model that ONNX Runtime runs as is.
3. Zeros stay exact (a model pruned by ``--sparsity`` keeps its sparsity): when a weight holds
   zeros, they are their own cluster at 0 and the non-zero values share the other K - 1.
4. The model is marked in its metadata: ``onnxcomp.shared`` = JSON {weight name: K}; the
   archive recomputes the codebook and indices from the weight's distinct values.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.share.config import SHARED_MARK, ShareConfig
from onnxcomp.converter.share.kmeans import kmeans_1d
from onnxcomp.core.graph import label, set_constant
from onnxcomp.core.layers import own_weight_layers
from onnxcomp.core.ops import float_model_problem
from onnxcomp.errors import OptionError


def share_weight(weight: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Rules 2 and 3: the shared weight and its codebook (sorted, zero included when kept)."""
    flat = weight.astype(np.float64).ravel()
    zero = flat == 0
    if zero.any():
        centroids, labels = kmeans_1d(flat[~zero], k - 1, iterations)
        shared = np.zeros_like(flat)
        shared[~zero] = centroids[labels]
    else:
        centroids, labels = kmeans_1d(flat, k, iterations)
        shared = centroids[labels]
    out = shared.astype(weight.dtype).reshape(weight.shape)
    return out, np.unique(out)


class SharePass(CompressionPass):
    """``--weight-sharing K``: per-layer k-means codebooks (see the module docstring)."""

    name = "weight-sharing"
    lossless = False

    def __init__(self, config: ShareConfig, context: PassContext | None = None) -> None:
        super().__init__(context)
        self.config = config

    def check(self, model: ir.Model) -> None:
        problem = float_model_problem(model, "--weight-sharing", "share weights before")
        if problem:
            raise OptionError(problem)

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        k = self.config.clusters
        shared: dict[str, int] = {}
        layers, left = own_weight_layers(model.graph, self.config.first_layer)
        record.skipped = [Skipped(label(node), reason) for node, reason in left]
        for layer in layers:
            node = layer.node
            weight = layer.weight_array()
            distinct = np.unique(weight).size
            if distinct <= k:
                record.skipped.append(Skipped(label(node), f"only {distinct} distinct values"))
                continue
            new, codebook = share_weight(weight, k, self.config.iterations)
            value = layer.weight
            set_constant(value, new)
            shared[str(value.name)] = k
            record.changes.append(f"{label(node)}: {weight.size} weights -> {codebook.size} values")
        if not shared:
            record.summary = "no weight to share"
            return
        model.metadata_props[SHARED_MARK] = json.dumps(shared, sort_keys=True)
        record.modified = True
        record.summary = f"{len(shared)} weights share a codebook of {k} values each"
