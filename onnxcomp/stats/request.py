"""Statistics declared, then collected: what a pass (or a step of one) needs from the data.

A :class:`StatisticsRequest` names tensors and what to record of them: histograms (ranges),
per-channel means (bias correction, pruning's bias compensation) and observers (Gram matrices,
samplers). Requests of steps that see the same graph are merged with ``|`` and collected in one
streamed ONNX Runtime run by :func:`collect` (NNCF's statistics aggregator, in small).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from onnxcomp.core.inputs import input_specs
from onnxcomp.data.batches import DataOptions, sample_batches
from onnxcomp.stats.collector import Observer, Statistics, collect_statistics
from onnxcomp.stats.histogram import DEFAULT_BINS


@dataclass
class StatisticsRequest:
    """What to record of which tensor in one run over the data."""

    histograms: tuple[str, ...] = ()
    channel_means: tuple[str, ...] = ()
    observers: dict[str, list[Observer]] = field(default_factory=dict)
    bins: int = DEFAULT_BINS

    def __or__(self, other: StatisticsRequest) -> StatisticsRequest:
        observers = {name: list(found) for name, found in self.observers.items()}
        for name, found in other.observers.items():
            observers.setdefault(name, []).extend(found)
        return StatisticsRequest(
            tuple(dict.fromkeys([*self.histograms, *other.histograms])),
            tuple(dict.fromkeys([*self.channel_means, *other.channel_means])),
            observers,
            max(self.bins, other.bins),
        )

    @classmethod
    def observing(cls, observers: Mapping[str, Iterable[Observer]]) -> StatisticsRequest:
        return cls(observers={name: list(found) for name, found in observers.items()})


@dataclass
class Collected:
    """The statistics of one run, with where they came from."""

    statistics: Statistics
    source: str


def collect(
    model: ir.Model,
    request: StatisticsRequest,
    data: DataOptions,
    session_config=None,
    on_task: Callable[[str, int | None], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
    description: str = "statistics",
    limit: int | None = None,
) -> Collected:
    """One streamed run of ``model`` over ``data`` recording everything ``request`` asks for.

    ``limit`` caps the samples (the data's own limit still applies when smaller).
    """
    if limit is not None:
        data = replace(data, limit=min(limit, data.limit or limit))
    batches, source, count = sample_batches(input_specs(ir.to_proto(model)), data)
    if on_task:
        on_task(f"{description} on {source}", count)
    statistics = collect_statistics(
        model,
        request.histograms,
        batches,
        session_config,
        bins=request.bins,
        on_batch=on_advance,
        channel_mean_names=request.channel_means,
        observers=request.observers,
    )
    return Collected(statistics, source)
