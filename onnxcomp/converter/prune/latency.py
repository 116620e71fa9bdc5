"""``--prune-latency``: kept channel counts the target's convolution kernels run fast.

For each prunable group, every Conv that reads or writes its channels is timed (through the
kernel latency lookup of :mod:`onnxcomp.backends.kernel_latency`, cached on disk) at each
candidate kept count, the other channel counts as they are. A count is *fast* when the
group's summed latency there is below that of every larger candidate by at least
``FAST_MARGIN`` (NetAdapt's lookup, used as a filter): keeping more channels that run no
slower is free accuracy, keeping fewer that run no faster is lost accuracy for nothing.
The sensitivity scan's levels (and ``--prune R``) then round to the nearest fast count; the
MACs target is still met by the allocation, which counts the rounded channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnxcomp.backends.kernel_latency import ConvGeometry, KernelLatency
from onnxcomp.converter.prune.channels import ChannelAnalysis, ChannelGroup
from onnxcomp.core.geometry import conv_geometry
from onnxcomp.core.graph import attr_int

# A smaller count must run at least this much faster than every larger one to be kept.
FAST_MARGIN = 0.03


@dataclass(frozen=True)
class _Layer:
    """A Conv touching a group: its geometry and how many of its in/out channels the group
    holds (each kept count k replaces them by k x that share)."""

    geometry: ConvGeometry
    share_in: float
    share_out: float

    def at(self, removed: int) -> ConvGeometry:
        g = self.geometry
        return ConvGeometry(
            max(1, g.in_channels - round(removed * self.share_in)),
            max(1, g.out_channels - round(removed * self.share_out)),
            g.kernel, g.stride, g.pad, g.height, g.width, g.batch,
        )  # fmt: skip


def _layer(node: ir.Node, batch: int) -> ConvGeometry | None:
    """The lookup's geometry of a plain 2-D Conv (square kernel and stride, equal pads,
    no dilation, group 1, known input size), else None (not timed)."""
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    if node.op_type != "Conv" or weight is None or len(weight.shape) != 4:
        return None
    if attr_int(node, "group", 1) != 1:
        return None
    out_channels, in_channels, kh, kw = (int(d) for d in weight.shape)
    found = conv_geometry(node, (kh, kw))
    if isinstance(found, str) or kh != kw or found.dilations != (1, 1):
        return None
    if len(set(found.strides)) != 1 or len(set(found.pads)) != 1:
        return None
    h, w = found.in_hw
    return ConvGeometry(in_channels, out_channels, kh, found.strides[0], found.pads[0], h, w, batch)


def group_layers(analysis: ChannelAnalysis, group: ChannelGroup, batch: int) -> list[_Layer]:
    """The timed Convs that read or write the group's channels."""
    spaces = set(group.spaces)
    share = {s: float((analysis.positions(group, s) >= 0).sum()) / group.channels for s in spaces}
    out = []
    for node, _macs, space_in, space_out in analysis.layer_macs():
        if space_in not in spaces and space_out not in spaces:
            continue
        geometry = _layer(node, batch)
        if geometry is not None:
            out.append(
                _Layer(geometry, share.get(space_in, 0.0), share.get(space_out, 0.0))  # type: ignore[arg-type]
            )
    return out


def fast_counts(
    analysis: ChannelAnalysis,
    group: ChannelGroup,
    candidates: list[int],
    lookup: KernelLatency,
    precision: str,
    batch: int,
) -> tuple[list[int], dict[int, float]]:
    """The fast kept counts among ``candidates`` (the group's full count always), and the
    measured seconds of the group's Convs at each candidate (empty when none is timed)."""
    channels = group.channels
    counts = sorted({c for c in candidates if 1 <= c < channels} | {channels})
    layers = group_layers(analysis, group, batch)
    if not layers:
        return counts, {}
    geometries = [layer.at(channels - count) for count in counts for layer in layers]
    times = lookup.many(geometries, precision)  # one call: its rounds interleave the counts
    n = len(layers)
    seconds = {count: sum(times[i * n : (i + 1) * n]) for i, count in enumerate(counts)}
    fast, best_above = [], float("inf")
    for count in reversed(counts):
        if count == channels or seconds[count] <= (1.0 - FAST_MARGIN) * best_above:
            fast.append(count)
        best_above = min(best_above, seconds[count])
    return sorted(fast), seconds


def nearest(counts: list[int], keep: int) -> int:
    """The count in ``counts`` nearest ``keep`` (the larger one on a tie)."""
    return min(counts, key=lambda c: (abs(c - keep), -c))
