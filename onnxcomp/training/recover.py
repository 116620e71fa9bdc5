"""Block-wise recovery: each block of a compressed student fitted to the teacher's block output.

BRECQ (Li et al., 2021) reconstructs a network block by block on a few hundred calibration
samples instead of training it end to end: cheap enough for a CPU. `recover_blocks(student,
teacher, data, config)` does it for any onnxcomp student of an ONNX teacher:

1. Boundaries (`find_boundaries`): where a residual Add joins two non-constant tensors, its
   output, followed through a single-reader Relu/Clip/BatchNormalization and a Q -> DQ pair,
   ends a block. A graph without residual Adds is cut after every weighted layer (Conv,
   ConvTranspose, Gemm, MatMul with a constant weight), followed the same way. The last block
   ends at the graph outputs.
2. Matching: onnxcomp's passes keep tensor names, so each boundary is looked up by name in the
   teacher (its name before any Q -> DQ pair); the last block's targets are the teacher's graph
   outputs in order. A boundary missing from the teacher, or with another shape there (a
   pruned residual stream), is refused in one line.
3. Targets: one ONNX Runtime run of the teacher over the calibration samples with every
   boundary as a tap (`OnnxTeacher`), kept in memory-mapped files in a temporary folder.
4. Block by block, in graph order: the block's inputs are the student's own outputs of the
   previous boundary (computed after the earlier blocks were recovered: errors upstream are
   made up for downstream); with ``input_mix`` p each element is the teacher's instead with
   probability p (QDrop, Wei et al., 2022). Only the block's parameters are trained (those that
   receive a gradient through ``OnnxModule.run_from``): MSE against the teacher's boundary,
   Adam with a cosine-decayed rate. LSQ steps of an int8 QDQ student are trained with them at
   ``step_lr``. A block whose error over the samples rose is put back as it was.
5. BatchNorm nodes left in the student stay in eval mode: the running statistics are kept
   (small calibration batches would make them noisy) and their scale and bias are trained.
   Students from ``onnxcomp convert`` have BatchNorm folded into the convolutions anyway.

The student is trained in place; ``student.export_onnx()`` writes the result back into its graph.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from onnxcomp.core.layers import LAYER_KINDS
from onnxcomp.errors import OnnxcompError, OptionError
from onnxcomp.training.data import TrainingData, pick_subset

try:
    import torch
except ImportError:  # pragma: no cover - exercised only without the extra
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from None

from onnxcomp.training.importer import OnnxModule
from onnxcomp.training.teacher import OnnxTeacher, check_compatible

__all__ = [
    "BlockRecord",
    "Boundary",
    "RecoverConfig",
    "RecoverProgress",
    "RecoverResult",
    "find_boundaries",
    "recover_blocks",
]

# Ops a boundary is followed through when they are the only reader (per-channel, shape-keeping).
FOLLOW_OPS = ("Relu", "Clip", "BatchNormalization", "LeakyRelu")
EVAL_BATCH = 128


@dataclass(frozen=True)
class RecoverConfig:
    """Block-wise recovery options, each a flag of ``finetune --recover blocks`` (``--recover-iters
    --recover-lr --recover-samples --recover-batch-size --recover-step-lr --recover-input-mix``).
    Validated when built (OptionError naming the flag)."""

    iterations: int = 200
    lr: float = 1e-3  # ResNet-56 thinet 0.5: logits error 0.062 -> 0.036 (1e-4: -> 0.062)
    batch_size: int = 32
    samples: int = 1024
    step_lr: float = 1e-6  # LSQ steps of int8 QDQ students (Adam moves each by ~lr per step)
    input_mix: float = 0.0  # probability that an input element is the teacher's (QDrop)
    seed: int = 0
    cache_dir: Path | None = None  # where the teacher's boundary outputs are memory-mapped

    def __post_init__(self) -> None:
        for flag, value in (
            ("--recover-iters", self.iterations),
            ("--recover-batch-size", self.batch_size),
            ("--recover-samples", self.samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{flag} must be a positive integer, got {value!r}")
        for flag, value in (("--recover-lr", self.lr), ("--recover-step-lr", self.step_lr)):
            if not _number(value) or value < 0 or (flag == "--recover-lr" and value == 0):
                low = "above 0" if flag == "--recover-lr" else "at least 0"
                raise OptionError(f"{flag} must be a number {low}, got {value!r}")
        if not _number(self.input_mix) or not 0 <= self.input_mix <= 1:
            raise OptionError(
                f"--recover-input-mix must be a probability in [0, 1], got {self.input_mix!r}"
            )
        if self.batch_size > self.samples:
            raise OptionError(
                f"--recover-batch-size {self.batch_size} is above --recover-samples "
                f"{self.samples}; use a smaller batch or more samples"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Boundary:
    """Where a block ends: ``tensor`` in the student (what the next block reads) and ``target``,
    the teacher's tensor it is fitted to (the same name before any Q -> DQ pair)."""

    tensor: str
    target: str


@dataclass
class BlockRecord:
    """One block: its name (the boundary's teacher name, or ``outputs``), MSE and relative error
    (MSE / mean square of the target) over the samples before and after, seconds, parameters
    trained, and whether the recovered weights were kept."""

    name: str
    loss_before: float
    loss_after: float
    relative_before: float
    relative_after: float
    seconds: float
    parameters: int
    kept: bool = True


@dataclass
class RecoverResult:
    """Per-block records in order, notes for the report, samples used and total seconds."""

    blocks: list[BlockRecord]
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    kind: str = "residual blocks"


class RecoverProgress(Protocol):
    """Progress hooks: each block starts, steps ``iterations`` times, then ends."""

    def start_block(self, index: int, total: int, name: str, iterations: int) -> None: ...

    def step(self, loss: float) -> None: ...

    def end_block(self, record: BlockRecord) -> None: ...


# --------------------------------------------------------------------------- blocks


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _follow(value: ir.Value) -> Boundary:
    """Rule 1: the tensor the next block reads after ``value`` and the name to match."""
    target = value.name
    while (reader := _single_reader(value)) is not None:
        if reader.op_type in FOLLOW_OPS:
            value = reader.outputs[0]
            target = value.name
        elif reader.op_type == "QuantizeLinear":
            dequantize = _single_reader(reader.outputs[0])
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                break
            value = dequantize.outputs[0]
        else:
            break
    return Boundary(value.name, target)


def _constant(value: ir.Value | None) -> bool:
    """An initializer or Constant, possibly behind Identity or DequantizeLinear nodes."""
    if value is None or value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type in ("Identity", "DequantizeLinear"):
        return _constant(producer.inputs[0])
    return producer.op_type == "Constant"


def find_boundaries(graph: ir.Graph) -> tuple[list[Boundary], str]:
    """Rule 1: the block boundaries in graph order (graph outputs excluded) and their kind."""
    adds = [
        node
        for node in graph
        if node.op_type == "Add"
        and len(node.inputs) == 2
        and not any(_constant(v) for v in node.inputs)
    ]
    kind = "residual blocks"
    if not adds:
        adds = [node for node in graph if _weighted(node)]
        kind = "layers"
    outputs = {v.name for v in graph.outputs}
    found: list[Boundary] = []
    for node in adds:
        boundary = _follow(node.outputs[0])
        if boundary.tensor not in outputs and boundary not in found:
            found.append(boundary)
    return found, kind


def _weighted(node: ir.Node) -> bool:
    return node.op_type in LAYER_KINDS and len(node.inputs) > 1 and _constant(node.inputs[1])


# --------------------------------------------------------------------------- matching


def _match(boundaries: Sequence[Boundary], teacher: ir.Model) -> None:
    """Rule 2: every boundary's target names a tensor of the teacher."""
    names = {v.name for node in teacher.graph for v in node.outputs}
    for boundary in boundaries:
        if boundary.target not in names:
            raise OnnxcompError(
                f"recover: the student's block boundary '{boundary.target}' is not a tensor of "
                "the teacher; block-wise recovery needs a student made from this teacher by "
                "onnxcomp (tensor names kept at the block boundaries)"
            )


def _check_shape(name: str, student: torch.Tensor, teacher: np.ndarray) -> None:
    if tuple(student.shape[1:]) != tuple(teacher.shape[1:]):
        raise OnnxcompError(
            f"recover: block boundary '{name}' has shape {list(student.shape[1:])} in the "
            f"student but {list(teacher.shape[1:])} in the teacher; block-wise recovery needs "
            "the same channels at the block boundaries (prune inside the blocks only)"
        )


# --------------------------------------------------------------------------- recovery


@dataclass
class _Block:
    name: str
    start: tuple[str, ...]  # student tensors fed
    end: tuple[str, ...]  # student tensors computed
    targets: tuple[str, ...]  # teacher tensors (taps or graph outputs)
    teacher_start: tuple[str, ...]  # teacher tensors for the QDrop mix (start, same order)


def _blocks(student: OnnxModule, teacher: OnnxTeacher, bounds: list[Boundary]) -> list[_Block]:
    blocks, start, teacher_start = [], tuple(student.input_names), tuple(student.input_names)
    for boundary in bounds:
        end = (boundary.tensor,)
        blocks.append(_Block(boundary.target, start, end, (boundary.target,), teacher_start))
        start, teacher_start = end, (boundary.target,)
    outs = tuple(student.output_names)
    blocks.append(_Block("outputs", start, outs, tuple(teacher.graph_outputs), teacher_start))
    return blocks


def recover_blocks(
    student: OnnxModule,
    teacher: ir.Model,
    data: TrainingData,
    config: RecoverConfig,
    progress: RecoverProgress | None = None,
) -> RecoverResult:
    """Fit each block of ``student`` to ``teacher`` in turn (module docstring), in place."""
    began = time.perf_counter()
    bounds, kind = find_boundaries(student.export_onnx().graph)
    _match(bounds, teacher)
    subset = _subset(data, config)
    folder = tempfile.TemporaryDirectory(prefix="onnxcomp-recover-", dir=config.cache_dir)
    oracle = OnnxTeacher(
        teacher,
        taps=[b.target for b in bounds],
        cache_samples=subset.num_samples,
        cache_dir=folder.name,
    )
    try:
        check_compatible(oracle.output_shapes, _output_shapes(student))
        inputs = {k: torch.from_numpy(v) for k, v in _inputs(subset).items()}
        for start in range(0, subset.num_samples, EVAL_BATCH):
            rows = np.arange(start, min(start + EVAL_BATCH, subset.num_samples))
            oracle({k: v[rows].numpy() for k, v in inputs.items()}, rows)
        targets = oracle.cache.arrays
        blocks = _blocks(student, oracle, bounds)
        result = RecoverResult([], samples=subset.num_samples, kind=kind)
        student.eval()
        rng = np.random.default_rng(config.seed)
        feeds = inputs
        for index, block in enumerate(blocks):
            if progress is not None:
                progress.start_block(index, len(blocks), block.name, config.iterations)
            teacher_feeds = {  # the teacher's start of the block, for the QDrop mix
                s: inputs[s] if s in inputs else torch.from_numpy(np.asarray(targets[t]))
                for s, t in zip(block.start, block.teacher_start, strict=True)
                if config.input_mix > 0
            }
            record, feeds = _recover(student, block, feeds, teacher_feeds, targets, config, rng,
                                     progress)  # fmt: skip
            result.blocks.append(record)
            if progress is not None:
                progress.end_block(record)
    finally:
        oracle.close()
        folder.cleanup()
    result.notes += _notes(result, config)
    result.seconds = time.perf_counter() - began
    return result


def _subset(data: TrainingData, config: RecoverConfig) -> TrainingData:
    """The calibration samples: ``config.samples`` of ``data`` (balanced over classes)."""
    keep = pick_subset(data.labels, data.num_samples, config.samples, config.seed)
    if len(keep) < config.batch_size:
        raise OptionError(
            f"--recover-batch-size {config.batch_size} is above the {len(keep)} samples of "
            f"{data.source}; use a smaller batch"
        )
    labels = None if data.labels is None else data.labels[keep]
    arrays = {k: v[keep] for k, v in data.arrays.items()}
    return replace(data, arrays=arrays, labels=labels, notes=list(data.notes))


def _inputs(data: TrainingData) -> dict[str, np.ndarray]:
    """Every sample as float32 model inputs (no augmentation, in order)."""
    parts = list(data.batches(EVAL_BATCH, shuffle=False, augment=False))
    return {k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs}


def _output_shapes(student: OnnxModule) -> dict[str, tuple]:
    graph = student.export_onnx().graph
    return {v.name: tuple(v.shape or ()) for v in graph.outputs}


def _rows(feeds: dict[str, torch.Tensor], rows: np.ndarray | slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in feeds.items()}


def _target(targets: dict[str, np.ndarray], names: Sequence[str], rows) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(targets[n][rows], dtype=np.float32)) for n in names]


def _mse(outputs: Sequence[torch.Tensor], wanted: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(
        torch.mean((o.float() - w) ** 2) for o, w in zip(outputs, wanted, strict=True)
    ) / len(outputs)


def _run_block(student: OnnxModule, block: _Block, feeds: dict) -> dict[str, torch.Tensor]:
    try:
        return student.run_from(feeds, block.end)
    except OnnxcompError as error:
        raise OnnxcompError(
            f"recover: block '{block.name}' reads tensors before its start "
            f"({', '.join(block.start)}), so it cannot be fitted on its own ({error})"
        ) from None


@torch.no_grad()
def _measure(
    student: OnnxModule, block: _Block, feeds: dict, targets: dict
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """MSE and relative error of the block over all samples, and its outputs."""
    count = len(next(iter(feeds.values())))
    error = power = 0.0
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in block.end}
    for start in range(0, count, EVAL_BATCH):
        rows = slice(start, min(start + EVAL_BATCH, count))
        out = _run_block(student, block, _rows(feeds, rows))
        wanted = _target(targets, block.targets, rows)
        for (name, value), target, tap in zip(out.items(), wanted, block.targets, strict=True):
            _check_shape(tap, value, targets[tap])
            error += float(torch.sum((value.float() - target) ** 2)) / target[0].numel()
            power += float(torch.sum(target**2)) / target[0].numel()
            parts[name].append(value.detach())
    mse = error / (count * len(block.end))
    return mse, error / max(power, 1e-30), {k: torch.cat(v) for k, v in parts.items()}


def _block_parameters(student: OnnxModule, block: _Block, feeds: dict) -> list[torch.Tensor]:
    """The parameters a gradient reaches from the block's outputs (one small batch)."""
    student.zero_grad(set_to_none=True)
    out = student.run_from(_rows(feeds, slice(0, 2)), block.end)
    sum(v.float().square().mean() for v in out.values()).backward()
    found = [p for p in student.parameters() if p.grad is not None]
    student.zero_grad(set_to_none=True)
    return found


def _recover(
    student: OnnxModule,
    block: _Block,
    feeds: dict[str, torch.Tensor],
    teacher_feeds: dict[str, torch.Tensor],
    targets: dict[str, np.ndarray],
    config: RecoverConfig,
    rng: np.random.Generator,
    progress: RecoverProgress | None,
) -> tuple[BlockRecord, dict[str, torch.Tensor]]:
    """Rule 4 for one block: its record and its outputs on every sample (the next feeds)."""
    began = time.perf_counter()
    before, rel_before, outputs = _measure(student, block, feeds, targets)
    params = _block_parameters(student, block, feeds)
    saved = [p.detach().clone() for p in params]
    steps = {id(p) for p in student.quants.parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in steps], "lr": config.lr},
        {"params": [p for p in params if id(p) in steps], "lr": config.step_lr},
    ]
    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    if groups:
        _optimise(student, block, feeds, teacher_feeds, targets, groups, config, rng, progress)
    after, rel_after, new_outputs = _measure(student, block, feeds, targets)
    kept = after <= before
    if kept:
        outputs = new_outputs
    else:
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)
        after, rel_after = before, rel_before
    count = sum(p.numel() for p in params)
    seconds = time.perf_counter() - began
    record = BlockRecord(block.name, before, after, rel_before, rel_after, seconds, count, kept)
    return record, outputs


def _optimise(student, block, feeds, teacher_feeds, targets, groups, config, rng, progress):
    """Adam on the block's parameters, cosine-decayed, MSE against the teacher's boundary."""
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations)
    count = len(next(iter(feeds.values())))
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for _ in range(config.iterations):
        rows = np.sort(rng.choice(count, config.batch_size, replace=False))
        batch = _rows(feeds, rows)
        if config.input_mix > 0:
            for name, value in batch.items():
                mix = torch.rand(value.shape, generator=generator) < config.input_mix
                batch[name] = torch.where(mix, teacher_feeds[name][rows], value)
        out = student.run_from(batch, block.end)
        loss = _mse([out[n] for n in block.end], _target(targets, block.targets, rows))
        if not torch.isfinite(loss):
            raise OnnxcompError(
                f"recover: the loss of block '{block.name}' is not finite; lower --recover-lr "
                f"(now {config.lr:g})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress.step(float(loss.detach()))


def _notes(result: RecoverResult, config: RecoverConfig) -> list[str]:
    notes = [
        f"block-wise recovery: {len(result.blocks)} {result.kind} on {result.samples} samples, "
        f"{config.iterations} Adam iterations each (lr {config.lr:g}, batch {config.batch_size}"
        + (f", teacher inputs mixed in at p={config.input_mix:g}" if config.input_mix else "")
        + ")"
    ]
    reverted = [b.name for b in result.blocks if not b.kept]
    if reverted:
        notes.append(
            f"{len(reverted)} block(s) kept their weights (recovery did not lower their error): "
            + ", ".join(reverted[:5])
            + (" ..." if len(reverted) > 5 else "")
        )
    return notes
