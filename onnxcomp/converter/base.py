"""The interface every onnxcomp pass implements, on top of onnx-ir's pass infrastructure.

A pass is an ``ir.passes.InPlacePass``: ``call(model)`` changes the model in place and
returns a :class:`CompressionResult`, which is an ``ir.passes.PassResult`` that also carries a
:class:`PassRecord` saying what changed (and, for what was left alone, why). The pipeline
prints the records; later data-driven passes read the shared statistics in ``PassContext``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from onnxcomp.backends.ort import SessionConfig
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError
from onnxcomp.stats.request import Collected, StatisticsRequest, collect


@dataclass
class Skipped:
    """A place where a pass could have acted but did not, and why."""

    node: str
    reason: str


@dataclass
class PassRecord:
    """What one pass changed: printed by the report, kept in the JSON report."""

    name: str
    lossless: bool
    modified: bool = False
    summary: str = ""
    changes: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    op_delta: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompressionResult(ir.passes.PassResult):
    """A PassResult with the record of what the pass did."""

    record: PassRecord = field(default_factory=lambda: PassRecord("", True))


@dataclass
class PassContext:
    """What passes share: the sample data, how to run models, progress hooks, statistics.

    Data-driven passes declare what they need as a :class:`StatisticsRequest` and call
    :meth:`collect`: one streamed run over ``calibration`` for all of it; the result is kept in
    ``collected`` for the steps that follow on the same graph.
    """

    calibration: DataOptions | None = None
    evaluation: DataOptions | None = None  # held-out data for accuracy-aware decisions
    session: SessionConfig | None = None
    collected: Collected | None = None  # the last run over the calibration data
    on_task: Callable[[str, int | None], None] | None = None
    on_advance: Callable[[int], None] | None = None

    def task(self, description: str, total: int | None = None) -> None:
        if self.on_task:
            self.on_task(description, total)

    def advance(self, n: int) -> None:
        if self.on_advance:
            self.on_advance(n)

    def collect(
        self,
        model: ir.Model,
        request: StatisticsRequest,
        description: str,
        limit: int | None = None,
    ) -> Collected:
        """One run over the calibration data recording everything ``request`` declares."""
        if self.calibration is None:
            raise OptionError(f"{description} needs calibration data: give --calib DIR")
        self.collected = collect(
            model,
            request,
            self.calibration,
            self.session,
            self.task,
            self.advance,
            description,
            limit,
        )
        return self.collected


class CompressionPass(ir.passes.InPlacePass):
    """Base class of onnxcomp passes.

    Subclasses set ``name`` and ``lossless`` and implement :meth:`apply`, which changes the
    model in place and fills the record. ``min_opset`` is the opset the pass needs; the
    pipeline upgrades older models with onnx's version converter and says so.
    """

    name: ClassVar[str] = "pass"
    lossless: ClassVar[bool] = True
    min_opset: ClassVar[int] = 7

    def __init__(self, context: PassContext | None = None) -> None:
        self.context = context or PassContext()

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        raise NotImplementedError

    def requires_data(self) -> str | None:
        """The option that makes this pass read calibration data (e.g. ``"--prune-method
        thinet"``), or None when it needs none. The pipeline refuses the run before any pass
        when such a pass has no ``context.calibration``."""
        return None

    def check(self, model: ir.Model) -> None:
        """Preconditions on the input model (already quantized, binarized, no layer to act
        on...). Called by the pipeline for every pass before the first pass runs; raise
        :class:`onnxcomp.errors.OptionError` with one line saying what to do."""

    def call(self, model: ir.Model) -> CompressionResult:
        record = PassRecord(self.name, self.lossless)
        before = op_histogram(model)
        record.nodes_before = sum(before.values())
        self.apply(model, record)
        after = op_histogram(model)
        record.nodes_after = sum(after.values())
        delta = Counter(after)
        delta.subtract(before)
        record.op_delta = {op: n for op, n in sorted(delta.items()) if n}
        record.modified = record.modified or bool(record.op_delta) or bool(record.changes)
        if not record.summary:
            record.summary = describe_delta(record.op_delta) if record.modified else "no change"
        return CompressionResult(model, record.modified, record)


def op_histogram(model: ir.Model) -> Counter[str]:
    """Op types of the main graph and its subgraphs, with their counts."""
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def describe_delta(delta: dict[str, int]) -> str:
    removed = [f"-{-n} {op}" for op, n in delta.items() if n < 0]
    added = [f"+{n} {op}" for op, n in delta.items() if n > 0]
    return ", ".join(removed + added) or "rewrote nodes in place"
