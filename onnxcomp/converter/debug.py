"""Where an int8 model loses accuracy: per-layer SQNR of weights and activations.

The float model is first put through the lossless passes (cleanup, BatchNorm folding) so that
its graph is the one the int8 pass quantized; the raw float model is kept instead when its
names match the QDQ model better (an int8 model built without those passes).

Matching the two graphs (ONNX Runtime's QDQ quantizer keeps node names and float tensor names):

1. A float tensor ``T`` the QDQ model quantizes feeds ``QuantizeLinear`` -> ``DequantizeLinear``;
   the DequantizeLinear output (``T_DequantizeLinear_Output``) is what the int8 model passes on,
   and is compared with ``T`` in the float model. A ``*_DequantizeLinear_Output`` whose
   QuantizeLinear was folded away (a Pad run on the quantized tensor) is matched by its name.
2. A tensor left in float (logits, excluded nodes) is compared under its own name.
3. ORT drops a Relu/Clip after a quantized op (the uint8 clamp does its work) and gives the op
   the Relu's output name: a float op whose output is missing in the QDQ model takes its single
   Relu/Clip consumer's output as its activation, and that Relu/Clip is not listed on its own.
4. Weights: the node with the same name and op type in the QDQ model, its weight input
   dequantized in numpy; else the weight's initializer name (``W_quantized`` /
   ``W_DequantizeLinear_Output``, or ``W`` itself when it stayed float).

Activations are measured on the QDQ model run as written (ORT optimizations off: exposing
intermediate tensors would stop ORT's int8 fusions anyway); top-1 agreement and accuracy come
from the int8 model as deployed (the session's optimization level).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from rich.console import Console
from rich.table import Table

from onnxcomp.backends.base import Backend, SessionConfig, run_by_name
from onnxcomp.backends.ort import ORT
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.quantize.qdq import FUSED_ACTIVATIONS
from onnxcomp.converter.verify import measure_fidelity
from onnxcomp.core.inputs import fixed_batch, input_specs
from onnxcomp.core.io import load_model
from onnxcomp.core.layers import LAYER_KINDS
from onnxcomp.core.proto import (
    constant_tensors,
    consumers_of,
    dequantize,
    node_key,
    producers_of,
    with_outputs,
)
from onnxcomp.data.batches import DataOptions, batch_note, sample_batches
from onnxcomp.errors import OnnxcompError
from onnxcomp.report import pct, render_accuracy

# Where each weighted layer (core.layers' registry) may hold its weight: input 1, or for
# MatMul either side.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {op: (1,) for op in LAYER_KINDS} | {"MatMul": (1, 0)}
NOT_LAYERS = frozenset({"Constant", "QuantizeLinear", "DequantizeLinear", "Shape", "Size"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})
DQ_SUFFIX = "_DequantizeLinear_Output"


@dataclass
class LayerSqnr:
    """SQNR (dB) of one layer's weight and output activation; ``inf`` when identical."""

    node: str
    op_type: str
    weight_sqnr_db: float | None
    activation_sqnr_db: float | None
    tensor: str | None


@dataclass
class DebugReport:
    """Per-layer SQNR, worst activation first, and how the outputs agree."""

    layers: list[LayerSqnr]
    samples: int
    source: str
    top1_agreement: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for layer in data["layers"]:
            for key in ("weight_sqnr_db", "activation_sqnr_db"):
                value = layer[key]
                if value is not None and not math.isfinite(value):
                    layer[key] = "inf" if value > 0 else "-inf"
        return data


# --- matching the two graphs ----------------------------------------------------------------


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise); ``inf`` without noise, ``-inf`` for noise on a zero signal."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def quantized_views(model: onnx.ModelProto) -> dict[str, str]:
    """Float tensor -> the DequantizeLinear output that carries its quantized value."""
    users = consumers_of(model)
    constants = constant_tensors(model)
    views: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        dqs = [u for u in users.get(node.output[0], []) if u.op_type == "DequantizeLinear"]
        if dqs and node.input[0] not in views:
            views[node.input[0]] = dqs[0].output[0]
    for node in model.graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type == "DequantizeLinear" and out.endswith(DQ_SUFFIX):
            views.setdefault(out[: -len(DQ_SUFFIX)], out)
    return views


def tensor_map(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, str]:
    """Float-model tensor -> the QDQ-model tensor holding the value the int8 model uses."""
    views = quantized_views(quantized)
    produced = set(producers_of(quantized))
    constants = constant_tensors(reference)
    mapping: dict[str, str] = {}
    names = [i.name for i in reference.graph.input] + [
        out for node in reference.graph.node for out in node.output if out
    ]
    for name in names:
        if name in constants:
            continue
        if name in views:
            mapping[name] = views[name]
        elif name in produced:
            mapping[name] = name
    return mapping


def _float_weight(
    node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]
) -> tuple[int, str] | None:
    for index in WEIGHT_INPUTS.get(node.op_type, ()):
        if index < len(node.input) and node.input[index] in constants:
            return index, node.input[index]
    return None


def _quantized_weight(
    name: str,
    producers: dict[str, onnx.NodeProto],
    constants: dict[str, onnx.TensorProto],
) -> np.ndarray | None:
    """The value of tensor ``name`` of the QDQ model: a float constant or a constant DQ."""
    if name in constants:
        return numpy_helper.to_array(constants[name]).astype(np.float64)
    source = producers.get(name)
    if source is not None and source.op_type == "DequantizeLinear":
        return dequantize(source, constants)
    return None


def weight_sqnrs(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, float]:
    """Node key -> SQNR (dB) of its weight in the QDQ model against the float model."""
    ref_constants = constant_tensors(reference)
    q_constants = constant_tensors(quantized)
    q_producers = producers_of(quantized)
    q_nodes = {(n.name, n.op_type): n for n in quantized.graph.node if n.name}
    dq_by_weight: dict[str, str] = {}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized"):
            dq_by_weight[node.input[0][: -len("_quantized")]] = node.output[0]
    result: dict[str, float] = {}
    for node in reference.graph.node:
        found = _float_weight(node, ref_constants)
        if found is None:
            continue
        index, weight = found
        value = None
        twin = q_nodes.get((node.name, node.op_type)) if node.name else None
        if twin is not None and index < len(twin.input):
            value = _quantized_weight(twin.input[index], q_producers, q_constants)
        if value is None:
            for candidate in (weight + DQ_SUFFIX, dq_by_weight.get(weight), weight):
                if candidate:
                    value = _quantized_weight(candidate, q_producers, q_constants)
                if value is not None:
                    break
        float_value = numpy_helper.to_array(ref_constants[weight]).astype(np.float64)
        if value is None or value.shape != float_value.shape:
            continue
        noise = float(np.sum((value - float_value) ** 2))
        result[node_key(node)] = sqnr_db(float(np.sum(float_value**2)), noise)
    return result


def _non_float_tensors(model: onnx.ModelProto) -> set[str] | None:
    """Names with a known non-float type are left out; None when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {
        v.name
        for v in values
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in FLOAT_TYPES
    }


@dataclass(frozen=True)
class LayerPlan:
    """A layer of the float model: its node, op type and the tensor to compare (if any)."""

    node: str
    op_type: str
    tensor: str | None


def plan_layers(reference: onnx.ModelProto, mapping: dict[str, str]) -> list[LayerPlan]:
    """The layers to report, in graph order, with the tensor each one is compared on."""
    users = consumers_of(reference)
    outputs = {o.name for o in reference.graph.output}
    not_float = _non_float_tensors(reference) or set()
    constants = constant_tensors(reference)
    absorbed: set[int] = set()
    plans: list[LayerPlan] = []
    for node in reference.graph.node:
        if id(node) in absorbed or node.op_type in NOT_LAYERS or not node.output:
            continue
        tensor = node.output[0]
        while tensor not in mapping and tensor not in outputs:
            following = users.get(tensor, [])
            if len(following) != 1 or following[0].op_type not in FUSED_ACTIVATIONS:
                break
            absorbed.add(id(following[0]))
            tensor = following[0].output[0]
        matched = tensor in mapping and tensor not in not_float
        if matched or _float_weight(node, constants) is not None:
            plans.append(LayerPlan(node_key(node), node.op_type, tensor if matched else None))
    return plans


class PowerSums:
    """Streaming sums of signal and noise power for pairs of tensors."""

    def __init__(self) -> None:
        self.signal: dict[str, float] = defaultdict(float)
        self.noise: dict[str, float] = defaultdict(float)
        self.mismatched: set[str] = set()

    def add(self, key: str, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape or not np.issubdtype(reference.dtype, np.floating):
            self.mismatched.add(key)
            return
        # float32 BLAS dot products (per batch), summed in float64: fast and precise enough
        r = reference.astype(np.float32, copy=False).reshape(-1)
        diff = candidate.astype(np.float32, copy=False).reshape(-1) - r
        self.signal[key] += float(np.dot(r, r))
        self.noise[key] += float(np.dot(diff, diff))

    def sqnr(self, key: str) -> float | None:
        if key in self.mismatched or key not in self.signal:
            return None
        return sqnr_db(self.signal[key], self.noise[key])


# --- the debug run ---------------------------------------------------------------------------


def _prepared(path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The float model as loaded, and after the lossless passes (cleanup, fold BatchNorm)."""
    model = load_model(path, check=False)
    raw = ir.to_proto(model)
    folded = Pipeline.from_options(PipelineOptions()).run(model).model
    return raw, ir.to_proto(folded)


def _match_score(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> int:
    return len(weight_sqnrs(reference, quantized)) + len(tensor_map(reference, quantized))


def _load_candidate(path: Path) -> onnx.ModelProto:
    return ir.to_proto(load_model(path, check=False))


def _layer_results(
    plans: list[LayerPlan], weights: dict[str, float], sums: PowerSums
) -> list[LayerSqnr]:
    layers = [
        LayerSqnr(
            node=plan.node,
            op_type=plan.op_type,
            weight_sqnr_db=weights.get(plan.node),
            activation_sqnr_db=sums.sqnr(plan.tensor) if plan.tensor else None,
            tensor=plan.tensor,
        )
        for plan in plans
    ]
    return sorted(layers, key=_worst_first)


def _worst_first(layer: LayerSqnr) -> tuple[float, float]:
    act = layer.activation_sqnr_db
    weight = layer.weight_sqnr_db
    return (math.inf if act is None else act, math.inf if weight is None else weight)


def debug_models(
    fp32: Path,
    int8: Path,
    data: DataOptions,
    session: SessionConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
    backend: Backend = ORT,
) -> DebugReport:
    """Per-layer weight and activation SQNR of ``int8`` against ``fp32``, on ``data``."""
    config = session or SessionConfig()
    quantized = _load_candidate(Path(int8))
    raw, folded = _prepared(Path(fp32))
    reference = max((folded, raw), key=lambda m: _match_score(m, quantized))
    mapping = tensor_map(reference, quantized)
    plans = plan_layers(reference, mapping)
    weights = weight_sqnrs(reference, quantized)
    tensors = [p.tensor for p in plans if p.tensor]
    if not plans:
        raise OnnxcompError(
            f"{int8}: no layer matches {fp32} by node or tensor name; give the float model the "
            "int8 model was made from"
        )
    outputs = [o.name for o in reference.graph.output]
    if len(outputs) != len(quantized.graph.output):
        raise OnnxcompError(
            f"{int8}: has {len(quantized.graph.output)} outputs, {fp32} has {len(outputs)}"
        )
    off = replace(config, optimization_level="disable")
    ref_session = backend.create_session(with_outputs(reference, tensors), off)
    probe = with_outputs(quantized, [mapping[t] for t in tensors])
    probe_session = backend.create_session(probe, off)
    deployed = backend.create_session(quantized, config)
    sums = PowerSums()
    stash: dict[str, np.ndarray] = {}

    def run_reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = run_by_name(ref_session, feeds)
        stash.clear()
        stash.update(values)
        return [values[name] for name in outputs]

    def run_candidate(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        probes = run_by_name(probe_session, feeds)
        for name in tensors:
            sums.add(name, stash[name], probes[mapping[name]])
        values = run_by_name(deployed, feeds)
        return list(values.values())[: len(outputs)]

    specs = input_specs(reference)
    batches, source, _ = sample_batches(specs, data)
    fidelity = measure_fidelity(run_reference, run_candidate, outputs, batches, source, on_batch)
    notes = [note] if (note := batch_note(fixed_batch(specs))) else []
    if not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node):
        notes.append(f"{int8} has no QuantizeLinear nodes: it was compared as a float model")
    if reference is raw and folded is not raw:
        notes.append("the float model was compared as given (it matches better unfolded)")
    if sums.mismatched:
        notes.append(f"{len(sums.mismatched)} tensor(s) differ in shape or type: not compared")
    return DebugReport(
        layers=_layer_results(plans, weights, sums),
        samples=fidelity.samples,
        source=fidelity.source,
        top1_agreement=fidelity.top1_agreement,
        reference_accuracy=fidelity.reference_accuracy,
        candidate_accuracy=fidelity.candidate_accuracy,
        notes=notes,
    )


# --- rendering -------------------------------------------------------------------------------


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"


def render_debug(report: DebugReport, console: Console, top: int = 25) -> None:
    """The worst ``top`` layers by activation SQNR, then agreement and accuracy."""
    table = Table(
        title=f"Per-layer SQNR on {report.source} ({report.samples} samples), worst first",
        caption="SQNR = 10·log10(signal / quantization noise) in dB; higher is better",
        title_justify="left",
    )
    for column in ("#", "layer", "op", "weight dB", "activation dB"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    for rank, layer in enumerate(report.layers[:top], start=1):
        table.add_row(
            str(rank),
            layer.node,
            layer.op_type,
            _db(layer.weight_sqnr_db),
            _db(layer.activation_sqnr_db),
        )
    console.print(table)
    hidden = len(report.layers) - top
    if hidden > 0:
        console.print(f"... and {hidden} more layer(s) (see --json)")
    if report.top1_agreement is not None:
        console.print(f"top-1 agreement: {pct(report.top1_agreement)}")
    render_accuracy(console, report.reference_accuracy, report.candidate_accuracy, ("fp32", "int8"))
    for note in report.notes:
        console.print(f"note: {note}")
