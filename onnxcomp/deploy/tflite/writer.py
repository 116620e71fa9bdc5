"""``write_tflite``: an ONNX model (float or onnxcomp's int8 QDQ) as a ``.tflite`` file.

Steps: float models get onnxcomp's cleanup and BatchNorm folding first (QDQ models are taken
as they are: folding would dequantize their weights); a symbolic batch is fixed to 1 (the
input keeps a shape signature of -1, so the interpreter can resize it); shapes are inferred;
Q/DQ pairs become tensor parameters (:mod:`.qdq`); each node is lowered (:mod:`.ops`); the
edges get QUANTIZE/DEQUANTIZE for the I/O type asked; the file is written atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.deploy.tflite.flatbuf import FlatModel, Quant
from onnxcomp.deploy.tflite.ops import HANDLERS, NHWC, PLAIN, Lowering, unsupported
from onnxcomp.deploy.tflite.qdq import Graph, read_graph
from onnxcomp.errors import OnnxcompError, OptionError

IO_DTYPES = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8}


def write_tflite(
    model: ir.Model,
    path: Path,
    *,
    io_dtype: str = "float32",
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> list[str]:
    """Write ``model`` to ``path`` as TFLite; returns notes for the report.

    ``io_dtype``: the type of the file's inputs and outputs (``int8``/``uint8`` only for an
    int8 QDQ model). ``ranges``: calibrated (low, high) of tensors the QDQ graph leaves in
    float (a classifier's logits), e.g. onnxcomp's calibration table; without them such a
    tensor gets a range bounded from its input's (noted).
    """
    if io_dtype not in IO_DTYPES:
        raise OptionError(f"io_dtype {io_dtype!r}: choose one of {', '.join(IO_DTYPES)}")
    proto, notes = _prepared(model)
    graph = read_graph(proto)
    if io_dtype != "float32" and not graph.quantized:
        raise OptionError(
            f"io_dtype {io_dtype} needs an int8 QDQ model; convert it with onnxcomp convert "
            "--int8 first, or write float32 I/O"
        )
    flat = FlatModel()
    low = Lowering(graph, flat, {k: (float(v[0]), float(v[1])) for k, v in (ranges or {}).items()})
    inputs = [_input(low, name, io_dtype, notes) for name in graph.inputs]
    for node in graph.nodes:
        if id(node) in low.skip:
            continue
        handler = HANDLERS.get(node.op)
        if handler is None:
            raise unsupported(node)
        handler(low, node)
    names = [o.name for o in proto.graph.output]
    outputs = [
        _output(low, name, resolved, io_dtype, notes)
        for name, resolved in zip(names, graph.outputs, strict=True)
    ]
    kind = "int8" if graph.quantized else "float32"
    notes.append(f"TFLite {kind} model, {len(flat.operators)} ops, {io_dtype} inputs/outputs")
    notes.extend(dict.fromkeys(low.notes))
    data = flat.serialize(inputs, outputs, "onnxcomp")
    _atomic_write(Path(path), data)
    return notes


def _prepared(model: ir.Model) -> tuple[onnx.ModelProto, list[str]]:
    """A shape-inferred protobuf copy, cleaned and BN-folded when float, batch fixed."""
    notes: list[str] = []
    proto = ir.serde.serialize_model(model)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    if not quantized:
        from onnxcomp.converter.cleanup.cleanup_pass import CleanupPass
        from onnxcomp.converter.cleanup.fold_batchnorm import FoldBatchNormPass

        copy = ir.serde.deserialize_model(proto)
        CleanupPass()(copy)
        FoldBatchNormPass()(copy)
        proto = ir.serde.serialize_model(copy)
        left = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
        if left:
            raise OnnxcompError(
                f"TFLite writer: BatchNormalization '{left[0]}' could not be folded into a "
                "layer; TFLite has no BatchNorm op: export it after a Conv/Gemm"
            )
    initializers = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
            notes.append(f"input '{value.name}': symbolic batch written as 1 (resizable)")
        if any(not d.HasField("dim_value") for d in dims):
            raise OnnxcompError(
                f"TFLite writer: input '{value.name}' has dynamic dimensions besides the "
                "batch; TFLite needs static shapes: export with a fixed input size"
            )
    for value in proto.graph.output:
        if value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.ClearField("shape")
    del proto.graph.value_info[:]
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as error:
        raise OnnxcompError(f"TFLite writer: shape inference failed: {error}") from error
    return proto, notes


def _input(low: Lowering, name: str, io_dtype: str, notes: list[str]) -> int:
    shape = low.shape(name)
    layout = NHWC if len(shape) == 4 else PLAIN
    if layout == NHWC:
        notes.append(f"input '{name}' is NHWC {list(shape[i] for i in (0, 2, 3, 1))}")
    nhwc = tuple(shape[i] for i in (0, 2, 3, 1)) if layout == NHWC else shape
    signature = (-1, *nhwc[1:])
    if not low.g.quantized:
        index = low.flat.tensor(name, nhwc, np.float32, signature=signature)
        low.tensors[name] = (index, layout)
        return index
    quant = low.quant(name)
    if io_dtype == "int8":
        index = low.flat.tensor(name, nhwc, np.int8, quant=quant, signature=signature)
        low.tensors[name] = (index, layout)
        return index
    edge_quant = None
    if io_dtype == "uint8":
        edge_quant = Quant.per_tensor(quant.scale[0], quant.zero_point[0] + 128)
    edge = low.flat.tensor(name, nhwc, IO_DTYPES[io_dtype], quant=edge_quant, signature=signature)
    inner = low.new_act(f"{name}__int8", layout, quant=quant, shape=shape)
    low.tensors[name] = (inner, layout)
    low.op("QUANTIZE", [edge], [inner])
    return edge


def _output(low: Lowering, name: str, resolved: str, io_dtype: str, notes: list[str]) -> int:
    if resolved not in low.tensors:
        raise OnnxcompError(f"TFLite writer: output '{name}' is not produced by the graph")
    index, layout = low.tensors[resolved]
    if layout == NHWC:
        notes.append(f"output '{name}' is NHWC")
    tensor = low.flat.tensors[index]
    if not low.g.quantized or io_dtype == "int8":
        tensor.name = name
        return index
    shape = tuple(int(d) for d in tensor.shape)
    if io_dtype == "float32":
        edge = low.flat.tensor(name, shape, np.float32)
        low.op("DEQUANTIZE", [index], [edge])
    else:
        quant = low.g.quant[resolved]
        edge_quant = Quant.per_tensor(quant.scale[0], quant.zero_point[0] + 128)
        edge = low.flat.tensor(name, shape, np.uint8, quant=edge_quant)
        low.op("QUANTIZE", [index], [edge])
    return edge


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.resolve().parent, prefix=".tflite-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes it 0600; a written file gets 0644
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


__all__ = ["Graph", "write_tflite"]
