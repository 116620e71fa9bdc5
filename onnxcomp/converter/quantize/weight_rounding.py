"""Error-compensating int8 weight rounding (GPTQ, Frantar et al. 2022) on the QDQ graph.

Plain rounding quantizes each weight on its own. GPTQ quantizes the columns of a layer's
weight one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of H = E[x x^T] (the Gram matrix of the layer's input
patches), so the layer's output error ||W X - W_q X|| is minimised rather than the weight
error. The quantization grid (the per-channel scales ONNX Runtime's placement chose) is kept:
only the int8 values change, so biases, scales and the fused graph stay as they are.

H is collected in the same streamed pass over the calibration data as the activation
histograms, from a seeded sample of output positions per image (memory: one K x K matrix per
layer group, whatever the number of images).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper
from threadpoolctl import threadpool_limits

from onnxcomp.core import proto
from onnxcomp.stats.gram import GroupedPatchGram

# The matrices here are small (K <= a few thousand): OpenBLAS's threads only add contention
# with ONNX Runtime's (a 576 x 576 Cholesky went from 14 ms to 2.3 s on a busy 2-core machine).
_ONE_BLAS_THREAD = {"limits": 1, "user_api": "blas"}

WEIGHT_LAYERS = ("Conv", "Gemm", "MatMul")
QUANTIZED_SUFFIX = "_quantized"
# ONNX Runtime's symmetric int8 weight range, and the one with reduce_range (7 bits).
WEIGHT_RANGE, REDUCED_WEIGHT_RANGE = (-127, 127), (-64, 64)


def gram_observers(
    model: onnx.ModelProto, positions: int = 16
) -> dict[str, list[GroupedPatchGram]]:
    """A GroupedPatchGram per weighted layer, keyed by the name of its float input tensor."""
    inits = {i.name: i for i in model.graph.initializer}
    observers: dict[str, list[GroupedPatchGram]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_LAYERS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.name or node.output[0]
        if node.op_type == "Conv":
            dims = list(inits[node.input[1]].dims)
            if len(dims) != 4:
                continue
            kernel = tuple(proto.attr(node, "kernel_shape", dims[2:]))
            if proto.attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            gram = GroupedPatchGram(
                name,
                "conv",
                kernel=kernel,
                strides=tuple(proto.attr(node, "strides", [1, 1])),
                pads=tuple(proto.attr(node, "pads", [0, 0, 0, 0])),
                dilations=tuple(proto.attr(node, "dilations", [1, 1])),
                group=int(proto.attr(node, "group", 1)),
                positions=positions,
                seed=index,
            )
        elif node.op_type == "Gemm" and proto.attr(node, "transA", 0):
            continue
        else:
            gram = GroupedPatchGram(name, "dense", positions=positions, seed=index)
        observers.setdefault(node.input[0], []).append(gram)
    return observers


def gptq_rows(
    weight: np.ndarray,
    scale: np.ndarray,
    hessian: np.ndarray,
    qmin: int,
    qmax: int,
    damp: float = 0.01,
) -> np.ndarray:
    """Quantize ``weight`` (rows: output channels, columns: inputs) with GPTQ.

    ``scale`` has one entry per row. Columns are visited in order of decreasing H diagonal
    (GPTQ's "act order"), each one's rounding error being pushed onto the remaining columns.
    """
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        upper = None
    s = scale.astype(np.float64).reshape(-1)
    s = np.where(s > 0, s, 1.0)
    q = np.zeros_like(w)
    for k in range(w.shape[1]):
        column = w[:, k]
        q[:, k] = np.clip(np.rint(column / s), qmin, qmax)
        if upper is None:
            continue
        err = (column - q[:, k] * s) / upper[k, k]
        w[:, k + 1 :] -= np.outer(err, upper[k, k + 1 :])
    result = np.empty_like(q)
    result[:, order] = q
    return result


def _group_rows(weight: np.ndarray, group: int) -> list[np.ndarray]:
    per_group = weight.shape[0] // group
    return [np.arange(g * per_group, (g + 1) * per_group) for g in range(group)]


# A rounder takes (rows: O x K float weights, scale: O per-row steps, grams: G x K x K input
# Gram matrices, one per group of O / G consecutive rows, qmin, qmax) and returns the integer
# values (O x K, as floats) on the same grid.
Rounder = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], np.ndarray]


def gptq_rounder(
    rows: np.ndarray, scale: np.ndarray, grams: np.ndarray, qmin: int, qmax: int
) -> np.ndarray:
    """GPTQ on each group of rows with its own Gram matrix."""
    new = np.empty_like(rows)
    for g, index in enumerate(_group_rows(rows, grams.shape[0])):
        new[index] = gptq_rows(rows[index], scale[index], grams[g], qmin, qmax)
    return new


def round_weights(
    qdq: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
    grams: Mapping[str, GroupedPatchGram],
    rounder: Rounder = gptq_rounder,
    qrange: tuple[int, int] = WEIGHT_RANGE,
) -> list[str]:
    """Re-round the int8 weights of the QDQ model's layers (GPTQ unless ``rounder`` says
    otherwise); returns what changed. A layer keeps its nearest rounding unless the new one
    has a lower output error on the collected inputs.

    ``grams`` maps the layer's node name to its :class:`GroupedPatchGram`; ``qrange`` is the
    weights' integer range (ONNX Runtime's: [-127, 127], [-64, 64] with reduce_range).
    """
    with threadpool_limits(**_ONE_BLAS_THREAD):
        return _round_weights(qdq, float_weights, grams, rounder, qrange)


def _round_weights(
    qdq: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
    grams: Mapping[str, GroupedPatchGram],
    rounder: Rounder,
    qrange: tuple[int, int],
) -> list[str]:
    inits = proto.initializers(qdq)
    producer = proto.producers_of(qdq)
    changes = []
    for node in qdq.graph.node:
        if node.op_type not in WEIGHT_LAYERS or len(node.input) < 2:
            continue
        gram = grams.get(node.name)
        dq = producer.get(node.input[1])
        if gram is None or gram.gram is None or dq is None or dq.op_type != "DequantizeLinear":
            continue
        quantized = inits.get(dq.input[0])
        if quantized is None or quantized.data_type != onnx.TensorProto.INT8:
            continue
        source = dq.input[0].removesuffix(QUANTIZED_SUFFIX)
        if source not in float_weights:
            continue
        w_float = np.asarray(float_weights[source], np.float64)
        w_int = numpy_helper.to_array(quantized)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2] and np.any(numpy_helper.to_array(inits[dq.input[2]])):
            continue  # asymmetric weights: keep plain rounding
        if node.op_type == "Conv":
            rows = w_float.reshape(w_float.shape[0], -1)
            axis_rows = True
        elif node.op_type == "Gemm" and proto.attr(node, "transB", 0):
            rows, axis_rows = w_float, True
        else:  # Gemm transB=0 / MatMul: weight (K, O)
            rows, axis_rows = w_float.T, False
        per_row = (
            np.broadcast_to(scale.reshape(-1), (rows.shape[0],))
            if scale.size > 1
            else np.full(rows.shape[0], scale.item())
        )
        new = rounder(rows, per_row, gram.gram, *qrange)
        new_int = (new if axis_rows else new.T).reshape(w_int.shape).astype(np.int8)
        w_old = np.asarray(w_int, np.float64)
        before = output_error(
            rows, w_old.reshape(rows.shape) if axis_rows else w_old.T, per_row, gram
        )
        after = output_error(rows, new, per_row, gram)
        if after >= before:
            continue
        quantized.CopyFrom(numpy_helper.from_array(new_int, quantized.name))
        changes.append(f"{node.name}: output error {before:.3g} -> {after:.3g}")
    return changes


def output_error(
    rows: np.ndarray, q: np.ndarray, scale: np.ndarray, gram: GroupedPatchGram
) -> float:
    """sum over groups of tr(dW H dW^T): the expected squared output error (up to 1/n)."""
    delta = rows - q * scale[:, None]
    total = 0.0
    for g, index in enumerate(_group_rows(rows, gram.gram.shape[0])):
        d = delta[index]
        total += float(np.einsum("oi,ij,oj->", d, gram.gram[g], d))
    return total / max(gram.rows, 1)
