"""Accuracy-aware mixed precision: keep the few most sensitive layers in float.

Rules:

1. The fully quantized model is evaluated on the held-out slice (ONNX Runtime, all
   optimizations). Metric: accuracy when the data has labels, else top-1 agreement with the
   float model, in points. When its drop is within ``max_drop``, nothing is excluded.
2. Sensitivity is measured once, without re-running the int8 model per layer: one streamed
   run of the float model gives, for every tensor the QDQ model quantizes, the noise its own
   QuantizeLinear/DequantizeLinear adds (noise power / signal power, from the QDQ model's
   scale and zero point); each weight's noise comes from its dequantized value.
3. A unit is what must run in float to remove one source of noise: for a tensor, the node
   producing it and the nodes reading it (ORT quantizes a tensor when any of them is
   quantized); for a weight, its node. Units are ranked noisiest first.
4. A binary search over the number of top-ranked units kept in float (QDQ re-placed with the
   same calibration ranges, no new calibration) finds the fewest that meet ``max_drop``:
   about 2 + log2(units) evaluations.
5. When keeping all allowed units in float (``max_excluded`` nodes at most) still misses
   ``max_drop``, the result says so (``met=False``) with the best model evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.backends.base import Backend, Session, SessionConfig, run_by_name
from onnxcomp.backends.ort import ORT
from onnxcomp.converter.quantize.calibrators import TensorRange
from onnxcomp.converter.quantize.qdq import (
    QUANTIZABLE_OPS,
    QdqSettings,
    fuse_pad_islands,
    place_qdq,
)
from onnxcomp.core.inputs import input_specs
from onnxcomp.core.layers import LAYER_KINDS
from onnxcomp.core.proto import (
    attr,
    constant_tensors,
    consumers_of,
    dequantize,
    producers_of,
    with_outputs,
)
from onnxcomp.data.batches import DataOptions, Feeds, sample_batches
from onnxcomp.errors import OnnxcompError

CACHE_BYTES = 512 * 2**20  # evaluation batches kept in memory up to this size
EPSILON = 1e-9  # points: 80.3 - 80.1 is 0.2000000000000028


@dataclass
class MixedPrecisionResult:
    """Layers kept in float, the metric drop before and after, and each step's metric."""

    excluded: list[str]
    drop_before: float
    drop_after: float
    history: list[tuple[int, float]]  # (nodes kept in float, metric in points)
    model: onnx.ModelProto
    met: bool
    metric: str = "accuracy"  # or "top-1 agreement"
    reference: float = 100.0  # the float model's metric, in points
    evaluations: int = 0


@dataclass(frozen=True)
class Unit:
    """Nodes that must run in float together to remove one source of quantization noise."""

    nodes: tuple[str, ...]
    noise: float  # noise power / signal power
    source: str  # the tensor or weight


# --- evaluation ------------------------------------------------------------------------------


class EvalData:
    """The evaluation batches: kept in memory after the first pass when small enough."""

    def __init__(self, model: onnx.ModelProto, data: DataOptions) -> None:
        self.specs = input_specs(model)
        self.data = data
        self.cache: list[tuple[Feeds, np.ndarray | None]] | None = None
        self.source = ""

    def __iter__(self) -> Iterator[tuple[Feeds, np.ndarray | None]]:
        if self.cache is not None:
            yield from self.cache
            return
        batches, self.source, _ = sample_batches(self.specs, self.data)
        kept: list[tuple[Feeds, np.ndarray | None]] | None = []
        size = 0
        for feeds, labels in batches:
            if kept is not None:
                size += sum(a.nbytes for a in feeds.values())
                if size <= CACHE_BYTES:
                    kept.append((feeds, labels))
                else:
                    kept = None
            yield feeds, labels
        if kept:
            self.cache = kept


class Evaluator:
    """Scores a model on the evaluation data against the float model's predictions."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        data: EvalData,
        session: SessionConfig,
        backend: Backend = ORT,
    ) -> None:
        self.data = data
        self.session = session
        self.backend = backend
        self.predictions: list[np.ndarray] = []
        self.labels: list[np.ndarray | None] = []
        float_session = backend.create_session(reference, session)
        for feeds, labels in data:
            self.predictions.append(self._top1(float_session, feeds))
            self.labels.append(labels)
        if not self.predictions:
            raise OnnxcompError("--max-drop: the evaluation data has no samples")
        self.has_labels = all(label is not None for label in self.labels)
        self.metric = "accuracy" if self.has_labels else "top-1 agreement"
        self.reference = self._points(self.predictions)
        self.count = 0

    @staticmethod
    def _top1(session: Session, feeds: Feeds) -> np.ndarray:
        logits = np.asarray(session.run({k: feeds[k] for k in session.input_names})[0])
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise OnnxcompError(
                f"--max-drop needs a classifier (first output [batch, classes]); the first "
                f"output has shape {logits.shape}"
            )
        return logits.argmax(1)

    def _points(self, predictions: list[np.ndarray]) -> float:
        truth = self.labels if self.has_labels else self.predictions
        hits = sum(int((p == t).sum()) for p, t in zip(predictions, truth, strict=True))
        total = sum(len(t) for t in truth)
        return 100.0 * hits / total

    def score(self, model: onnx.ModelProto) -> float:
        """The model's metric in points (accuracy, or agreement with the float model)."""
        session = self.backend.create_session(model, self.session)
        predictions = [self._top1(session, feeds) for feeds, _ in self.data]
        self.count += 1
        return self._points(predictions)


# --- sensitivity -----------------------------------------------------------------------------


def quantize_excluding(
    model: onnx.ModelProto,
    ranges: dict[str, TensorRange],
    settings: QdqSettings,
    exclude: list[str] | tuple[str, ...] = (),
) -> onnx.ModelProto:
    """QDQ placement with the given nodes kept in float (no new calibration)."""
    proto = place_qdq(model, ranges, settings, exclude)
    fuse_pad_islands(proto)
    return proto


def _fake_quant(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    info = np.iinfo(zero.dtype)
    if scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    zero32 = zero.astype(np.float32)
    q = np.clip(np.rint(x / scale) + zero32, info.min, info.max)
    return (q - zero32) * scale


@dataclass
class _TensorQuantizer:
    scale: np.ndarray
    zero: np.ndarray
    axis: int
    signal: float = 0.0
    noise: float = 0.0


def _activation_quantizers(
    model: onnx.ModelProto, quantized: onnx.ModelProto
) -> dict[str, _TensorQuantizer]:
    """Float-model tensor -> the scale and zero point the QDQ model quantizes it with."""
    constants = constant_tensors(quantized)
    float_names = {i.name for i in model.graph.input} | set(producers_of(model))
    found: dict[str, _TensorQuantizer] = {}
    for node in quantized.graph.node:
        name = node.input[0] if node.input else ""
        if node.op_type != "QuantizeLinear" or name not in float_names or name in found:
            continue
        if len(node.input) < 3 or any(n not in constants for n in node.input[1:3]):
            continue
        scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(constants[node.input[2]])
        axis = attr(node, "axis", 1)
        found[name] = _TensorQuantizer(scale, zero, axis)
    return found


def activation_noise(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    data: EvalData,
    session: SessionConfig,
    backend: Backend = ORT,
) -> dict[str, float]:
    """Noise/signal power each quantized tensor's own QDQ adds, on the float model's values."""
    quantizers = _activation_quantizers(model, quantized)
    if not quantizers:
        return {}
    probe = backend.create_session(with_outputs(model, list(quantizers)), session)
    for feeds, _ in data:
        values = run_by_name(probe, feeds)
        for name, quantizer in quantizers.items():
            x = np.asarray(values[name], dtype=np.float32)
            diff = (_fake_quant(x, quantizer.scale, quantizer.zero, quantizer.axis) - x).ravel()
            quantizer.signal += float(np.dot(x.ravel(), x.ravel()))
            quantizer.noise += float(np.dot(diff, diff))
    return {name: _ratio(q.signal, q.noise) for name, q in quantizers.items()}


def _ratio(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return 0.0
    return noise / signal if signal > 0.0 else math.inf


def weight_noise(model: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, float]:
    """Node name -> noise/signal power of its dequantized weights."""
    float_constants = constant_tensors(model)
    constants = constant_tensors(quantized)
    producers = producers_of(quantized)
    found: dict[str, float] = {}
    names = {n.name for n in model.graph.node if n.name}
    for node in quantized.graph.node:
        if node.name not in names or node.op_type not in LAYER_KINDS:
            continue
        for name in node.input:
            source = producers.get(name)
            if source is None or source.op_type != "DequantizeLinear":
                continue
            base = source.input[0].removesuffix("_quantized")
            value = dequantize(source, constants)
            if value is None or base not in float_constants:
                continue
            original = numpy_helper.to_array(float_constants[base]).astype(np.float64)
            if original.shape != value.shape:
                continue
            noise = float(np.sum((value - original) ** 2))
            found[node.name] = max(
                found.get(node.name, 0.0), _ratio(float(np.sum(original**2)), noise)
            )
    return found


def rank_units(
    model: onnx.ModelProto,
    tensor_noise: dict[str, float],
    weight_noise_by_node: dict[str, float],
) -> list[Unit]:
    """Units (rule 3), noisiest first; units with no node that can be excluded are dropped."""
    producers = producers_of(model)
    users = consumers_of(model)
    units: list[Unit] = []
    for tensor, noise in tensor_noise.items():
        touching = [producers.get(tensor), *users.get(tensor, [])]
        nodes = tuple(
            dict.fromkeys(
                n.name
                for n in touching
                if n is not None and n.name and n.op_type in QUANTIZABLE_OPS
            )
        )
        if nodes:
            units.append(Unit(nodes, noise, tensor))
    for node, noise in weight_noise_by_node.items():
        units.append(Unit((node,), noise, f"weight of {node}"))
    return sorted(units, key=lambda u: -u.noise)


def _prefix_nodes(units: list[Unit], k: int) -> list[str]:
    return list(dict.fromkeys(n for unit in units[:k] for n in unit.nodes))


def prefix_steps(units: list[Unit], max_excluded: int | None) -> list[int]:
    """Prefix lengths (0 first) at which the float node set grows, within ``max_excluded``."""
    steps, size = [0], 0
    for k in range(1, len(units) + 1):
        grown = len(_prefix_nodes(units, k))
        if max_excluded is not None and grown > max_excluded:
            break
        if grown > size:
            steps.append(k)
            size = grown
    return steps


# --- the search ------------------------------------------------------------------------------


@dataclass
class _Search:
    model: onnx.ModelProto
    ranges: dict[str, TensorRange]
    settings: QdqSettings
    evaluator: Evaluator
    units: list[Unit]
    on_step: Callable[[int, float], None] | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    scored: dict[int, tuple[float, onnx.ModelProto]] = field(default_factory=dict)

    def drop(self, k: int) -> float:
        """Metric drop with the top ``k`` units kept in float (each k evaluated once)."""
        if k not in self.scored:
            nodes = _prefix_nodes(self.units, k)
            candidate = quantize_excluding(self.model, self.ranges, self.settings, nodes)
            metric = self.evaluator.score(candidate)
            self.scored[k] = (metric, candidate)
            self.history.append((len(nodes), metric))
            if self.on_step:
                self.on_step(len(nodes), metric)
        return self.evaluator.reference - self.scored[k][0]


def search_mixed_precision(
    model: onnx.ModelProto,
    ranges: dict[str, TensorRange],
    settings: QdqSettings,
    data: DataOptions,
    max_drop: float,
    session: SessionConfig | None = None,
    max_excluded: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    backend: Backend = ORT,
) -> MixedPrecisionResult:
    """The fewest top-ranked layers to keep in float so the metric drops by <= ``max_drop``."""
    if max_drop < 0 or not math.isfinite(max_drop):
        raise OnnxcompError(f"--max-drop {max_drop}: give a number of points >= 0, e.g. 1.0")
    config = session or SessionConfig()
    evaluation = EvalData(model, data)
    evaluator = Evaluator(model, evaluation, config, backend)
    full = quantize_excluding(model, ranges, settings)
    units: list[Unit] = []
    search = _Search(model, ranges, settings, evaluator, units, on_step)
    search.scored[0] = (evaluator.score(full), full)
    search.history.append((0, search.scored[0][0]))
    if on_step:
        on_step(0, search.scored[0][0])
    before = evaluator.reference - search.scored[0][0]
    best = 0
    if before > max_drop + EPSILON:
        tensors = activation_noise(model, full, evaluation, config, backend)
        units.extend(rank_units(model, tensors, weight_noise(model, full)))
        best = _binary_search(search, prefix_steps(units, max_excluded), max_drop)
    metric, chosen = search.scored[best]
    return MixedPrecisionResult(
        excluded=_prefix_nodes(units, best),
        drop_before=before,
        drop_after=evaluator.reference - metric,
        history=search.history,
        model=chosen,
        met=evaluator.reference - metric <= max_drop + EPSILON,
        metric=evaluator.metric,
        reference=evaluator.reference,
        evaluations=evaluator.count,
    )


def _binary_search(search: _Search, steps: list[int], max_drop: float) -> int:
    """The smallest step that meets ``max_drop`` (step 0 is known to fail); else the best seen."""
    if len(steps) == 1 or search.drop(steps[-1]) > max_drop + EPSILON:
        return min(search.scored, key=lambda k: (search.drop(k), k))
    low, high = 0, len(steps) - 1  # steps[low] fails, steps[high] meets
    while high - low > 1:
        mid = (low + high) // 2
        if search.drop(steps[mid]) <= max_drop + EPSILON:
            high = mid
        else:
            low = mid
    return steps[high]
