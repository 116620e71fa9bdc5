"""Helpers on ``onnx.ModelProto`` graphs, for the edges where protobuf is what we hold.

The passes work on onnx-ir (:mod:`onnxcomp.core.graph`); these are for the code that hands
protobuf models to ONNX Runtime (sessions with extra outputs) and to
``onnxruntime.quantization`` (QDQ placement and the edits on its output), and for reading
QDQ models back: attributes, labels, producer and consumer maps, constants and dequantized
values; and for the edges that must not load weights into onnx-ir (``inspect`` on models over
2 GB, external-data checks when loading): tensors, subgraphs, external-data locations.

ONNX ``sparse_initializer``: onnx-ir neither reads nor writes it (``ir.load`` and
``ir.from_proto`` silently drop it, leaving the weight missing), so every reader of a file
calls :func:`densify` first (``core/io.load_model``, ``storage/packed``, ``inspect``), and
``convert --sparse-initializers`` writes it with :func:`store_sparse` on the saved protobuf.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import OnnxcompError

# The largest message protobuf serializes (2 GB - 1).
PROTOBUF_LIMIT = 2**31 - 1


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of a node's attribute (ints, floats, lists, bytes...), else ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def node_key(node: onnx.NodeProto) -> str:
    """A node's name, or its first output when it has none."""
    return node.name or node.output[0]


def label(node: onnx.NodeProto) -> str:
    """How reports name a node: ``Conv 'layer1.0.conv1'`` (the output name if it has none)."""
    return f"{node.op_type} '{node_key(node)}'"


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values by name (not converted to numpy)."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    found[node.output[0]] = attribute.t
    return found


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The main graph's initializers by name."""
    return {t.name: t for t in model.graph.initializer}


def consumers_of(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes reading it, in graph order (once per input slot)."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def producers_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node writing it."""
    return {out: node for node in model.graph.node for out in node.output if out}


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named tensors (untyped extra outputs)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return copy


@dataclass
class Dequantized:
    """A DequantizeLinear of constants: q, scale, zero point, axis (>= 0), and the node."""

    node: onnx.NodeProto
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def values(self) -> np.ndarray:
        """The dequantized float64 values, (q - zero point) x scale."""
        shape = [1] * self.q.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        scale = self.scale.astype(np.float64).reshape(shape if self.scale.size > 1 else ())
        zp = self.zero_point.astype(np.float64)
        zp = zp.reshape(shape) if zp.size > 1 else zp.reshape(())
        return (self.q.astype(np.float64) - zp) * scale


def dequantized(
    node: onnx.NodeProto | None, constants: Mapping[str, onnx.TensorProto]
) -> Dequantized | None:
    """A DequantizeLinear node whose q and scale (and zero point, if any) are in ``constants``,
    read as :class:`Dequantized`; None for any other node."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
        return None
    names = [name for name in node.input if name]
    if any(name not in constants for name in names):
        return None
    q = numpy_helper.to_array(constants[node.input[0]])
    scale = numpy_helper.to_array(constants[node.input[1]])
    has_zero = len(node.input) > 2 and node.input[2]
    zero_point = (
        numpy_helper.to_array(constants[node.input[2]]) if has_zero else np.zeros((), q.dtype)
    )
    axis = int(attr(node, "axis", 1))
    return Dequantized(node, q, scale, zero_point, axis + q.ndim if axis < 0 else axis)


def dequantize(dq: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    """The float64 value of a DequantizeLinear whose inputs are all constants."""
    found = dequantized(dq, constants)
    return None if found is None else found.values()


def graph_tensors(graph: onnx.GraphProto, constants_only: bool = True) -> Iterator[TensorProto]:
    """Initializers and tensor attributes of a graph and all its subgraphs.

    With ``constants_only`` the tensor attributes are those of Constant nodes only.
    """
    yield from graph.initializer
    for node in graph.node:
        take = not constants_only or (node.op_type == "Constant" and node.domain in ("", "ai.onnx"))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and take:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS and take:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_tensors(attr.g, constants_only)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graph_tensors(sub, constants_only)


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """All subgraphs nested in a graph's nodes (not the graph itself)."""
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield sub
                yield from subgraphs(sub)


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external-data files (locations relative to the model) its tensors point to."""
    locations = set()
    for tensor in graph_tensors(model.graph, constants_only=False):
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


# Sparse storage is used for float weights only: biases, shapes and quantized weights stay dense.
_SPARSE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def sparse_tensor(array: np.ndarray, name: str) -> onnx.SparseTensorProto:
    """The sparse form of ``array``: values of its non-zeros, their linearized int64 indices
    (the 1-D form ``onnx.checker`` and ONNX Runtime accept)."""
    flat = array.ravel()
    indices = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[indices], name)
    return helper.make_sparse_tensor(
        values, numpy_helper.from_array(indices, f"{name}.indices"), list(array.shape)
    )


def store_sparse(proto: onnx.ModelProto) -> list[str]:
    """Move the main graph's float weights whose sparse form is smaller into
    ``graph.sparse_initializer`` (in place); returns their names, in graph order.

    Rules: float initializers of at least 2 dimensions (weights, not biases or shapes) held
    inside the file, with at least one non-zero; moved only when the sparse tensor serializes
    smaller (float32: more than 2/3 zeros, since the indices are int64). ONNX Runtime
    densifies them when it loads the model; :func:`densify` is the inverse.
    """
    moved: list[str] = []
    kept = []
    for init in proto.graph.initializer:
        if (
            init.data_type in _SPARSE_TYPES
            and len(init.dims) >= 2
            and init.data_location != TensorProto.EXTERNAL
        ):
            array = numpy_helper.to_array(init)
            if np.any(array):
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


def has_sparse_initializers(proto: onnx.ModelProto) -> bool:
    """Whether the model's graph or any subgraph holds a ``sparse_initializer``."""
    return any(g.sparse_initializer for g in [proto.graph, *subgraphs(proto.graph)])


def densify(proto: onnx.ModelProto) -> int:
    """Turn every ``sparse_initializer`` (main graph and subgraphs) into a dense initializer
    of the same name, appended after the others; returns their count. In place.

    Values in an external data file that was not loaded are refused (one line).
    """
    count = 0
    for graph in [proto.graph, *subgraphs(proto.graph)]:
        for sparse in graph.sparse_initializer:
            graph.initializer.append(_dense(sparse))
            count += 1
        del graph.sparse_initializer[:]
    return count


def _dense(sparse: onnx.SparseTensorProto) -> TensorProto:
    name = sparse.values.name
    if TensorProto.EXTERNAL in (sparse.values.data_location, sparse.indices.data_location):
        raise OnnxcompError(
            f"sparse initializer '{name}' keeps its values in an external data file; onnxcomp "
            "reads sparse initializers stored inside the .onnx file: save the model without "
            "external data"
        )
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
    if indices.ndim == 2:  # [nnz, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    dense[indices] = values
    return numpy_helper.from_array(dense.reshape(dims), name)
