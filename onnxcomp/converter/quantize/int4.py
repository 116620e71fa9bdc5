"""INT4 weights for Conv and Gemm (``--int4-weights``): a size feature, activations stay float.

Rules:

1. Candidates are Conv and Gemm layers with a constant float weight used by that node only, in
   graph order. The first and the last of them stay float unless ``first_last`` (they hold few
   weights and much of the accuracy). ConvTranspose and MatMul are left alone. Every layer left
   alone is a ``skipped`` entry with its reason.
2. Per output channel c, symmetric: scale_c = max |W_c| / 7 (1 for an all-zero channel), zero
   point 0, q = clip(round(W / scale_c), -8, 7) (``nearest``). -8 is reachable only through
   GPTQ's error compensation.
3. ``gptq`` (needs data): GPTQ (``weight_rounding.gptq_rounder``) on the same grid, from the
   Gram matrix of each layer's input patches collected in one run over the calibration data
   (one :class:`StatisticsRequest` for all layers, on the float graph: int4 activations are
   not quantized, so every layer sees the float model's inputs). A layer keeps its nearest
   rounding unless GPTQ lowers its output error on those inputs.
4. The weight initializer keeps its name and becomes INT4; a ``DequantizeLinear`` (opset 21:
   INT4 input, per-axis scale on the output axis, INT4 zero point 0) feeds the layer.

ONNX Runtime (1.32, CPU) keeps each weight's ``DequantizeLinear`` in its optimized graph (it
does not constant-fold it) and runs a float ``FusedConv`` / ``Gemm`` after it; the NCHWc layout
transformer needs constant weights, so those convolutions also lose ORT's NCHWc kernels
(ResNet-20: 18 DequantizeLinear + 18 FusedConv, against 19 NCHWc Convs in fp32; 1.6x slower
at batch 100, one thread). A size feature: the weights are 8x smaller, inference is not
faster. ``.ort`` refuses INT4 (``deploy/ort_mobile.py``): it does not load there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.quantize.weight_rounding import (
    gptq_rounder,
    gram_observers,
    output_error,
)
from onnxcomp.core.graph import label
from onnxcomp.core.layers import WeightedLayer, weighted_layer
from onnxcomp.core.ops import float_layers_problem
from onnxcomp.errors import OptionError
from onnxcomp.stats.gram import ONE_BLAS_THREAD, GroupedPatchGram
from onnxcomp.stats.request import StatisticsRequest

INT4_RANGE = (-8, 7)
INT4_ROUNDINGS = ("nearest", "gptq")
INT4_OPS = ("Conv", "Gemm")
LEFT_ALONE = ("ConvTranspose", "MatMul")
DEQUANTIZED_SUFFIX = "_int4_dq"


@dataclass(frozen=True)
class Int4Config:
    """``rounding``: nearest or gptq (needs calibration data). ``first_last``: quantize the
    first and last Conv/Gemm layers too (kept float by default)."""

    rounding: str = "nearest"
    first_last: bool = False

    def __post_init__(self) -> None:
        if self.rounding not in INT4_ROUNDINGS:
            raise OptionError(
                f"--weight-rounding {self.rounding}: --int4-weights takes "
                f"{' or '.join(INT4_ROUNDINGS)}"
            )


def int4_channels(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rule 2 on rows (output channels x inputs): (nearest int4 values as float, scales)."""
    top = np.abs(rows).max(axis=1)
    scale = np.where(top > 0, top / INT4_RANGE[1], 1.0).astype(np.float32).astype(np.float64)
    q = np.clip(np.rint(rows / scale[:, None]), *INT4_RANGE)
    return q, scale


def layer_rows(layer: WeightedLayer) -> np.ndarray:
    """The weight as float64 rows: one per output channel, the layer's inputs as columns."""
    w = np.asarray(layer.weight_array(), np.float64)
    return np.moveaxis(w, layer.out_axis, 0).reshape(layer.out_channels, -1)


def select_layers(graph: ir.Graph, first_last: bool) -> tuple[list[WeightedLayer], list[Skipped]]:
    """Rule 1: the layers to quantize, and the reasons for the others."""
    skipped: list[Skipped] = []
    candidates: list[WeightedLayer] = []
    for node in graph:
        layer = weighted_layer(node)
        if node.op_type in LEFT_ALONE:
            skipped.append(Skipped(label(node), "only Conv and Gemm weights become int4"))
        elif node.op_type in INT4_OPS and layer is None:
            skipped.append(Skipped(label(node), "its weight is not a constant"))
        elif layer is not None and node.op_type in INT4_OPS:
            problem = layer.problem()
            if problem:
                skipped.append(Skipped(label(node), problem))
            elif not np.issubdtype(layer.weight_array().dtype, np.floating):
                skipped.append(Skipped(label(node), "its weight is not float"))
            else:
                candidates.append(layer)
    if first_last or not candidates:
        return candidates, skipped
    ends = {0: "first", len(candidates) - 1: "last"}
    for index, where in ends.items():
        skipped.append(
            Skipped(
                label(candidates[index].node),
                f"the {where} Conv/Gemm layer stays float (--int4-first-last quantizes it)",
            )
        )
    return candidates[1:-1], skipped


def layer_key(node: ir.Node) -> str:
    """The key of ``gram_observers``: the node's name, else its output's."""
    return node.name or str(node.outputs[0].name)


def _init(graph: ir.Graph, name: str, tensor: ir.Tensor) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def write_int4(graph: ir.Graph, layer: WeightedLayer, q: np.ndarray, scale: np.ndarray) -> None:
    """Rule 4: INT4 values in the weight's initializer, read through DequantizeLinear."""
    weight = layer.weight
    shape = list(layer.weight_shape)
    moved = [shape[layer.out_axis]] + [d for i, d in enumerate(shape) if i != layer.out_axis]
    values = np.moveaxis(q.reshape(moved), 0, layer.out_axis).astype(np.int8)
    name = str(weight.name)
    weight.const_value = ir.Tensor(values, dtype=ir.DataType.INT4, name=name)
    weight.type = ir.TensorType(ir.DataType.INT4)
    scales = _init(graph, f"{name}_int4_scale", ir.tensor(scale.astype(np.float32)))
    zeros = np.zeros(len(scale), np.int8)
    zero = _init(graph, f"{name}_int4_zero", ir.Tensor(zeros, dtype=ir.DataType.INT4))
    dq = ir.node(
        "DequantizeLinear",
        [weight, scales, zero],
        {"axis": layer.out_axis},
        name=f"{label(layer.node)}_weight_int4_dq",
        num_outputs=1,
    )
    dq.outputs[0].name = name + DEQUANTIZED_SUFFIX
    graph.insert_before(layer.node, dq)
    layer.node.replace_input_with(1, dq.outputs[0])


def round_layer(
    rows: np.ndarray, gram: GroupedPatchGram | None
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Rules 2 and 3: (int4 values, scales, a note when GPTQ was kept)."""
    q, scale = int4_channels(rows)
    if gram is None or gram.gram is None:
        return q, scale, None
    with threadpool_limits(**ONE_BLAS_THREAD):
        new = gptq_rounder(rows, scale, gram.gram, *INT4_RANGE)
        before = output_error(rows, q, scale, gram)
        after = output_error(rows, new, scale, gram)
    if after >= before:
        return q, scale, None
    return new, scale, f"GPTQ output error {before:.3g} -> {after:.3g}"


class Int4WeightsPass(CompressionPass):
    """``--int4-weights``: Conv/Gemm weights as INT4 per channel (see the module docstring)."""

    name = "int4-weights"
    lossless = False
    min_opset = 21  # DequantizeLinear with INT4 input

    def __init__(self, config: Int4Config, context: PassContext | None = None) -> None:
        super().__init__(context)
        self.config = config

    def requires_data(self) -> str | None:
        return "--int4-weights --weight-rounding gptq" if self.config.rounding == "gptq" else None

    def check(self, model: ir.Model) -> None:
        problem = float_layers_problem(
            model,
            "--int4-weights",
            "quantize to int4 before",
            INT4_OPS,
            "--int4-weights: the model has no Conv or Gemm layer; drop --int4-weights",
        )
        if problem:
            raise OptionError(problem)

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        layers, skipped = select_layers(model.graph, self.config.first_last)
        record.skipped += skipped
        if not layers:
            record.summary = "no layer quantized to int4"
            return
        grams = self._grams(model, layers) if self.config.rounding == "gptq" else {}
        improved = 0
        for layer in layers:
            rows = layer_rows(layer)
            q, scale, note = round_layer(rows, grams.get(layer_key(layer.node)))
            improved += note is not None
            write_int4(model.graph, layer, q, scale)
            record.changes.append(
                f"{label(layer.node)}: {rows.size} weights int4" + (f" ({note})" if note else "")
            )
        rounding = f", GPTQ kept in {improved} layer(s)" if self.config.rounding == "gptq" else ""
        record.summary = (
            f"{len(layers)} Conv/Gemm weight(s) int4 per channel behind DequantizeLinear "
            f"(float activations{rounding}); {len(skipped)} left alone"
        )
        record.modified = True

    def _grams(self, model: ir.Model, layers: list[WeightedLayer]) -> dict[str, GroupedPatchGram]:
        """Rule 3: one data pass for every chosen layer's input Gram matrix."""
        chosen = {layer_key(layer.node) for layer in layers}
        observers = {
            tensor: kept
            for tensor, grams in gram_observers(ir.to_proto(model)).items()
            if (kept := [g for g in grams if g.layer in chosen])
        }
        self.context.collect(model, StatisticsRequest.observing(observers), "int4: GPTQ inputs")
        return {g.layer: g for grams in observers.values() for g in grams}
