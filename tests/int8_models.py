"""Small float models and their QDQ versions, shared by the int8 debugging tests."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import make_model, tensor
from onnx import helper

from onnxcomp.backends.ort import create_session
from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.converter.quantize.qdq import (
    QdqSettings,
    fuse_pad_islands,
    place_qdq,
    tensors_to_calibrate,
)
from onnxcomp.core.proto import with_outputs


def small_cnn(seed: int = 0, batch: int | str = "N", group: int = 1) -> onnx.ModelProto:
    """input [batch,3,8,8] -> conv1 -> relu -> conv2 -> relu -> GAP -> flatten -> fc (10
    classes); ``batch`` a number fixes the batch dimension (as many zoo models do); ``group``
    8 makes conv2 depthwise."""
    rng = np.random.default_rng(seed)
    inits = [
        tensor("w1", rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)),
        tensor("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
        tensor("w2", rng.normal(0, 0.3, (8, 8 // group, 3, 3)).astype(np.float32)),
        tensor("b2", rng.normal(0, 0.1, 8).astype(np.float32)),
        tensor("wf", rng.normal(0, 1.0, (10, 8)).astype(np.float32)),
        tensor("bf", rng.normal(0, 0.1, 10).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4, group=group
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [("input", [batch, 3, 8, 8])], ["logits"], inits, opset=17)


def with_symbolic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs and outputs take any batch (value_info dropped): a per-sample
    reference for a fixed-batch model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    for value in [*copy.graph.input, *copy.graph.output]:
        if value.type.tensor_type.HasField("shape") and value.type.tensor_type.shape.dim:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = "batch"
    return copy


def minmax_ranges(model: onnx.ModelProto, inputs: np.ndarray) -> dict[str, TensorRange]:
    names = tensors_to_calibrate(model)
    session = create_session(with_outputs(model, names))
    outputs = session.run(None, {"input": inputs})
    values = dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))
    return {
        n: TensorRange(min(float(values[n].min()), 0.0), max(float(values[n].max()), 0.0))
        for n in names
    }


def quantize(model: onnx.ModelProto, ranges: dict[str, TensorRange]) -> onnx.ModelProto:
    proto = place_qdq(model, ranges, QdqSettings())
    fuse_pad_islands(proto)
    return proto
