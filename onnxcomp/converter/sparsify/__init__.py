"""Unstructured magnitude pruning (``--sparsity S``), and ONNX sparse-initializer storage."""

from onnxcomp.converter.sparsify.config import SCOPES, SPARSITY_MARK, SparsityConfig
from onnxcomp.converter.sparsify.sparse_storage import densify, store_sparse
from onnxcomp.converter.sparsify.sparsify_pass import SparsifyPass, prune_masks

__all__ = [
    "SCOPES",
    "SPARSITY_MARK",
    "SparsifyPass",
    "SparsityConfig",
    "densify",
    "prune_masks",
    "store_sparse",
]
