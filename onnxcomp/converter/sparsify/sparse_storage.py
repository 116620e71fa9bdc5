"""ONNX ``sparse_initializer`` storage of pruned weights, at the protobuf edge.

onnx-ir (the graph every pass works on) does not read or write ``sparse_initializer``, so this
runs on the saved ``onnx.ModelProto``: :func:`store_sparse` moves each initializer named in
``onnxcomp.sparsity`` to a sparse tensor (non-zero values + linearized int64 indices, as the
checker requires) when that is smaller than its dense form, i.e. for float32 when more than
two thirds of it is zero. ONNX Runtime densifies sparse initializers when it loads the model.
:func:`densify` is the inverse, for readers (onnx-ir among them) that need dense tensors.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp.converter.sparsify.config import SPARSITY_MARK


def sparse_tensor(array: np.ndarray, name: str) -> onnx.SparseTensorProto:
    """The sparse form of ``array``: values of its non-zeros, their linearized indices."""
    flat = array.ravel()
    indices = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[indices], name)
    return helper.make_sparse_tensor(
        values, numpy_helper.from_array(indices, f"{name}.indices"), list(array.shape)
    )


def store_sparse(proto: onnx.ModelProto) -> list[str]:
    """Move the pruned weights (``onnxcomp.sparsity`` in the metadata) whose sparse form is
    smaller into ``graph.sparse_initializer``; returns their names. In place."""
    marks = {p.key: p.value for p in proto.metadata_props}
    names = set(json.loads(marks.get(SPARSITY_MARK, "{}")))
    moved: list[str] = []
    kept = []
    for init in proto.graph.initializer:
        if init.name in names and init.data_location != onnx.TensorProto.EXTERNAL:
            array = numpy_helper.to_array(init)
            sparse = sparse_tensor(array, init.name)
            if sparse.ByteSize() < init.ByteSize():
                proto.graph.sparse_initializer.append(sparse)
                moved.append(init.name)
                continue
        kept.append(init)
    if moved:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    return moved


def densify(proto: onnx.ModelProto) -> int:
    """Turn every ``sparse_initializer`` back into a dense initializer; returns their count.
    In place."""
    count = len(proto.graph.sparse_initializer)
    for sparse in proto.graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices)
        dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
        if indices.ndim == 2:  # [nnz, rank] coordinates
            indices = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
        dense[indices] = values
        proto.graph.initializer.append(
            numpy_helper.from_array(dense.reshape(tuple(sparse.dims)), sparse.values.name)
        )
    del proto.graph.sparse_initializer[:]
    return count
