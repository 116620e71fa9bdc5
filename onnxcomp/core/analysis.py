"""Model analysis for ``onnxcomp inspect``: I/O, op histogram, parameters, file size and MACs.

It works on the protobuf read without external data, so models over 2 GB are summarized without
loading their weights; :func:`onnxcomp.report.render_summary` prints the result.

MACs (multiply-accumulates) are counted for Conv, ConvTranspose, Gemm and MatMul, and for the
quantized forms ConvInteger, QLinearConv, MatMulInteger and QLinearMatMul, from shapes found by
ONNX shape inference on a copy of the model whose dynamic input dims are fixed (the first dim to
``batch``, the others to ``dim_default``). A layer whose shapes stay unknown is listed in
``ModelSummary.unknown_shape_layers``; it is never counted as zero.

Limitations:

* Only nodes of the main graph are counted; MAC ops inside subgraphs (If, Loop, Scan) or inside
  model-local functions are not counted, and a note says so.
* The copy used for shape inference carries no weight data (large tensors are replaced by
  external-data stubs with the same dims), so models over 2 GB go through ``infer_shapes`` too.
  If even that copy is too large for protobuf, MACs are skipped with a note.
* Existing ``value_info`` is dropped before inference (it may be stale once dims are fixed), so
  outputs of custom-domain ops with no shape function have unknown shapes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper
from onnxscript import optimizer

from onnxcomp.core.graph import fold_constant_of_shape
from onnxcomp.core.inputs import input_specs
from onnxcomp.core.macs import conv_macs, conv_transpose_macs, gemm_macs, matmul_macs
from onnxcomp.core.proto import (
    PROTOBUF_LIMIT,
    attr,
    densify,
    external_locations,
    graph_tensors,
    has_sparse_initializers,
    subgraphs,
)
from onnxcomp.errors import OnnxcompError

Shape = tuple[int | None, ...]
Known = tuple[int, ...] | None  # a shape whose dims are all known, or None

# Initializers with more elements than this are replaced by data-less stubs for shape inference.
_STRIP_ABOVE_ELEMENTS = 1024
_STUB_LOCATION = "__onnxcomp_shape_only__"
_NON_PARAMETER_TYPES = {
    TensorProto.UNDEFINED,
    TensorProto.STRING,
    TensorProto.BOOL,
    TensorProto.COMPLEX64,
    TensorProto.COMPLEX128,
}
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


@dataclass
class TensorInfo:
    """A graph input or output: name, dtype name (``float``, ``int64``...) and shape."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class LayerMacs:
    """MACs of one node, with the shapes they were counted from."""

    node: str
    op_type: str
    macs: int
    output_shape: tuple[int, ...] | None
    weight_shape: tuple[int, ...] | None


@dataclass
class ModelSummary:
    """Everything ``onnxcomp inspect`` reports about a model."""

    path: str | None
    file_bytes: int | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    num_nodes: int
    parameters: int
    parameter_bytes: int
    layers: list[LayerMacs]
    total_macs: int
    batch: int
    unknown_shape_layers: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (tuples become lists)."""
        data = asdict(self)
        for layer in data["layers"]:
            for key in ("output_shape", "weight_shape"):
                if layer[key] is not None:
                    layer[key] = list(layer[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSummary:
        """The inverse of :meth:`to_dict`."""
        values = dict(data)
        values["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
        values["outputs"] = [TensorInfo(**t) for t in data["outputs"]]
        values["layers"] = [
            LayerMacs(
                node=item["node"],
                op_type=item["op_type"],
                macs=item["macs"],
                output_shape=_tuple_or_none(item["output_shape"]),
                weight_shape=_tuple_or_none(item["weight_shape"]),
            )
            for item in data["layers"]
        ]
        return cls(**values)


def _tuple_or_none(value: list[int] | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


# ---------------------------------------------------------------------------------------------
# Tensors and parameters


def _numel(dims: Any) -> int:
    return math.prod(int(d) for d in dims)


def _tensor_nbytes(data_type: int, numel: int) -> int:
    """Storage bytes of ``numel`` elements of an ONNX data type."""
    name = TensorProto.DataType.Name(data_type)
    if name in _SUB_BYTE_BITS:
        return math.ceil(numel * _SUB_BYTE_BITS[name] / 8)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return numel * itemsize


def _constant_value_numel(node: onnx.NodeProto) -> tuple[int, int]:
    """(elements, bytes) of a Constant node given by value_float(s)/value_int(s)."""
    for attribute in node.attribute:
        if attribute.name == "value_float":
            return 1, 4
        if attribute.name == "value_int":
            return 1, 8
        if attribute.name == "value_floats":
            return len(attribute.floats), 4 * len(attribute.floats)
        if attribute.name == "value_ints":
            return len(attribute.ints), 8 * len(attribute.ints)
    return 0, 0


def count_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(elements, bytes) of numeric initializers and Constant tensors, subgraphs included.

    Counted from tensor dims, so it works without loading external data.
    """
    total = nbytes = 0
    for tensor in graph_tensors(model.graph):
        if tensor.data_type in _NON_PARAMETER_TYPES:
            continue
        numel = _numel(tensor.dims)
        total += numel
        nbytes += _tensor_nbytes(tensor.data_type, numel)
    for sparse in model.graph.sparse_initializer:
        if sparse.values.data_type in _NON_PARAMETER_TYPES:
            continue
        numel = _numel(sparse.values.dims)
        total += numel
        nbytes += _tensor_nbytes(sparse.values.data_type, numel)
        nbytes += _tensor_nbytes(sparse.indices.data_type, _numel(sparse.indices.dims))
    for graph in [model.graph, *subgraphs(model.graph)]:
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                numel, size = _constant_value_numel(node)
                total += numel
                nbytes += size
    return total, nbytes


def model_file_bytes(
    model: onnx.ModelProto, path: str | Path, parameter_bytes: int = 0
) -> int | None:
    """Size of the model file plus its external-data files; None if the file does not exist.

    A model loaded with its external data no longer records where it came from; when the file
    is smaller than ``parameter_bytes`` its header is re-read to find the data files.
    """
    path = Path(path)
    if not path.is_file():
        return None
    size = path.stat().st_size
    locations = external_locations(model)
    if not locations and size < parameter_bytes:
        locations = external_locations(onnx.load(str(path), load_external_data=False))
    for location in sorted(locations):
        data_path = path.parent / location
        if data_path.is_file():
            size += data_path.stat().st_size
    return size


# ---------------------------------------------------------------------------------------------
# Inputs, outputs and histogram


def _value_info(value: onnx.ValueInfoProto) -> TensorInfo:
    if not value.type.HasField("tensor_type"):
        return TensorInfo(value.name, value.type.WhichOneof("value") or "unknown", [])
    tensor_type = value.type.tensor_type
    dtype = TensorProto.DataType.Name(tensor_type.elem_type).lower()
    shape: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or "?")
    return TensorInfo(value.name, dtype, shape)


def _graph_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    initializers = {init.name for init in model.graph.initializer}
    return [_value_info(v) for v in model.graph.input if v.name not in initializers]


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the main graph, most frequent first (ties by name)."""
    counts = Counter(_op_key(node) for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ---------------------------------------------------------------------------------------------
# Shape inference


def _stub_tensor(tensor: TensorProto) -> TensorProto:
    """A copy of ``tensor`` with its dims and type but no data (an external-data stub)."""
    stub = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stub.data_location = TensorProto.EXTERNAL
    stub.external_data.add(key="location", value=_STUB_LOCATION)
    return stub


def _shape_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without large weight data, value_info or output shapes."""
    graph = model.graph
    copy_graph = onnx.GraphProto(name=graph.name)
    copy_graph.node.extend(graph.node)
    copy_graph.input.extend(graph.input)
    copy_graph.sparse_initializer.extend(graph.sparse_initializer)
    for init in graph.initializer:
        large = _numel(init.dims) > _STRIP_ABOVE_ELEMENTS
        external = init.data_location == TensorProto.EXTERNAL
        copy_graph.initializer.append(_stub_tensor(init) if large or external else init)
    for out in graph.output:
        value = copy_graph.output.add(name=out.name)
        if out.type.HasField("tensor_type"):
            value.type.tensor_type.elem_type = out.type.tensor_type.elem_type
        else:
            value.type.CopyFrom(out.type)
    copy = onnx.ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
    )
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    copy.graph.CopyFrom(copy_graph)
    return copy


def _fix_input_dims(model: onnx.ModelProto, batch: int, dim_default: int) -> None:
    """Set the dims of the model's real inputs, in place, from ``InputSpec.concrete_shape``."""
    specs = {spec.name: spec for spec in input_specs(model)}
    for value in model.graph.input:
        spec = specs.get(value.name)
        if spec is None or not value.type.tensor_type.HasField("shape"):
            continue
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for d in spec.concrete_shape(batch, dim_default):
            shape.dim.add().dim_value = d


def _shape_of(value: onnx.ValueInfoProto) -> Shape | None:
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in tensor_type.shape.dim
    )


def infer_shapes(
    model: onnx.ModelProto, batch: int = 1, dim_default: int = 1
) -> tuple[dict[str, Shape], list[str]]:
    """Shapes of all values with dynamic input dims fixed, and notes on anything that failed."""
    notes: list[str] = []
    copy = _shape_only_copy(model)
    try:
        _fix_input_dims(copy, batch, dim_default)
    except OnnxcompError as exc:
        notes.append(f"input dims not fixed ({exc}); dynamic dims stay unknown")
    shapes: dict[str, Shape] = {}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    if copy.ByteSize() > PROTOBUF_LIMIT:
        notes.append("model graph is too large for shape inference even without weights")
        return shapes, notes
    inferred = None
    for data_prop in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(copy, data_prop=data_prop)
            break
        except Exception as exc:  # onnx raises several types here
            notes.append(f"shape inference (data_prop={data_prop}) failed: {exc}")
    if inferred is None:
        return shapes, notes
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shape = _shape_of(value)
        if shape is not None:
            shapes.setdefault(value.name, shape)
    return shapes, notes


# ---------------------------------------------------------------------------------------------
# MACs


def _known(shape: Shape | None) -> Known:
    if shape is None or any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _conv(node: onnx.NodeProto, x: Known, w: Known, y: Known) -> int | None:
    return None if y is None or w is None or len(w) < 2 else conv_macs(y, w)


def _conv_transpose(node: onnx.NodeProto, x: Known, w: Known, y: Known) -> int | None:
    return None if x is None or w is None or len(w) < 2 else conv_transpose_macs(x, w)


def _gemm(node: onnx.NodeProto, x: Known, w: Known, y: Known) -> int | None:
    if x is None or w is None or len(x) != 2 or len(w) != 2:
        return None
    trans_a, trans_b = bool(attr(node, "transA", 0)), bool(attr(node, "transB", 0))
    return gemm_macs(x, w, trans_a, trans_b)


def _matmul(node: onnx.NodeProto, x: Known, w: Known, y: Known) -> int | None:
    return None if not x or not w else matmul_macs(x, w)


@dataclass(frozen=True)
class MacRule:
    """Where a MAC op's activations and weight are, and its MACs from their shapes (and the
    output's), or None when a needed shape is unknown."""

    data_index: int
    weight_index: int
    count: Callable[[onnx.NodeProto, Known, Known, Known], int | None]


MAC_RULES: dict[str, MacRule] = {
    "Conv": MacRule(0, 1, _conv),
    "ConvInteger": MacRule(0, 1, _conv),
    "QLinearConv": MacRule(0, 3, _conv),
    "ConvTranspose": MacRule(0, 1, _conv_transpose),
    "Gemm": MacRule(0, 1, _gemm),
    "MatMul": MacRule(0, 1, _matmul),
    "MatMulInteger": MacRule(0, 1, _matmul),
    "QLinearMatMul": MacRule(0, 3, _matmul),
}


def _node_macs(
    node: onnx.NodeProto, shapes: dict[str, Shape]
) -> tuple[int, tuple[int, ...] | None, tuple[int, ...] | None] | None:
    """(macs, output shape, weight shape), or None when a needed shape is unknown."""
    rule = MAC_RULES[node.op_type]
    if len(node.input) <= rule.weight_index:
        return None
    x = _known(shapes.get(node.input[rule.data_index]))
    w = _known(shapes.get(node.input[rule.weight_index]))
    y = _known(shapes.get(node.output[0])) if node.output else None
    macs = rule.count(node, x, w, y)
    return None if macs is None else (macs, y, w)


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def count_macs(
    model: onnx.ModelProto, shapes: dict[str, Shape]
) -> tuple[list[LayerMacs], list[str]]:
    """Per-layer MACs of the main graph's MAC ops, and the layers whose shapes are unknown."""
    layers: list[LayerMacs] = []
    unknown: list[str] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in MAC_RULES or node.domain not in ("", "ai.onnx"):
            continue
        name = _node_name(node, index)
        try:
            result = _node_macs(node, shapes)
        except ValueError:  # shapes that do not broadcast
            result = None
        if result is None:
            unknown.append(name)
            continue
        macs, out_shape, weight_shape = result
        layers.append(LayerMacs(name, node.op_type, macs, out_shape, weight_shape))
    return layers, unknown


def _uncounted_notes(model: onnx.ModelProto) -> list[str]:
    notes = []
    nested = sum(node.op_type in MAC_RULES for sub in subgraphs(model.graph) for node in sub.node)
    if nested:
        notes.append(f"{nested} MAC op(s) inside subgraphs (If/Loop/Scan) are not counted")
    local = {(f.domain, f.name) for f in model.functions}
    calls = sum((node.domain, node.op_type) in local for node in model.graph.node)
    if calls:
        notes.append(f"{calls} call(s) of model-local functions are not counted")
    return notes


# ---------------------------------------------------------------------------------------------
# Summary


def _constant_folded(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy with constant subgraphs folded (exporters compute e.g. Pad's pads with
    ConstantOfShape/Concat/Reshape chains that shape inference cannot see through)."""
    try:
        if has_sparse_initializers(model):  # onnx-ir would drop them
            dense = onnx.ModelProto()
            dense.CopyFrom(model)
            densify(dense)
            model = dense
        copy = ir.from_proto(model)
        optimizer.fold_constants(copy, should_fold=fold_constant_of_shape)
        return ir.to_proto(copy)
    except Exception:  # an analysis aid only: without it the layers stay "unknown"
        return None


def summarize(
    model: onnx.ModelProto,
    path: str | Path | None = None,
    batch: int = 1,
    dim_default: int = 1,
) -> ModelSummary:
    """Analyse ``model`` (loaded from ``path`` if given, for the file size) at ``batch``."""
    if batch < 1 or dim_default < 1:
        raise OnnxcompError(f"batch and dynamic dims must be >= 1 (got {batch}, {dim_default})")
    parameters, parameter_bytes = count_parameters(model)
    shapes, notes = infer_shapes(model, batch, dim_default)
    layers, unknown = count_macs(model, shapes)
    if unknown:
        folded = _constant_folded(model)
        if folded is not None:
            folded_shapes, _ = infer_shapes(folded, batch, dim_default)
            folded_layers, still_unknown = count_macs(folded, folded_shapes)
            if len(still_unknown) < len(unknown):
                layers, unknown = folded_layers, still_unknown
                notes.append("shapes inferred on a copy with constant subgraphs folded")
    notes.extend(_uncounted_notes(model))
    return ModelSummary(
        path=None if path is None else str(path),
        file_bytes=None if path is None else model_file_bytes(model, path, parameter_bytes),
        ir_version=int(model.ir_version),
        opsets={(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=_graph_inputs(model),
        outputs=[_value_info(v) for v in model.graph.output],
        op_histogram=op_histogram(model),
        num_nodes=len(model.graph.node),
        parameters=parameters,
        parameter_bytes=parameter_bytes,
        layers=layers,
        total_macs=sum(layer.macs for layer in layers),
        batch=batch,
        unknown_shape_layers=unknown,
        notes=notes,
    )
