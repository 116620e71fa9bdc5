"""Pruning importance: which channels of a group go first. A small registry of criteria
(``l1``, ``thinet``; later Taylor from training), each saying whether it reads data, which
observers it puts on a reading layer and the removal order it gives a group."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from onnxcomp.converter.prune.channels import ChannelAnalysis, ChannelGroup, Consumer
from onnxcomp.converter.prune.samplers import ContributionSampler, MatrixSampler, ReaderStats
from onnxcomp.core.geometry import conv_geometry

# Rows of the stacked ThiNet matrix used by one group's greedy search.
_GREEDY_ROWS = 40_000


def l1_keep(weight_a: np.ndarray, keep: int) -> np.ndarray:
    """Indices (sorted) of the ``keep`` filters with the largest L1 norm."""
    norms = np.abs(weight_a.reshape(weight_a.shape[0], -1)).sum(axis=1)
    return np.sort(np.argsort(-norms, kind="stable")[:keep])


def thinet_order(contributions: np.ndarray, count: int) -> np.ndarray:
    """ThiNet's greedy, as a removal order: T grows one channel at a time, each time by the
    channel keeping ||sum_{c in T} x_c||^2 smallest. ``contributions`` is (samples, C)."""
    x = np.asarray(contributions, np.float64)
    total = np.zeros(x.shape[0])
    order: list[int] = []
    available = np.ones(x.shape[1], bool)
    for _ in range(min(count, x.shape[1])):
        candidates = np.flatnonzero(available)
        cost = np.square(total[:, None] + x[:, candidates]).sum(axis=0)
        best = int(candidates[int(np.argmin(cost))])
        order.append(best)
        available[best] = False
        total += x[:, best]
    return np.asarray(order, np.int64)


def thinet_remove(contributions: np.ndarray, remove: int) -> np.ndarray:
    """The channel set T (sorted) ThiNet's greedy removes."""
    return np.sort(thinet_order(contributions, remove))


def l1_order(analysis: ChannelAnalysis, group: ChannelGroup, count: int) -> np.ndarray:
    """Removal order of a group's classes by the summed, normalised L1 norms of their filters."""
    score = np.zeros(group.channels)
    for producer in group.producers:
        weight = np.moveaxis(producer.weight_array(), producer.axis, 0)
        norms = np.abs(weight.reshape(weight.shape[0], -1)).sum(axis=1)
        norms = norms / max(float(norms.mean()), 1e-30)
        where = analysis.positions(group, producer.space)
        mask = where >= 0
        np.add.at(score, where[mask], norms[mask])
    return np.argsort(score, kind="stable")[:count]


def thinet_group_order(
    analysis: ChannelAnalysis, group: ChannelGroup, stats: dict[str, ReaderStats], count: int
) -> np.ndarray | None:
    """Greedy removal order of a group's classes from the samples of every reading layer."""
    lookup = {int(r): i for i, r in enumerate(group.classes)}
    blocks = []
    for consumer in group.consumers:
        entry = stats.get(consumer.node.name or "")
        if entry is None or entry.sampler is None or not len(entry.sampler.rows):
            continue
        rows = entry.sampler.rows
        energy = float(np.mean(np.square(rows.sum(axis=1))))
        block = np.zeros((len(rows), group.channels))
        for column, root in enumerate(entry.classes):
            position = lookup.get(int(root))
            if position is not None:
                block[:, position] += rows[:, column]
        blocks.append(block / np.sqrt(max(energy, 1e-30)))
    if not blocks:
        return None
    stacked = np.concatenate(blocks)
    if len(stacked) > _GREEDY_ROWS:
        pick = np.random.default_rng(0).choice(len(stacked), _GREEDY_ROWS, replace=False)
        stacked = stacked[np.sort(pick)]
    return thinet_order(stacked, count)


class Importance:
    """A pruning criterion: how a group's channels are ranked.

    ``needs_data``: it reads calibration data; ``reconstructs``: the reading layers of what
    it removes are fitted again by least squares (when the config's ``reconstruct`` is on).
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False

    def sampler(
        self, consumer: Consumer, classes: np.ndarray, per_image: int, cap: int, seed: int
    ) -> ContributionSampler | MatrixSampler | None:
        """The observer of ``consumer``'s input this criterion ranks with, or None."""
        return None

    def order(
        self, analysis: ChannelAnalysis, group: ChannelGroup, count: int, stats: StatsByReader
    ) -> np.ndarray:
        """The first ``count`` classes of ``group`` to remove, in order."""
        return l1_order(analysis, group, count)


StatsByReader = dict[str, ReaderStats]
IMPORTANCE: dict[str, Importance] = {}


def register_importance(cls: type[Importance]) -> type[Importance]:
    """Class decorator: make a criterion available as ``PruneConfig(method=cls.name)``."""
    IMPORTANCE[cls.name] = cls()
    return cls


@register_importance
class L1Importance(Importance):
    """The producing filters' L1 norms (data-free)."""

    name = "l1"


@register_importance
class ThiNetImportance(Importance):
    """ThiNet's greedy on sampled contributions of every reading layer (falls back to L1 for
    a group no reading layer was sampled for)."""

    name = "thinet"
    needs_data = True
    reconstructs = True

    def sampler(
        self, consumer: Consumer, classes: np.ndarray, per_image: int, cap: int, seed: int
    ) -> ContributionSampler | MatrixSampler | None:
        if consumer.kind == "matrix":
            return MatrixSampler(consumer.as_matrix(), per_image, cap, seed, classes)
        weight = consumer.weight_array()
        geometry = conv_geometry(consumer.node, weight.shape[2:])
        if isinstance(geometry, str):
            return None
        return ContributionSampler(weight, geometry, per_image, cap, seed, classes)

    def order(
        self, analysis: ChannelAnalysis, group: ChannelGroup, count: int, stats: StatsByReader
    ) -> np.ndarray:
        order = thinet_group_order(analysis, group, stats, count)
        return order if order is not None else l1_order(analysis, group, count)
