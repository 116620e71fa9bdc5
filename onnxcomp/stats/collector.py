"""One streamed pass of a model over the calibration data, recording tensor statistics.

The model is copied with the requested intermediate tensors added as graph outputs, run in
ONNX Runtime batch by batch, and each tensor's :class:`TensorHistogram` is updated from the
batch and then dropped: memory is bounded by tensors x bins, never by the number of images.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.backends.ort import SessionConfig, create_session, run, session_batch
from onnxcomp.core.proto import PROTOBUF_LIMIT
from onnxcomp.errors import OnnxcompError
from onnxcomp.stats.histogram import DEFAULT_BINS, ChannelMean, TensorHistogram

Feeds = dict[str, np.ndarray]
# Samples per ONNX Runtime run while collecting: every exposed tensor of a run is held at
# once, so this (not the data's batch size) bounds the memory of the calibration pass. A model
# that fixes its batch runs exactly that many (the last run padded, its padded rows dropped
# from every tensor before any statistic sees it: ``backends.base.FixedBatch``).
RUN_ROWS = 16


class Observer(Protocol):
    """Anything that accumulates a statistic of one tensor, batch by batch."""

    def update(self, values: np.ndarray) -> None: ...


def _with_outputs(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto


def _chunks(
    batches: Iterator[tuple[Feeds, np.ndarray | None]], rows: int
) -> Iterator[tuple[Feeds, np.ndarray | None]]:
    """Split batches into runs of at most ``rows`` samples (when all inputs are batched)."""
    for feeds, labels in batches:
        sizes = {v.shape[0] if v.ndim else 0 for v in feeds.values()}
        if len(sizes) != 1 or next(iter(sizes)) <= rows:
            yield feeds, labels
            continue
        total = next(iter(sizes))
        for start in range(0, total, rows):
            part = {k: v[start : start + rows] for k, v in feeds.items()}
            yield part, None if labels is None else labels[start : start + rows]


@dataclass
class Statistics:
    """What one pass over the data collected."""

    histograms: dict[str, TensorHistogram] = field(default_factory=dict)
    channel_means: dict[str, ChannelMean] = field(default_factory=dict)
    samples: int = 0


def collect_statistics(
    model: ir.Model,
    histogram_names: Iterable[str],
    batches: Iterator[tuple[Feeds, np.ndarray | None]],
    session_config: SessionConfig | None = None,
    bins: int = DEFAULT_BINS,
    on_batch: Callable[[int], None] | None = None,
    channel_mean_names: Iterable[str] = (),
    observers: Mapping[str, Sequence[Observer]] | None = None,
) -> Statistics:
    """Run ``model`` over ``batches``: histograms and per-channel means of named tensors.

    ``observers`` adds statistics of other passes (e.g. the Gram matrices of weight
    rounding): each is updated with its tensor's value batch by batch, in the same run.
    """
    hist_names = list(dict.fromkeys(histogram_names))
    mean_names = list(dict.fromkeys(channel_mean_names))
    observers = dict(observers or {})
    names = list(dict.fromkeys([*hist_names, *mean_names, *observers]))
    proto = _with_outputs(model, names)
    config = session_config or SessionConfig()
    if config.intra_op_threads is None:
        # One core records statistics while ONNX Runtime computes the next run on the others.
        config = replace(config, intra_op_threads=max(1, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory(prefix="onnxcomp-calib-") as folder:
        if proto.ByteSize() > PROTOBUF_LIMIT - 2**20:
            path = Path(folder) / "augmented.onnx"
            onnx.save(proto, path, save_as_external_data=True, location="augmented.data")
            session = create_session(path, config)
        else:
            session = create_session(proto.SerializeToString(), config)
        del proto
        input_names = [i.name for i in session.get_inputs()]
        batch = session_batch(session)
        stats = Statistics(
            {name: TensorHistogram(bins) for name in hist_names},
            {name: ChannelMean() for name in mean_names},
        )
        images = 0

        def record(outputs: list[np.ndarray]) -> None:
            for name, value in zip(names, outputs, strict=True):
                if not np.issubdtype(np.asarray(value).dtype, np.floating):
                    continue
                if name in stats.histograms:
                    stats.histograms[name].update(value)
                if name in stats.channel_means:
                    stats.channel_means[name].update(value)
                for observer in observers.get(name, ()):
                    observer.update(value)

        # While the statistics of one run are being recorded, ONNX Runtime computes the next
        # (it releases the GIL); at most one run waits, so memory stays at two runs' tensors.
        with ThreadPoolExecutor(max_workers=1) as worker:
            pending: Future | None = None
            rows = batch.size if batch is not None else RUN_ROWS
            for feeds, _labels in _chunks(batches, rows):
                outputs = run(session, {k: feeds[k] for k in input_names}, names, batch)
                if pending is not None:
                    pending.result()
                pending = worker.submit(record, outputs)
                count = next(iter(feeds.values())).shape[0] if feeds else 1
                images += count
                if on_batch:
                    on_batch(count)
            if pending is not None:
                pending.result()
    if images == 0:
        raise OnnxcompError("the calibration data gave no samples")
    stats.samples = images
    return stats
