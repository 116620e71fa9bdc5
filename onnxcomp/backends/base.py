"""The interface onnxcomp asks of an inference runtime: sessions, runs and a timer.

ONNX Runtime (:mod:`onnxcomp.backends.ort`) implements it; a second runtime (TFLite, ORT
mobile) adds a module with a :class:`Backend` and one line in :mod:`onnxcomp.backends.registry`.
Code that only creates sessions, runs them and times them asks for a :class:`Backend` and
works with any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import onnx

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
        """All outputs of one run, in graph order; runtime errors become OnnxcompError."""
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


def run_by_name(session: Session, feeds: Feeds) -> dict[str, np.ndarray]:
    """Runs ``session`` on the feeds it declares (others are ignored); outputs by name."""
    values = session.run({name: feeds[name] for name in session.input_names})
    return dict(zip(session.output_names, values, strict=True))


def time_ms(call: Callable[[], object]) -> float:
    """The wall time of one call, in milliseconds."""
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e6
