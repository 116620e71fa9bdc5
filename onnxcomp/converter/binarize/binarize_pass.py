"""Binarization: BinaryConnect / BWN weights (Courbariaux et al. 2015, Rastegari et al. 2016),
and XNOR-Net style binary activations, written as QDQ so that ONNX Runtime runs it in int8.

Rules:

1. Candidates are Conv and Gemm layers with a constant weight, in graph order. The first and
   the last of them stay float unless ``first_last`` (binary networks keep them float: they
   hold few weights and most of the accuracy); names matching ``exclude`` stay float;
   depthwise Convs stay float (a sign filter of k x k values per channel keeps too little, and
   BWN results exist for dense convolutions only); grouped (not depthwise) Convs are binarized
   (alpha is per output channel, so groups change nothing). ConvTranspose and MatMul are left
   alone. Every layer left alone is a ``skipped`` entry with its reason.
2. Weights: alpha_c = mean |W_c| over each output channel (the L2-optimal scale of sign(W_c)),
   signs stored as int8 {-1, +1} (sign(0) = +1) in the weight's own initializer (same name),
   read through DequantizeLinear(scale alpha, zero point 0, axis = the output axis).
3. Activations, with calibration data: the layer's input goes through QuantizeLinear ->
   DequantizeLinear (uint8, min/max range) and its output too (unless it is a graph output);
   the bias becomes int32 with scale input scale x alpha. ONNX Runtime then fuses DQ -> Conv
   -> Q into QLinearConv (Gemm: QGemm). Without data, activations stay float.
4. ``full`` (needs data): the input is binarized too: Sign(x) -> Q(scale 1, zero point 128)
   -> DQ, an exact {-1, 0, +1} in uint8; the input scale beta = sum |x| / count(x != 0) (the
   L2-optimal scale of sign(x); mean |x| when no zeros, after a ReLU the mean of the positive
   values) is folded into the weight scale (conv(beta s, alpha w) = conv(s, alpha beta w)).
5. The model is marked in its metadata (``onnxcomp.binarized``: mode and weight names) for
   the training importer and the packer.
"""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import onnx_ir as ir

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.binarize.config import BINARIZED_MARK, BinarizeConfig
from onnxcomp.core.graph import constant, label
from onnxcomp.core.layers import WeightedLayer, is_depthwise, weighted_layer
from onnxcomp.core.ops import float_layers_problem
from onnxcomp.errors import OptionError
from onnxcomp.stats.request import StatisticsRequest

BINARIZED_OPS_TYPES = ("Conv", "Gemm")
LEFT_ALONE = ("ConvTranspose", "MatMul")
MIN_ALPHA = 1e-12
SIGN_ZERO_POINT = 128  # uint8 zero point of the {-1, 0, +1} activations


class AbsSum:
    """Observer: sum |x| and the count of non-zero values of one tensor."""

    def __init__(self) -> None:
        self.total = 0.0
        self.nonzero = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.total += float(np.abs(values).sum())
        self.nonzero += int(np.count_nonzero(values))

    @property
    def scale(self) -> float:
        """beta = sum |x| / count(x != 0) (1 when every value was zero)."""
        return self.total / self.nonzero if self.nonzero else 1.0


def layer_name(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


def select_layers(
    graph: ir.Graph, config: BinarizeConfig
) -> tuple[list[WeightedLayer], list[Skipped]]:
    """Rule 1: the layers to binarize, and the reasons for the others."""
    skipped: list[Skipped] = []
    candidates: list[WeightedLayer] = []
    for node in graph:
        if node.op_type in LEFT_ALONE:
            skipped.append(Skipped(layer_name(node), "only Conv and Gemm layers are binarized"))
            continue
        layer = weighted_layer(node) if node.op_type in BINARIZED_OPS_TYPES else None
        if node.op_type in BINARIZED_OPS_TYPES and layer is None:
            skipped.append(
                Skipped(layer_name(node), f"the weight of {label(node)} is not a constant")
            )
        elif layer is not None:
            candidates.append(layer)
    chosen: list[WeightedLayer] = []
    for index, layer in enumerate(candidates):
        name = layer_name(layer.node)
        reason = _reason_to_skip(layer, index, len(candidates), config)
        if reason:
            skipped.append(Skipped(name, reason))
        else:
            chosen.append(layer)
    return chosen, skipped


def _reason_to_skip(
    layer: WeightedLayer, index: int, count: int, config: BinarizeConfig
) -> str | None:
    name = layer_name(layer.node)
    if not config.first_last and index in (0, count - 1):
        where = "first" if index == 0 else "last"
        return f"the {where} weighted layer stays float (--binarize-first-last binarizes it)"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude):
        return "excluded by --binarize-exclude"
    problem = layer.problem()
    if problem:
        return problem
    if is_depthwise(layer):
        return (
            f"depthwise Conv (group {layer.group}, one input channel per filter): a sign filter "
            f"of {int(np.prod(layer.weight_shape[2:]))} values keeps too little; kept float"
        )
    if not np.issubdtype(layer.weight_array().dtype, np.floating):
        return "its weight is not float"
    return None


def binary_weight(weight: np.ndarray, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Rule 2: (signs as int8 {-1, +1}, alpha per output channel as float32)."""
    w = np.asarray(weight, dtype=np.float64)
    axes = tuple(i for i in range(w.ndim) if i != out_axis)
    alpha = np.maximum(np.abs(w).mean(axis=axes), MIN_ALPHA)
    signs = np.where(w >= 0, 1, -1).astype(np.int8)
    return signs, alpha.astype(np.float32)


def uint8_qparams(low: float, high: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) of a range widened to hold 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    zero = int(np.clip(round(-low / scale), 0, 255))
    return float(scale), zero


def _init(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


class BinarizePass(CompressionPass):
    """``--binarize weights|full`` (see the module docstring for the rules)."""

    name = "binarize"
    lossless = False
    min_opset = 13  # per-channel DequantizeLinear

    def __init__(self, config: BinarizeConfig, context: PassContext | None = None) -> None:
        super().__init__(context)
        self.config = config

    def requires_data(self) -> str | None:
        return "--binarize full" if self.config.mode == "full" else None

    def check(self, model: ir.Model) -> None:
        mark = model.metadata_props.get(BINARIZED_MARK)
        if mark:
            raise OptionError(
                f"binarization: the model is already binarized ({BINARIZED_MARK} in its "
                "metadata): binarize its float original"
            )
        problem = float_layers_problem(
            model,
            "binarization",
            "binarize before",
            BINARIZED_OPS_TYPES,
            "binarization: the model has no Conv or Gemm layer to binarize; drop --binarize",
        )
        if problem:
            raise OptionError(problem)

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        graph = model.graph
        layers, skipped = select_layers(graph, self.config)
        record.skipped += skipped
        if not layers:
            record.summary = "no layer binarized"
            return
        weights = [layer.weight.name for layer in layers]
        stats = self._collect(model, layers) if self.context.calibration is not None else None
        editor = _Editor(graph, stats, self.config.mode == "full")
        for layer in layers:
            record.changes.append(editor.binarize(layer))
        model.metadata_props[BINARIZED_MARK] = json.dumps(
            {"mode": self.config.mode, "weights": weights}
        )
        acts = {
            "full": "binary activations (Sign, QDQ uint8)",
            "weights": "uint8 QDQ activations" if stats else "float activations",
        }[self.config.mode]
        record.summary = (
            f"binarized {len(layers)} layer(s) ({self.config.mode}: sign weights x per-channel "
            f"alpha, {acts}); {len(skipped)} left float"
        )
        record.modified = True

    def _collect(self, model: ir.Model, layers: list[WeightedLayer]):
        names = [v.name for layer in layers for v in (layer.node.inputs[0], layer.node.outputs[0])]
        request = StatisticsRequest(histograms=tuple(dict.fromkeys(names)))
        if self.config.mode == "full":
            request = request | StatisticsRequest.observing(
                {layer.node.inputs[0].name: [AbsSum()] for layer in layers}
            )
        observers = request.observers
        collected = self.context.collect(model, request, "binarize: activation ranges")
        return collected.statistics, observers


class _Editor:
    """Rewrites the chosen layers of one graph (rules 2 to 4)."""

    def __init__(self, graph: ir.Graph, stats, full: bool) -> None:
        self.graph = graph
        self.histograms = stats[0].histograms if stats else None
        self.observers = stats[1] if stats else {}
        self.full = full
        self.inputs: dict[str, tuple[ir.Value, float]] = {}  # input name -> (DQ output, scale)
        self.alias: dict[str, str] = {}  # an inserted DQ output -> the tensor it stands for

    def binarize(self, layer: WeightedLayer) -> str:
        node, weight = layer.node, layer.weight
        signs, alpha = binary_weight(layer.weight_array(), layer.out_axis)
        source = self.alias.get(node.inputs[0].name, node.inputs[0].name)
        in_scale = 1.0
        if self.histograms is not None:
            x, in_scale = self._input(node)
            node.replace_input_with(0, x)
        beta = self.observers[source][0].scale if self.full else 1.0
        w_scale = (alpha * np.float32(beta)).astype(np.float32)
        weight.const_value = ir.tensor(signs, name=weight.name)
        weight.type = ir.TensorType(ir.DataType.INT8)
        scale = _init(self.graph, f"{weight.name}_alpha", w_scale)
        zero = _init(self.graph, f"{weight.name}_zero", np.zeros(alpha.shape, np.int8))
        dq = ir.node(
            "DequantizeLinear",
            [weight, scale, zero],
            {"axis": layer.out_axis},
            name=f"{layer_name(node)}_weight_dq",
            num_outputs=1,
        )
        dq.outputs[0].name = f"{weight.name}_binarized"
        self.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if self.histograms is not None:
            self._int32_bias(layer, w_scale * np.float32(in_scale))
            self._output(node)
        return (
            f"{label(node)}: {alpha.size} channels, alpha {alpha.min():.3g}..{alpha.max():.3g}"
            + (f", beta {beta:.3g}" if self.full else "")
        )

    def _input(self, node: ir.Node) -> tuple[ir.Value, float]:
        x = node.inputs[0]
        if x.name in self.inputs:
            return self.inputs[x.name]
        if self.full:
            sign = ir.node("Sign", [x], name=f"{x.name}_sign", num_outputs=1)
            sign.outputs[0].name = f"{x.name}_sign"
            self.graph.insert_before(node, sign)
            source, scale, zero = sign.outputs[0], 1.0, SIGN_ZERO_POINT
        else:
            hist = self.histograms[self.alias.get(x.name, x.name)]
            scale, zero = uint8_qparams(hist.min, hist.max)
            source = x
        found = (self._qdq(source, scale, zero, node, before=True), scale)
        self.inputs[x.name] = found
        return found

    def _qdq(self, x: ir.Value, scale: float, zero: int, node: ir.Node, before: bool) -> ir.Value:
        s = _init(self.graph, f"{x.name}_scale", np.array(scale, np.float32))
        z = _init(self.graph, f"{x.name}_zero_point", np.array(zero, np.uint8))
        q = ir.node("QuantizeLinear", [x, s, z], name=f"{x.name}_q", num_outputs=1)
        q.outputs[0].name = f"{x.name}_quantized"
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{x.name}_dq", num_outputs=1)
        dq.outputs[0].name = f"{x.name}_dequantized"
        if before:
            self.graph.insert_before(node, [q, dq])
        else:
            self.graph.insert_after(node, [q, dq])
        return dq.outputs[0]

    def _int32_bias(self, layer: WeightedLayer, scale: np.ndarray) -> None:
        bias = layer.bias
        values = constant(bias)
        if bias is None or values is None:
            return
        q = np.round(values.astype(np.float64) / scale.astype(np.float64))
        info = np.iinfo(np.int32)
        bias.const_value = ir.tensor(
            np.clip(q, info.min, info.max).astype(np.int32), name=bias.name
        )
        bias.type = ir.TensorType(ir.DataType.INT32)
        s = _init(self.graph, f"{bias.name}_scale", scale.astype(np.float32))
        dq = ir.node(
            "DequantizeLinear", [bias, s], {"axis": 0}, name=f"{bias.name}_dq", num_outputs=1
        )
        dq.outputs[0].name = f"{bias.name}_dequantized"
        self.graph.insert_before(layer.node, dq)
        layer.node.replace_input_with(2, dq.outputs[0])

    def _output(self, node: ir.Node) -> None:
        y = node.outputs[0]
        if y.is_graph_output():
            return
        readers = list(y.uses())
        hist = self.histograms[y.name]
        scale, zero = uint8_qparams(hist.min, hist.max)
        out = self._qdq(y, scale, zero, node, before=False)
        for reader, index in readers:
            reader.replace_input_with(index, out)
        self.alias[out.name] = y.name
        if not self.full:  # a binarized layer reading this output reuses its Q/DQ
            self.inputs[out.name] = (out, scale)
