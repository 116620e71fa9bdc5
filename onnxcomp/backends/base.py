"""The interface onnxcomp asks of an inference runtime: sessions, runs and a timer.

ONNX Runtime (:mod:`onnxcomp.backends.ort`) implements it; a second runtime (TFLite, ORT
mobile) adds a module with a :class:`Backend` and one line in :mod:`onnxcomp.backends.registry`.
Code that only creates sessions, runs them and times them asks for a :class:`Backend` and
works with any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import onnx

from onnxcomp.core.inputs import Shape, batch_of_shapes, batched_inputs

ModelSource = str | Path | bytes | onnx.ModelProto
Feeds = Mapping[str, np.ndarray]
OptimizationLevel = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class SessionConfig:
    """How to build a session.

    ``inter_op_threads`` only matters with parallel execution mode; ``log_severity`` is ORT's
    level (0 verbose … 4 fatal). ``allow_spinning=False`` stops idle worker threads from
    spinning: needed when several sessions live in one process and are timed in turn, or the
    idle ones take CPU from the one being timed. A backend ignores what it has no use for.
    """

    provider: str = "cpu"
    allow_cpu_fallback: bool = False
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization_level: OptimizationLevel = "all"
    optimized_model_path: str | None = None
    enable_profiling: bool = False
    log_severity: int = 3
    allow_spinning: bool = True


@runtime_checkable
class Session(Protocol):
    """A loaded model, ready to run."""

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    @property
    def providers(self) -> tuple[str, ...]:
        """Where it runs (e.g. ``CPUExecutionProvider``), in the runtime's words."""
        ...

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """All outputs of one run, in graph order; runtime errors become OnnxcompError.

        A model with a fixed batch also takes fewer samples (see :class:`FixedBatch`)."""
        ...

    def runner(self, feeds: Feeds) -> Callable[[], object]:
        """A call that runs the session on ``feeds`` with the least overhead (for timing)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Creates sessions on one runtime."""

    name: str

    def create_session(self, model: ModelSource, config: SessionConfig) -> Session:
        """A session on ``config.provider``, or a one-line OnnxcompError."""
        ...


@dataclass(frozen=True)
class FixedBatch:
    """A model whose inputs fix the batch to ``size`` samples, and how it runs fewer.

    ``batched`` are the inputs that carry samples (first dimension ``size`` or symbolic). A run
    on fewer than ``size`` samples (the last, incomplete batch of the data) pads them to
    ``size`` by repeating the real samples in turn, then keeps only the real rows of every
    output whose first dimension is ``size``: the padded rows never reach a statistic or a
    metric, so each sample counts exactly once. An output whose first dimension is not the
    batch (rare: a tensor that folds the batch into another axis) is returned whole.
    Feeds of exactly ``size`` samples run as given.
    """

    size: int
    batched: frozenset[str]

    @classmethod
    def of(cls, inputs: Sequence[tuple[str, Shape]]) -> FixedBatch | None:
        """From the model's (name, shape) inputs; None when the batch is symbolic."""
        size = batch_of_shapes(shape for _, shape in inputs)
        return None if size is None else cls(size, frozenset(batched_inputs(inputs)))

    def rows(self, feeds: Feeds) -> int | None:
        """Samples in ``feeds`` (None when the batched inputs disagree or are absent)."""
        sizes = {np.shape(v)[0] for k, v in feeds.items() if k in self.batched and np.ndim(v)}
        return sizes.pop() if len(sizes) == 1 else None

    def run(self, call: Callable[[Feeds], list[np.ndarray]], feeds: Feeds) -> list[np.ndarray]:
        """``call(feeds)``, padded to ``size`` samples and trimmed back when there are fewer."""
        rows = self.rows(feeds)
        if rows is None or rows == 0 or rows >= self.size:
            return call(feeds)
        order = np.arange(self.size) % rows
        padded = {
            name: np.asarray(value)[order] if name in self.batched else value
            for name, value in feeds.items()
        }
        outputs = call(padded)
        return [
            value[:rows] if np.ndim(value) and np.shape(value)[0] == self.size else value
            for value in outputs
        ]


def run_by_name(session: Session, feeds: Feeds) -> dict[str, np.ndarray]:
    """Runs ``session`` on the feeds it declares (others are ignored); outputs by name."""
    values = session.run({name: feeds[name] for name in session.input_names})
    return dict(zip(session.output_names, values, strict=True))


def time_ms(call: Callable[[], object]) -> float:
    """The wall time of one call, in milliseconds."""
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e6
