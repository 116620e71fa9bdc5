"""int8 quantization: calibrate activation ranges on sample data, then insert QDQ pairs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.backends.targets import (
    ACTIVATION_TYPES,
    TARGETS,
    Target,
    get_target,
    resolve_reduce_range,
)
from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.quantize.adaround import adaround_rounder, missing_torch_problem
from onnxcomp.converter.quantize.bias_correction import (
    bias_correction_inputs,
    correct_bias,
    float_weights,
)
from onnxcomp.converter.quantize.calibrators import CALIBRATORS, KL_LEVELS, CalibrationSettings
from onnxcomp.converter.quantize.mixed_precision import search_mixed_precision
from onnxcomp.converter.quantize.qdq import (
    QdqSettings,
    fuse_pad_islands,
    place_qdq,
    tensors_to_calibrate,
)
from onnxcomp.converter.quantize.table import CalibrationTable
from onnxcomp.converter.quantize.weight_rounding import (
    REDUCED_WEIGHT_RANGE,
    WEIGHT_RANGE,
    gptq_rounder,
    gram_observers,
    round_weights,
)
from onnxcomp.core.layers import depthwise_layers
from onnxcomp.core.ops import QUANTIZED_OPS
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError
from onnxcomp.stats.collector import Statistics
from onnxcomp.stats.histogram import DEFAULT_BINS
from onnxcomp.stats.request import StatisticsRequest

DEFAULT_CALIBRATION = "mse"
WEIGHT_ROUNDINGS = ("nearest", "gptq", "adaround")
# Learned roundings: the name in the pass record, and the rounder of each layer.
ROUNDERS = {"gptq": ("GPTQ", gptq_rounder), "adaround": ("AdaRound", adaround_rounder())}
MIN_BINS = KL_LEVELS  # the entropy calibrator quantizes the histogram to this many levels
FRACTION_OPS = ("Conv", "Gemm", "MatMul")  # the layers --max-drop's float fraction counts


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything --int8 can be told; every value is checked when the config is made."""

    calibration: str = DEFAULT_CALIBRATION
    percentile: float = 99.99
    target: str = "x86"
    activation_type: str | None = None  # None: the target's choice
    per_channel: bool | None = None  # per-channel weights; None: the target's choice
    reduce_range: bool | None = None  # 7-bit weights; None: the target's choice (x86: the CPU)
    calib_cache: Path | None = None
    exclude_nodes: tuple[str, ...] = ()
    bins: int = DEFAULT_BINS
    weight_rounding: str = "nearest"  # or "gptq", "adaround" (needs torch)
    bias_correction: bool | None = None  # None: on for models with depthwise convolutions
    max_drop: float | None = None  # accuracy (or agreement) points; None: all int8
    max_float_fraction: float = 0.25  # of the weighted layers, for --max-drop

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise OptionError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values, one line each (empty when all are valid)."""
        found = []
        if self.calibration not in CALIBRATORS:
            found.append(
                f"--calibration {self.calibration}: choose one of {', '.join(CALIBRATORS)}"
            )
        if not 0.0 < self.percentile <= 100.0:
            found.append(f"--percentile {self.percentile}: give a percentile in (0, 100]")
        if self.target not in TARGETS:
            found.append(f"--target {self.target}: choose one of {', '.join(TARGETS)}")
        if self.activation_type is not None and self.activation_type not in ACTIVATION_TYPES:
            found.append(
                f"--activation-type {self.activation_type}: choose {' or '.join(ACTIVATION_TYPES)}"
            )
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            found.append(
                f"--weight-rounding {self.weight_rounding}: choose {', '.join(WEIGHT_ROUNDINGS)}"
            )
        elif self.weight_rounding == "adaround":
            found.extend(filter(None, [missing_torch_problem()]))
        if not isinstance(self.bins, int) or self.bins < MIN_BINS or self.bins % 2:
            found.append(f"bins {self.bins}: give an even number of histogram bins >= {MIN_BINS}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            found.append(f"--max-drop {self.max_drop}: give a number of points >= 0, e.g. 1.0")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            found.append(f"max_float_fraction {self.max_float_fraction}: give a fraction in [0, 1]")
        return found

    @property
    def target_spec(self) -> Target:
        """What the target's kernels want (activation type, per-channel weights...)."""
        return get_target(self.target)

    def weight_bits(self) -> tuple[bool, str]:
        """Whether weights are 7-bit (reduce_range), and why (for the report)."""
        if self.reduce_range is not None:
            return self.reduce_range, "--reduce-range" if self.reduce_range else "--no-reduce-range"
        return resolve_reduce_range(self.target_spec)

    @property
    def qdq(self) -> QdqSettings:
        target = self.target_spec
        return QdqSettings(
            activation_type=self.activation_type or target.activation_type,
            per_channel=target.per_channel_weights
            if self.per_channel is None
            else self.per_channel,
            reduce_range=self.weight_bits()[0],
        )

    def resolved_for(self, model: ir.Model) -> tuple[QuantizeConfig, list[str]]:
        """The config with the choices left to the model made, and a line for each of them.

        Bias correction (unless asked for or against) is on when the model has depthwise
        convolutions: their few weights per output channel make the rounding error's mean
        shift large (issue 14: a long-trained ImageNet MobileNetV2 kept 95.6 % top-1 agreement
        without it, 98.3 % with it; EfficientNet-Lite0 +0.8 points, see BENCHMARKS.md).
        """
        notes = []
        config = self
        if self.bias_correction is None:
            depthwise = depthwise_layers(model.graph)
            config = dataclasses.replace(config, bias_correction=bool(depthwise))
            if depthwise:
                notes.append(
                    f"bias correction on: the model has {len(depthwise)} depthwise "
                    "convolution(s) (--no-bias-correction to turn it off)"
                )
        reduce, why = self.weight_bits()
        notes.append(f"weights: {'7' if reduce else '8'}-bit ({why})")
        return config, notes

    @property
    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(
            symmetric=self.qdq.activation_type == "int8", percentile=self.percentile
        )


@dataclass
class CalibrationResult:
    """Ranges per tensor, and whether they came from --calib-cache; with the data pass's
    statistics (channel means for bias correction, Gram matrices for GPTQ) when there was one."""

    table: CalibrationTable
    from_cache: bool = False
    statistics: Statistics | None = None
    grams: dict | None = None
    source: str = "data"


def drop_intermediate_annotations(model: ir.Model) -> None:
    """Forget the types and shapes of intermediate values, so no value_info is written.

    ONNX Runtime infers them when it loads the model; in a small int8 file they are a tenth of
    the bytes.
    """
    outputs = set(model.graph.outputs)
    values = [v for node in model.graph for v in node.outputs]
    for value in [*values, *model.graph.initializers.values()]:
        if value not in outputs:
            value.type = None
            value.shape = None
            value.metadata_props.clear()


def replace_contents(model: ir.Model, new: ir.Model) -> None:
    """Make ``model`` hold ``new``'s graph and functions (for in-place passes)."""
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)


def calibrate(
    model: ir.Model, proto: onnx.ModelProto, config: QuantizeConfig, context: PassContext
) -> CalibrationResult:
    """Ranges for every tensor the QDQ placement needs: from the cache, else from the data.

    ``proto`` is ``model`` serialized."""
    names = tensors_to_calibrate(proto)
    cache = config.calib_cache
    if cache is not None and cache.exists():
        table = CalibrationTable.load(cache)
        table.require(names, str(cache))
        return CalibrationResult(table, from_cache=True)
    # Ranges, bias correction and GPTQ declare what they need; one run collects all of it.
    request = StatisticsRequest(histograms=tuple(names), bins=config.bins)
    grams = None
    if config.weight_rounding in ROUNDERS:
        observers = gram_observers(proto)
        grams = {g.layer: g for gs in observers.values() for g in gs}
        request = request | StatisticsRequest.observing(observers)
    if config.bias_correction:
        request = request | StatisticsRequest(channel_means=tuple(bias_correction_inputs(proto)))
    collected = context.collect(model, request, "calibrating")
    histograms = collected.statistics.histograms
    calibrator = CALIBRATORS[config.calibration]
    settings = config.calibration_settings
    ranges = {name: calibrator(h, settings) for name, h in histograms.items()}
    samples = max((h.count for h in histograms.values()), default=0)
    table = CalibrationTable(
        config.calibration,
        ranges,
        samples=samples,
        settings={"symmetric": settings.symmetric, "percentile": settings.percentile},
    )
    if cache is not None:
        table.save(cache)
    return CalibrationResult(table, False, collected.statistics, grams, collected.source)


def quantized_op_types(model: ir.Model) -> list[str]:
    """Op types of the main graph that show the model is already quantized."""
    return sorted({node.op_type for node in model.graph if node.op_type in QUANTIZED_OPS})


class QuantizeInt8Pass(CompressionPass):
    """Post-training int8 quantization with QDQ nodes.

    Rules:

    1. A model that already has quantized ops is refused.
    2. Activation ranges come from one streamed pass over the calibration data (histograms of
       every tensor the placement needs) and the chosen calibrator, or from ``--calib-cache``
       when it has every tensor (else refused, naming the missing ones).
    3. Weights: int8, symmetric, per output channel (per tensor with ``per_channel=False``);
       bias: int32 with scale s_in x s_w; activations per tensor, uint8 asymmetric on x86,
       int8 symmetric for TensorRT-like targets.
    4. QDQ placement follows ONNX Runtime's per-op registry (Conv, ConvTranspose, Gemm, MatMul,
       Add, Mul, Concat, pooling, Resize, shape ops sharing their input's scale; Relu/Clip
       removed where the uint8 clamp does their work); ops it does not cover stay float.
    5. A Pad between DQ and Q with equal scales and zero padding runs on the quantized tensor.
    6. Nodes in ``exclude_nodes`` stay float.
    7. ``weight_rounding`` gptq / adaround re-round the int8 weights on the same grid from the
       layers' input Gram matrices collected in the calibration run; a layer keeps its nearest
       rounding unless the new one lowers its output error on those inputs.
    """

    name = "int8"
    lossless = False
    min_opset = 13

    def __init__(self, config: QuantizeConfig, context: PassContext | None = None) -> None:
        super().__init__(context)
        self.config = config
        self.calibration: CalibrationResult | None = None

    def requires_data(self) -> str | None:
        cache = self.config.calib_cache
        return None if cache is not None and cache.exists() else "--int8"

    def check(self, model: ir.Model) -> None:
        """Refuse a model that is already quantized, and --max-drop with nothing to measure on."""
        quantized = quantized_op_types(model)
        if quantized:
            raise OptionError(
                f"the model is already quantized (it has {', '.join(quantized)}); "
                "give onnxcomp the float model"
            )
        if self.config.max_drop is not None and not self._evaluation_data():
            raise OptionError("--max-drop needs data to measure on: give --data or --calib")

    def _evaluation_data(self) -> DataOptions | None:
        return self.context.evaluation or self.context.calibration

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.config, choices = self.config.resolved_for(model)
        record.changes.extend(choices)
        float_proto = ir.to_proto(model)
        settings = self.config.qdq
        self.calibration = calibrate(model, float_proto, self.config, self.context)
        table = self.calibration.table
        source = self.calibration.source
        if self.config.max_drop is not None:
            proto = self._mixed_precision(float_proto, table, settings, record)
            pads = 0
        else:
            proto = place_qdq(float_proto, table.ranges, settings, self.config.exclude_nodes)
            pads = fuse_pad_islands(proto)
        fresh = not self.calibration.from_cache  # refinements need this run's statistics
        weights = float_weights(float_proto)
        if self.config.weight_rounding in ROUNDERS:
            label, rounder = ROUNDERS[self.config.weight_rounding]
            grams = self.calibration.grams
            if grams and fresh:
                self.context.task(f"{label} weight rounding", None)
                qrange = REDUCED_WEIGHT_RANGE if settings.reduce_range else WEIGHT_RANGE
                rounded = round_weights(proto, weights, grams, rounder, qrange)
                record.changes.append(f"{label} weight rounding: {len(rounded)} layer(s) improved")
            else:
                record.changes.append(f"{label} skipped: it needs the data pass, not a cache")
        if self.config.bias_correction:
            statistics = self.calibration.statistics
            if statistics is not None and fresh:
                means = {k: m.mean for k, m in statistics.channel_means.items()}
                corrected = correct_bias(proto, weights, means, record.skipped)
                record.changes.append(f"bias correction: {len(corrected)} layer(s)")
            else:
                record.changes.append("bias correction skipped: it needs the data pass")
        new = ir.from_proto(proto)
        drop_intermediate_annotations(new)
        ir.passes.Sequential(ir_passes.RemoveUnusedNodesPass(), ir_passes.TopologicalSortPass())(
            new
        )
        replace_contents(model, new)
        kind = "U8S8" if settings.activation_type == "uint8" else "S8S8"
        granularity = "per-channel" if settings.per_channel else "per-tensor"
        record.summary = (
            f"{kind} {granularity} QDQ, {table.method} ranges for {len(table.ranges)} tensors"
        )
        origin = f"from {self.config.calib_cache}" if self.calibration.from_cache else source
        record.changes.append(f"calibration: {table.method} ({origin})")
        if pads:
            record.changes.append(f"{pads} Pad(s) run on the quantized tensor")
        for node in self.config.exclude_nodes:
            record.skipped.append(Skipped(node, "kept in float (excluded)"))

    def _mixed_precision(self, float_proto, table, settings, record: PassRecord):
        """Keep the most sensitive layers in float until the drop is within --max-drop."""
        data = self._evaluation_data()
        assert data is not None  # check() refused --max-drop without data
        weighted = sum(n.op_type in FRACTION_OPS for n in float_proto.graph.node)
        self.context.task("mixed precision: measuring", None)
        result = search_mixed_precision(
            float_proto,
            table.ranges,
            settings,
            data,
            self.config.max_drop,
            self.context.session,
            max_excluded=max(1, int(self.config.max_float_fraction * weighted)),
        )
        unit = "points" if result.metric == "accuracy" else "points of agreement"
        record.changes.append(
            f"mixed precision ({result.metric} on {data.data or 'random inputs'}): drop "
            f"{result.drop_before:.2f} -> {result.drop_after:.2f} {unit} with "
            f"{len(result.excluded)} node(s) in float"
            + ("" if result.met else f"; --max-drop {self.config.max_drop} NOT met")
        )
        for node in result.excluded:
            record.skipped.append(Skipped(node, "kept in float by --max-drop (most sensitive)"))
        return result.model
