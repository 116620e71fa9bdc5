"""One pass over the calibration data, before pruning, observing every layer that reads the
channels of a candidate group: its input's channel means, the criterion's samples and, for
the whole-layer refit, its input Gram matrix."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.prune.channels import ChannelAnalysis, ChannelGroup, Consumer
from onnxcomp.converter.prune.config import PruneConfig
from onnxcomp.converter.prune.criteria import IMPORTANCE
from onnxcomp.converter.prune.samplers import ReaderStats
from onnxcomp.core.geometry import conv_geometry
from onnxcomp.stats.collector import Observer
from onnxcomp.stats.gram import ConvPatchGram, InputGram
from onnxcomp.stats.request import StatisticsRequest


def reader_gram(
    consumer: Consumer, config: PruneConfig, seed: int
) -> ConvPatchGram | InputGram | None:
    """Input statistics for the whole-layer refit, when the layer is small enough."""
    weight = consumer.weight_array()
    if consumer.kind == "matrix":
        features = weight.shape[0 if consumer.axis == 0 else 1]
        return InputGram(features) if features <= config.gram_features else None
    if weight[0].size > config.gram_features:
        return None
    geometry = conv_geometry(consumer.node, weight.shape[2:])
    if isinstance(geometry, str):
        return None
    return ConvPatchGram(geometry, weight.shape[1], config.patches_per_image, seed)


def reader_statistics(
    model: ir.Model,
    context: PassContext,
    config: PruneConfig,
    analysis: ChannelAnalysis,
    groups: list[ChannelGroup],
) -> dict[str, ReaderStats]:
    """Per reading layer (by node name), what one pass over the calibration data on the
    unpruned model learnt; empty without calibration data."""
    if context.calibration is None:
        return {}
    importance = IMPORTANCE[config.method]
    refit = importance.reconstructs and config.reconstruct
    stats: dict[str, ReaderStats] = {}
    observers: dict[str, list[Observer]] = {}
    readers = {id(c): c for group in groups for c in group.consumers}
    for i, consumer in enumerate(readers.values()):
        name = consumer.node.name or ""
        classes, inverse = np.unique(analysis.roots(consumer.space), return_inverse=True)
        entry = ReaderStats(name, consumer.space.name, classes)
        seed = config.seed + i
        entry.sampler = importance.sampler(
            consumer, inverse, config.samples_per_image, config.max_samples, seed
        )
        entry.gram = reader_gram(consumer, config, seed) if refit else None
        stats[name] = entry
        for observer in (entry.sampler, entry.gram):
            if observer is not None:
                observers.setdefault(consumer.space.name, []).append(observer)
    tensors = tuple(dict.fromkeys(entry.tensor for entry in stats.values()))
    request = StatisticsRequest.observing(observers) | StatisticsRequest(channel_means=tensors)
    collected = context.collect(model, request, "pruning statistics")
    for entry in stats.values():
        entry.mean = collected.statistics.channel_means[entry.tensor]
    return stats
