"""The pass pipeline: the one place where the order of passes is written down."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir
from onnx import version_converter

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord
from onnxcomp.converter.binarize import BinarizeConfig, BinarizePass
from onnxcomp.converter.cleanup import CleanupPass, FoldBatchNormPass
from onnxcomp.converter.equalize import EqualizeConfig, EqualizePass, EqualizeRelu6Pass
from onnxcomp.converter.lowrank import LowRankConfig, LowRankPass
from onnxcomp.converter.prune import PruneConfig, PrunePass
from onnxcomp.converter.quantize import (
    Int4Config,
    Int4WeightsPass,
    QuantizeConfig,
    QuantizeInt8Pass,
)
from onnxcomp.converter.share import ShareConfig, SharePass
from onnxcomp.converter.sparsify import SparsifyPass, SparsityConfig
from onnxcomp.errors import OnnxcompError, OptionError

# The order of the passes (see ARCHITECTURE.md): cleanup, fold BatchNorm, binarization (on the
# folded weights, so that alpha absorbs BatchNorm's scale), channel pruning, low-rank
# factorization, cross-layer equalization (it rescales channels, so it comes before the two
# below), magnitude pruning, weight sharing (it keeps the zeros of pruning), and the weight
# quantizations last: int4 weights or int8 (never both).
PASS_ORDER: tuple[type[CompressionPass], ...] = (
    CleanupPass,
    FoldBatchNormPass,
    BinarizePass,
    PrunePass,
    LowRankPass,
    EqualizeRelu6Pass,
    EqualizePass,
    SparsifyPass,
    SharePass,
    Int4WeightsPass,
    QuantizeInt8Pass,
)


MIN_OPSET = 7


@dataclass(frozen=True)
class PipelineOptions:
    """Which passes run, with their settings."""

    cleanup: bool = True
    fold_batchnorm: bool = True
    prune: PruneConfig | None = None
    lowrank: LowRankConfig | None = None
    equalize: str | None = None  # None, "exact" (lossless) or "relu6" (ReLU6 -> ReLU, lossy)
    int8: QuantizeConfig | None = None
    binarize: BinarizeConfig | None = None
    sparsity: SparsityConfig | None = None
    sharing: ShareConfig | None = None
    int4: Int4Config | None = None
    target_opset: int | None = None

    def __post_init__(self) -> None:
        if self.equalize is not None:
            EqualizeConfig(self.equalize)  # checks the mode
        if self.int4 is not None:
            self._check_int4()
        if self.binarize is not None and (self.int8 or self.prune or self.lowrank):
            raise OptionError(
                "--binarize cannot be combined with --int8, --prune or --lowrank: binarized "
                "weights are already 1-bit (their activations are int8 with --calib)"
            )
        if (self.sparsity or self.sharing) and (self.int8 or self.binarize):
            raise OptionError(
                "--sparsity and --weight-sharing cannot be combined with --int8 or --binarize: "
                "they store float weights (use --int4-weights for sub-8-bit weights)"
            )
        if self.target_opset is not None and self.target_opset < MIN_OPSET:
            raise OptionError(
                f"--target-opset {self.target_opset}: onnxcomp needs opset {MIN_OPSET} or newer"
            )

    def _check_int4(self) -> None:
        if self.int8 is not None:
            raise OptionError(
                "--int4-weights cannot be combined with --int8: both quantize the same weights "
                "(--int4-weights: 4-bit weights, float activations; --int8: int8 weights and "
                "activations); choose one"
            )
        others = [
            flag
            for flag, on in (
                ("--binarize", self.binarize),
                ("--sparsity", self.sparsity),
                ("--weight-sharing", self.sharing),
            )
            if on is not None
        ]
        if others:
            raise OptionError(
                f"--int4-weights cannot be combined with {', '.join(others)}: each one sets "
                "the weights' values on its own grid; choose one"
            )


@dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord] = field(default_factory=list)

    @property
    def lossless(self) -> bool:
        return all(r.lossless for r in self.records)


def build_passes(options: PipelineOptions, context: PassContext) -> list[CompressionPass]:
    built: dict[type[CompressionPass], CompressionPass] = {}
    if options.cleanup:
        built[CleanupPass] = CleanupPass(context)
    if options.fold_batchnorm:
        built[FoldBatchNormPass] = FoldBatchNormPass(context)
    if options.binarize is not None:
        built[BinarizePass] = BinarizePass(options.binarize, context)
    if options.prune is not None:
        built[PrunePass] = PrunePass(options.prune, context)
    if options.lowrank is not None:
        built[LowRankPass] = LowRankPass(options.lowrank, context)
    if options.equalize is not None:
        equalize = EqualizeConfig(options.equalize).build(context)
        built[type(equalize)] = equalize
    if options.sparsity is not None:
        built[SparsifyPass] = SparsifyPass(options.sparsity, context)
    if options.sharing is not None:
        built[SharePass] = SharePass(options.sharing, context)
    if options.int4 is not None:
        built[Int4WeightsPass] = Int4WeightsPass(options.int4, context)
    if options.int8 is not None:
        built[QuantizeInt8Pass] = QuantizeInt8Pass(options.int8, context)
    return [built[cls] for cls in PASS_ORDER if cls in built]


def model_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def upgrade_opset(model: ir.Model, target: int, reason: str) -> tuple[ir.Model, PassRecord]:
    """Convert the model to ``target`` with onnx's version converter."""
    start = time.perf_counter()
    current = model_opset(model)
    try:
        proto = version_converter.convert_version(ir.to_proto(model), target)
    except Exception as exc:
        raise OnnxcompError(
            f"cannot upgrade the model from opset {current} to {target} ({reason}): "
            f"{' '.join(str(exc).split())}; re-export it with opset {target} or newer"
        ) from exc
    record = PassRecord(
        "upgrade-opset",
        lossless=True,
        modified=True,
        summary=f"opset {current} -> {target} ({reason})",
        seconds=time.perf_counter() - start,
    )
    return ir.from_proto(proto), record


class Pipeline:
    """Runs the passes in order, timing each and collecting its record."""

    def __init__(self, passes: Sequence[CompressionPass], target_opset: int | None = None):
        self.passes = list(passes)
        self.target_opset = target_opset

    @classmethod
    def from_options(cls, options: PipelineOptions, context: PassContext | None = None):
        return cls(build_passes(options, context or PassContext()), options.target_opset)

    def check(self, model: ir.Model) -> None:
        """Every pass's preconditions, before any pass runs (and so before any data pass)."""
        for compression_pass in self.passes:
            option = compression_pass.requires_data()
            if option and compression_pass.context.calibration is None:
                raise OptionError(
                    f"{option} reads calibration data: give it with --calib DIR "
                    "(images in class folders, a flat image folder, or .npy/.npz)"
                )
            compression_pass.check(model)

    def run(self, model: ir.Model, on_pass: Callable[[str], None] | None = None) -> PipelineResult:
        self.check(model)
        records: list[PassRecord] = []
        needed = max((p.min_opset for p in self.passes), default=0)
        current = model_opset(model)
        if self.target_opset and self.target_opset != current:
            model, record = upgrade_opset(model, self.target_opset, "asked with --target-opset")
            records.append(record)
        elif current < needed:
            users = ", ".join(p.name for p in self.passes if p.min_opset > current)
            model, record = upgrade_opset(model, needed, f"needed by {users}")
            records.append(record)
        for compression_pass in self.passes:
            if on_pass:
                on_pass(compression_pass.name)
            start = time.perf_counter()
            result = compression_pass(model)
            result.record.seconds = time.perf_counter() - start
            records.append(result.record)
            model = result.model
        return PipelineResult(model, records)
