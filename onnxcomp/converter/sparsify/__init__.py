"""Unstructured magnitude pruning (``--sparsity S``); ONNX sparse-initializer storage of the
pruned weights is in :mod:`onnxcomp.core.proto` (``store_sparse``, ``densify``): every reader
needs it."""

from onnxcomp.converter.sparsify.config import SCOPES, SPARSITY_MARK, SparsityConfig
from onnxcomp.converter.sparsify.sparsify_pass import SparsifyPass, prune_masks

__all__ = [
    "SCOPES",
    "SPARSITY_MARK",
    "SparsifyPass",
    "SparsityConfig",
    "prune_masks",
]
