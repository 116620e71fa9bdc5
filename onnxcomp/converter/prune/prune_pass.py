"""Channel pruning on the ONNX graph (``--prune R`` or ``--prune-macs F``).

Which channels are tied is the job of :mod:`onnxcomp.converter.prune.channels`: it groups the
channels of the whole graph (through residual Adds, Concat/Split/Slice, the zero-padded ResNet
shortcut, depthwise convs, Flatten -> Gemm) and says why a group cannot be pruned. This pass
ranks the channels of each prunable group, decides how many go, and removes them.

Ranking (``method``):

* ``l1``: the filters that produce a channel, by L1 norm (each layer's norms divided by their
  mean so tied layers weigh the same), summed over the group (data-free).
* ``thinet`` (Luo et al. 2017, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
  Compression"): one pass over the calibration data samples, for every layer that reads a
  group's channels, random (image, position, output channel) triples and their per-channel
  contributions x_c (for a Conv, sum over the kernel window of W[o, c] * input[c, window]).
  A greedy search removes, one channel at a time, the channel that keeps ||sum_{c in T} x_c||^2
  smallest, summed over the reading layers (each normalised by its output energy). Each reading
  layer then rescales its kept input channels by the least-squares w of
  min ||y - sum_{c kept} w_c x_c||^2. Samples are reservoir-capped: memory stays bounded.

With calibration data the reading layers' biases also absorb the mean contribution of what was
removed (``compensate_bias``).

How many: ``ratio`` removes that fraction of every group; ``macs`` keeps that fraction of the
MACs, with per-group amounts from a sensitivity scan: each group is pruned alone at
``sensitivity_levels`` on a slice of the calibration data, the relative output error measured in
ONNX Runtime, and levels are then chosen greedily by least error per MAC saved. ``overrides``
set a group's ratio by layer name, ``exclude`` leaves groups alone, ``min_channels`` is a floor.

MACs are those of Conv, Gemm and MatMul, per sample (symbolic dims count as 1).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp.backends.kernel_latency import KernelLatency, default_cache_path
from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.prune.allocation import allocate_levels
from onnxcomp.converter.prune.channels import (
    ChannelAnalysis,
    ChannelGroup,
    Space,
    prepare_analysis,
)
from onnxcomp.converter.prune.config import PruneConfig
from onnxcomp.converter.prune.criteria import IMPORTANCE
from onnxcomp.converter.prune.latency import fast_counts, nearest
from onnxcomp.converter.prune.readers import reader_statistics
from onnxcomp.converter.prune.reconstruct import adjust_readers
from onnxcomp.converter.prune.refit import refit_on_pruned
from onnxcomp.converter.prune.samplers import ReaderStats
from onnxcomp.converter.prune.sensitivity import SensitivityScan
from onnxcomp.core.ops import float_model_problem
from onnxcomp.core.units import format_count
from onnxcomp.errors import OptionError
from onnxcomp.stats.collector import Observer
from onnxcomp.stats.request import StatisticsRequest


@dataclass
class PrunedGroup:
    """What the pass did to one group; MACs are those of the layers it touches, per sample."""

    name: str
    label: str
    channels_before: int
    channels_after: int
    macs_before: int
    macs_after: int
    tensors: int
    error: float | None = None  # sensitivity scan: relative output error at this amount

    def describe(self) -> str:
        text = f"{self.label}: channels {self.channels_before} -> {self.channels_after}"
        if self.macs_before:
            change = self.macs_after / self.macs_before - 1.0
            text += (
                f", MACs {format_count(self.macs_before)} -> "
                f"{format_count(self.macs_after)} ({change:+.0%})"
            )
        if self.tensors > 2:
            text += f", {self.tensors} tensors"
        if self.error is not None:
            text += f", output error alone {self.error:.2%}"
        return text


class PrunePass(CompressionPass):
    """Remove channels of every prunable group (``l1`` or ``thinet``), by ratio or MACs.

    Rules:

    1. Groups come from :class:`ChannelAnalysis`; a blocked group is recorded in
       ``record.skipped`` with the reason, so is an excluded one or one at its minimum.
    2. ``thinet``, ``macs`` and bias compensation read calibration data
       (``context.calibration``): all reading layers are observed in one pass over it, on the
       unpruned model.
    3. Quantized and binarized models are refused. Only the main graph is visited.
    """

    name = "prune"
    lossless = False
    min_opset = 7

    def __init__(
        self,
        config: PruneConfig | None = None,
        context: PassContext | None = None,
        lookup: KernelLatency | None = None,
    ):
        super().__init__(context)
        self.config = config or PruneConfig()
        self.lookup = lookup  # --prune-latency: the kernel latency lookup (made when needed)
        self.fast: dict[int, list[int]] = {}  # group -> kept counts its kernels run fast
        self.groups: list[PrunedGroup] = []
        # ThiNet: per reading layer, (samples kept, samples seen).
        self.samples: dict[str, tuple[int, int]] = {}
        self.macs: tuple[int, int] | None = None

    def requires_data(self) -> str | None:
        return self.config.requires_data()

    def check(self, model: ir.Model) -> None:
        problem = float_model_problem(model, "pruning", "prune before")
        if problem:
            raise OptionError(problem)

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.groups, self.samples, self.macs = [], {}, None
        self.check(model)
        option = self.requires_data()
        if option and self.context.calibration is None:
            raise OptionError(f"{option} reads calibration data: give it with --calib DIR")
        analysis = prepare_analysis(model)
        if not analysis.producers:
            record.summary = "nothing to prune: no Conv, Gemm or MatMul with constant weights"
            return
        candidates = self._candidates(analysis, record)
        self.fast = self._fast_counts(analysis, candidates, record)
        considered = sum(1 for g in analysis.groups if _made_by_a_node(g))
        if not candidates:
            record.summary = f"no channel pruned: no prunable group ({considered} considered)"
            return
        stats = self._statistics(model, analysis, candidates)
        importance = IMPORTANCE[self.config.method]
        orders = {g.index: importance.order(analysis, g, limit, stats) for g, limit in candidates}
        errors: dict[int, float] = {}
        if self.config.macs is not None:
            counts, errors = self._allocate(model, analysis, candidates, orders, stats)
        else:
            counts = {g.index: min(limit, g.channels - self._keep(g)) for g, limit in candidates}
        counts = {i: n for i, n in counts.items() if n > 0}
        chosen = self._classes(analysis, orders, counts)
        removed_counts = {s: len(i) for s, i in analysis.removed_per_space(chosen).items()}
        self.macs = analysis.macs_after(removed_counts)
        for group, _ in candidates:
            n = counts.get(group.index, 0)
            if n == 0:
                done = "the MACs target is met without it" if self.config.macs else "would keep all"
                record.skipped.append(Skipped(group.name, f"{group.describe()}: {done}"))
                continue
            self.groups.append(self._describe(analysis, group, n, errors.get(group.index)))
        self._remove(model, analysis, chosen, stats, record)
        record.summary = self._summary(considered)

    # -- steps --------------------------------------------------------------------------------

    def _keep(self, group: ChannelGroup) -> int:
        for pattern, ratio in self.config.overrides:
            if any(fnmatch.fnmatchcase(name, pattern) for name in group.names):
                return self._keep_count(group, ratio) if ratio else group.channels
        return self._keep_count(group, None)

    def _keep_count(self, group: ChannelGroup, ratio: float | None) -> int:
        """The config's kept count, rounded to the nearest fast one with --prune-latency."""
        keep = self.config.keep_count(group.channels, ratio)
        fast = self.fast.get(group.index)
        return nearest(fast, keep) if fast else keep

    def _fast_counts(
        self,
        analysis: ChannelAnalysis,
        candidates: list[tuple[ChannelGroup, int]],
        record: PassRecord,
    ) -> dict[int, list[int]]:
        """--prune-latency: per candidate group, the kept counts its Convs run fast."""
        config = self.config
        if config.latency is None:
            return {}
        if self.lookup is None:
            # One thread: on a busy machine a multi-threaded run waits for its slowest thread,
            # which buries the channel-count effects; the kernels block channels per thread.
            self.lookup = KernelLatency(default_cache_path(), threads=1)
        before = self.lookup.measured
        fast = {}
        for group, limit in candidates:
            step, low = config.multiple, group.channels - limit
            counts = [c for c in range(step, group.channels, step) if c >= low]
            fast[group.index], seconds = fast_counts(
                analysis, group, counts, self.lookup, config.latency, config.latency_batch
            )
            if seconds:
                times = ", ".join(f"{c}: {1e3 * t:.2f}" for c, t in seconds.items())
                record.changes.append(
                    f"{group.describe()}: fast kept "
                    f"counts {fast[group.index]} (ms of its Convs by count: {times})"
                )
        timed = self.lookup.measured - before
        record.changes.append(
            f"--prune-latency {config.latency}: kept counts limited to those the {config.latency} "
            f"Convs run fast at batch {config.latency_batch} ({timed} geometries timed, the rest "
            "from the cache)"
        )
        return fast

    def _candidates(
        self, analysis: ChannelAnalysis, record: PassRecord
    ) -> list[tuple[ChannelGroup, int]]:
        """Prunable groups with the most channels each may lose."""
        out = []
        for group in analysis.groups:
            if not _made_by_a_node(group):
                continue  # the input image: no node makes these channels
            if group.blocked:
                record.skipped.append(Skipped(group.name, group.blocked))
                continue
            if any(fnmatch.fnmatchcase(n, p) for n in group.names for p in self.config.exclude):
                record.skipped.append(Skipped(group.name, f"{group.describe()} is excluded"))
                continue
            limit = group.channels - self.config.min_keep(group.channels)
            if limit <= 0:
                reason = (
                    f"{group.describe()} has {group.channels} channels, at the minimum "
                    f"(--prune-min-channels {self.config.min_channels}, kept counts in "
                    f"multiples of {self.config.multiple})"
                )
                record.skipped.append(Skipped(group.name, reason))
                continue
            out.append((group, limit))
        return out

    def _statistics(
        self,
        model: ir.Model,
        analysis: ChannelAnalysis,
        candidates: list[tuple[ChannelGroup, int]],
    ) -> dict[str, ReaderStats]:
        """One pass over the calibration data: samples and input means of every layer that
        reads channels of a candidate group."""
        groups = [group for group, _ in candidates]
        stats = reader_statistics(model, self.context, self.config, analysis, groups)
        for name, entry in stats.items():
            if entry.sampler is not None:
                self.samples[name] = (len(entry.sampler.rows), entry.sampler.seen)
        return stats

    def _remove(
        self,
        model: ir.Model,
        analysis: ChannelAnalysis,
        chosen: list[int],
        stats: dict[str, ReaderStats],
        record: PassRecord,
    ) -> None:
        """Delete the chosen classes (reading layers adjusted first), then refit the layers on
        the pruned model's own inputs when the criterion reconstructs."""
        config = self.config
        reconstruct = IMPORTANCE[config.method].reconstructs and config.reconstruct
        original = ir.to_proto(model) if reconstruct and config.refit_pruned else None
        removed = analysis.remove(
            chosen,
            lambda removed: adjust_readers(
                analysis, removed, stats, reconstruct, config.compensate_bias
            ),
        )
        record.changes.extend(g.describe() for g in self.groups)
        if original is None or not removed:
            return
        refitted = refit_on_pruned(
            original,
            model,
            analysis,
            removed,
            self._refit_pass,
            config.patches_per_image,
            config.gram_features,
            config.seed,
            config.compensate_bias,
            config.refit_residual,
        )
        record.changes.append(f"refitted {refitted} layer(s) on the pruned model's inputs")

    def _refit_pass(self, model: ir.Model, observers: dict[str, list[Observer]]) -> None:
        """One run over (a slice of) the calibration data for the layer-by-layer refit."""
        request = StatisticsRequest.observing(observers)
        limit = self.config.refit_samples
        self.context.collect(model, request, "pruning: refit a layer", limit=limit)

    @staticmethod
    def _classes(
        analysis: ChannelAnalysis, orders: dict[int, np.ndarray], counts: dict[int, int]
    ) -> list[int]:
        chosen: list[int] = []
        for index, n in counts.items():
            chosen.extend(int(c) for c in analysis.groups[index].classes[orders[index][:n]])
        return chosen

    def _describe(
        self, analysis: ChannelAnalysis, group: ChannelGroup, n: int, error: float | None
    ) -> PrunedGroup:
        spaces = set(group.spaces)
        per_class = {s: _elements_per_class(analysis, group, s) for s in spaces}
        removed = {s: round(n * per_class[s]) for s in spaces}
        before = after = 0
        for _, macs, space_in, space_out in analysis.layer_macs():
            if space_in not in spaces and space_out not in spaces:
                continue
            factor = 1.0
            for space in (space_in, space_out):
                if space in spaces:
                    factor *= 1.0 - removed[space] / max(space.size, 1)  # type: ignore[index]
            before += macs
            after += round(macs * factor)
        return PrunedGroup(
            group.name, group.describe(), group.channels, group.channels - n, before, after,
            len(group.spaces), error,
        )  # fmt: skip

    # -- --prune-macs -------------------------------------------------------------------------

    def _allocate(
        self,
        model: ir.Model,
        analysis: ChannelAnalysis,
        candidates: list[tuple[ChannelGroup, int]],
        orders: dict[int, np.ndarray],
        stats: dict[str, ReaderStats],
    ) -> tuple[dict[int, int], dict[int, float]]:
        """Per-group removal counts keeping ``config.macs`` of the MACs, chosen greedily by
        least (measured) output error per MAC saved; and the error of each chosen amount."""
        config = self.config
        reconstruct = IMPORTANCE[config.method].reconstructs and config.reconstruct
        scan = SensitivityScan(
            model, self.context, config.sensitivity_samples, reconstruct, config.compensate_bias
        )
        levels: dict[int, list[tuple[int, float]]] = {}  # group -> [(count, error)]
        total_steps = sum(len(self._counts(g, limit)) for g, limit in candidates)
        self.context.task("pruning sensitivity scan", total_steps)
        for group, limit in candidates:
            points = [(0, 0.0)]
            for n in self._counts(group, limit):
                classes = self._classes(analysis, orders, {group.index: n})
                points.append((n, scan.error(classes, stats)))
                self.context.advance(1)
            levels[group.index] = points
        shares = {
            g.index: {s: _elements_per_class(analysis, g, s) for s in g.spaces}
            for g, _ in candidates
        }

        def macs(current: dict[int, int]) -> int:
            removed: dict[Space, float] = {}
            for index, level in current.items():
                n = levels[index][level][0]
                for space, share in shares[index].items():
                    removed[space] = removed.get(space, 0.0) + n * share
            return analysis.macs_after(removed)[1]  # type: ignore[arg-type]

        total = analysis.macs_after({})[0]
        state = allocate_levels(levels, macs, config.macs * total)  # type: ignore[operator]
        if state is None:
            floor = macs({index: len(points) - 1 for index, points in levels.items()})
            raise OptionError(
                f"--prune-macs {config.macs}: pruning every group to its limit keeps "
                f"{floor / total:.1%} of the MACs; give a larger fraction, or lower "
                "--prune-min-channels or --prune-multiple"
            )
        counts = {index: levels[index][level][0] for index, level in state.items()}
        errors = {index: levels[index][level][1] for index, level in state.items() if level}
        return counts, errors

    def _counts(self, group: ChannelGroup, limit: int) -> list[int]:
        """Distinct removal counts of the scan levels (overrides fix a single count)."""
        for pattern, ratio in self.config.overrides:
            if any(fnmatch.fnmatchcase(name, pattern) for name in group.names):
                n = group.channels - self._keep_count(group, ratio)
                return [min(n, limit)] if ratio and n > 0 else []
        counts = []
        for level in self.config.sensitivity_levels:
            n = min(limit, group.channels - self._keep_count(group, level))
            if n > 0 and n not in counts:
                counts.append(n)
        return sorted(counts)

    def _summary(self, considered: int) -> str:
        if not self.groups:
            return f"no channel pruned ({considered} channel group(s) considered)"
        channels = sum(g.channels_before for g in self.groups)
        kept = sum(g.channels_after for g in self.groups)
        text = (
            f"pruned {len(self.groups)} of {considered} channel group(s) with "
            f"{self.config.method}: channels {channels} -> {kept}"
        )
        if self.macs and self.macs[0]:
            before, after = self.macs
            text += (
                f", model MACs {format_count(before)} -> {format_count(after)} "
                f"({after / before:.1%} kept)"
            )
        return text


def _made_by_a_node(group: ChannelGroup) -> bool:
    return bool(group.producers) or any(s.value.producer() is not None for s in group.spaces)


def _elements_per_class(analysis: ChannelAnalysis, group: ChannelGroup, space: Space) -> float:
    where = analysis.positions(group, space)
    return float(np.count_nonzero(where >= 0)) / max(group.channels, 1)
