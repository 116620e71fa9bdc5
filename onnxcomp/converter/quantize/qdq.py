"""QDQ placement: onnxruntime.quantization's per-op registry, fed with our activation ranges.

ONNX Runtime's QDQ quantizer knows, op by op, where its CPU graph optimizer expects
QuantizeLinear/DequantizeLinear pairs so that it can fuse them into int8 kernels (QLinearConv,
QLinearAdd, QGemm, QLinearGlobalAveragePool, ...), and which activations (Relu, Clip) to
drop so the uint8 clamp does their work. We give it our calibration table instead of letting it
calibrate (its public ``calibration_cache_path`` input), then remove the float islands its
placement leaves for the CPU: a Pad that pads with zero runs on the quantized tensor with the
zero point as its constant.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.core.proto import attr, consumers_of, initializers, producers_of

# Op types whose inputs and outputs ORT's quantizer may quantize (its two registries).
QUANTIZABLE_OPS = frozenset(
    {
        "Add", "ArgMax", "AveragePool", "Clip", "Concat", "Conv", "ConvTranspose", "Flatten",
        "Gather", "Gemm", "GlobalAveragePool", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad",
        "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze",
        "Transpose", "Unsqueeze", "Where", "InstanceNormalization", "LayerNormalization",
    }
)  # fmt: skip


@dataclass(frozen=True)
class QdqSettings:
    """How weights and activations are quantized."""

    activation_type: str = "uint8"  # "uint8" (asymmetric) or "int8" (symmetric)
    per_channel: bool = True
    reduce_range: bool = False
    float_logits: bool = True  # Gemm/MatMul feeding a graph output keep a float output


# Ops whose output the placement quantizes with their input's scale and zero point.
SAME_SCALE_OPS = frozenset(
    {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad", "MaxPool"}
)
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})


def tensors_to_calibrate(model: onnx.ModelProto) -> list[str]:
    """Float tensors whose ranges the QDQ placement reads.

    As ORT's calibrator picks them (inputs and outputs of the ops it quantizes), less two
    kinds it never reads: outputs of ops that reuse their input's scale (shape ops, Pad,
    MaxPool), and a tensor whose only reader is a Relu/Clip (it takes the activation's
    output range, ``adjust_tensor_ranges`` in ORT's quantizer). Fewer tensors exposed make
    the calibration run faster and lighter.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.HasField("tensor_type")
    }
    constants = initializers(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    readers = consumers_of(model)
    outputs = {o.name for o in model.graph.output}
    shared = {
        out for node in model.graph.node if node.op_type in SAME_SCALE_OPS for out in node.output
    }
    names: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        for name in [*node.input, *node.output]:
            if not name or name in constants or types.get(name) not in floats:
                continue
            users = readers.get(name, [])
            feeds_activation_only = (
                len(users) == 1 and users[0].op_type in FUSED_ACTIVATIONS and name not in outputs
            )
            if name in shared or feeds_activation_only:
                continue
            names[name] = None
    return list(names)


def complete_ranges(
    model: onnx.ModelProto, ranges: dict[str, TensorRange]
) -> dict[str, TensorRange]:
    """The ranges the placement reads for tensors that were not calibrated (see
    :func:`tensors_to_calibrate`): a Relu/Clip input takes its output's range; an output of a
    same-scale op takes its input's."""
    full = dict(ranges)
    for node in model.graph.node:
        if node.op_type in FUSED_ACTIVATIONS and node.input and node.output[0] in full:
            full.setdefault(node.input[0], full[node.output[0]])
    for node in model.graph.node:
        if node.op_type in SAME_SCALE_OPS and node.input and node.input[0] in full:
            full.setdefault(node.output[0], full[node.input[0]])
    return full


def _ort_types(settings: QdqSettings):
    """ORT's activation and weight types (``activation_type`` was checked by QuantizeConfig)."""
    activation = QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8
    return activation, QuantType.QInt8


def place_qdq(
    model: onnx.ModelProto,
    ranges: dict[str, TensorRange],
    settings: QdqSettings,
    exclude_nodes: Iterable[str] = (),
) -> onnx.ModelProto:
    """Insert QDQ pairs with ORT's quantizer using the given activation ranges."""
    activation, weight = _ort_types(settings)
    ranges = complete_ranges(model, ranges)
    data = TensorsData(
        CalibrationMethod.MinMax,
        {
            name: TensorData(lowest=np.float32(r.low), highest=np.float32(r.high))
            for name, r in ranges.items()
        },
    )
    extra = {
        "ActivationSymmetric": settings.activation_type == "int8",
        "WeightSymmetric": True,
    }
    with tempfile.TemporaryDirectory(prefix="onnxcomp-qdq-") as folder:
        cache = Path(folder) / "ranges.json"
        source = Path(folder) / "model.onnx"
        target = Path(folder) / "model.qdq.onnx"
        save_tensors_data(data, cache)
        large = model.ByteSize() > 2**31 - 2**24
        onnx.save(model, source, save_as_external_data=large)
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
        quantize_static(
            source,
            target,
            calibration_data_reader=None,
            calibration_cache_path=cache,
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=activation,
            weight_type=weight,
            nodes_to_exclude=list(exclude_nodes),
            use_external_data_format=large,
            extra_options=extra,
        )
        result = onnx.load(target)
    if settings.float_logits:
        float_outputs(result)
    return result


def float_outputs(model: onnx.ModelProto) -> int:
    """Graph outputs made by Gemm/MatMul -> Q -> DQ are taken straight from the Gemm/MatMul.

    ONNX Runtime's QGemm and MatMulIntegerToFloat produce float outputs, so the last layer
    of a classifier needs no requantization: this saves a Q/DQ pair and an int8 rounding of
    the logits. Other Gemms keep their quantized outputs (their readers are int8 kernels).
    """
    graph = model.graph
    producer = producers_of(model)
    readers = consumers_of(model)
    removed = 0
    for output in graph.output:
        dq = producer.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(readers[dq.input[0]]) != 1:
            continue
        layer = producer.get(q.input[0])
        if (
            layer is None
            or layer.op_type not in ("Gemm", "MatMul")
            or len(readers[q.input[0]]) != 1
        ):
            continue
        index = list(layer.output).index(q.input[0])
        layer.output[index] = output.name
        graph.node.remove(q)
        graph.node.remove(dq)
        removed += 1
    return removed


def _scalar(initializers: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = initializers.get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def fuse_pad_islands(model: onnx.ModelProto) -> int:
    """DQ -> Pad(constant 0) -> Q with equal scales becomes a Pad on the quantized tensor.

    ORT's CPU optimizer has no QDQ rule for Pad, so the placement leaves it in float. Padding
    the quantized tensor with its zero point gives the same values (0.0 maps to the zero
    point). Returns how many Pads were moved onto the quantized tensor.
    """
    graph = model.graph
    inits = initializers(model)
    producer = producers_of(model)
    consumers = consumers_of(model)
    outputs = {o.name for o in graph.output}
    removed: list[onnx.NodeProto] = []
    fused = 0
    for pad in graph.node:
        if pad.op_type != "Pad" or attr(pad, "mode", b"constant") != b"constant":
            continue
        dq = producer.get(pad.input[0])
        users = consumers.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1:
            continue
        q = users[0]
        if q.op_type != "QuantizeLinear" or pad.output[0] in outputs or len(dq.input) < 3:
            continue
        s_in, z_in = _scalar(inits, dq.input[1]), _scalar(inits, dq.input[2])
        s_out = _scalar(inits, q.input[1])
        z_out = _scalar(inits, q.input[2]) if len(q.input) > 2 else None
        if any(v is None for v in (s_in, z_in, s_out, z_out)):
            continue
        if s_in.size != 1 or not np.allclose(s_in, s_out) or z_in.item() != z_out.item():
            continue
        if len(pad.input) > 2 and pad.input[2]:
            const = pad.input[2]
            value = _scalar(inits, const)
            if value is None:
                source = producer.get(const)
                if source is None or source.op_type != "DequantizeLinear":
                    continue
                value = (
                    numpy_helper.to_array(inits[source.input[0]])
                    if source.input[0] in inits
                    else None
                )
                if value is None or value.item() != z_in.item():
                    continue
            elif float(value) != 0.0:
                continue
        zero_point = numpy_helper.from_array(
            z_in.reshape(()).copy(), f"{pad.name or pad.output[0]}_zero_point"
        )
        graph.initializer.append(zero_point)
        while len(pad.input) < 3:
            pad.input.append("")
        pad.input[0] = dq.input[0]
        pad.input[2] = zero_point.name
        pad.output[0] = q.output[0]
        removed.append(q)
        if len(consumers[dq.output[0]]) == 1 and dq.output[0] not in outputs:
            removed.append(dq)
        fused += 1
    for node in removed:
        graph.node.remove(node)
    return fused
