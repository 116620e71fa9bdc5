"""Channel pruning of Conv -> [Relu | Clip] -> Conv pairs (``--prune``), first cut.

A prunable group is a Conv A (group 1) whose output goes, through at most one Relu or Clip,
into exactly one Conv B (group 1) and nowhere else. Removing output channel c of A (its weight
row and bias entry) and input channel c of B (its weight column) keeps the graph valid; every
other place where channels are tied (residual Adds, Concats, grouped or depthwise convs, shared
weights, graph outputs) is left alone and recorded with the reason.

Which channels stay:

* ``l1``: the A filters with the largest L1 norm (data-free).
* ``thinet`` (Luo et al. 2017, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
  Compression"): one pass over the calibration data samples, per image, random (position,
  output channel of B) pairs and their per-input-channel contributions
  x_c = sum over the kernel window of W_B[o, c] * input[c, window]. A greedy search picks the
  channel set T to remove that minimises ||sum_{c in T} x_c||^2; then each kept channel's B
  weights are scaled by w_c, the least-squares solution of min ||y - sum_{c kept} w_c x_c||^2
  with y = sum_c x_c. Samples are kept by reservoir sampling, at most ``max_samples`` per group.

MACs are counted per sample: symbolic dims (the batch) count as 1.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.calibration.histogram import ChannelMean
from onnxcomp.converter.analysis import conv_macs, format_count
from onnxcomp.converter.passes.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.passes.lowrank import ConvGeometry, conv_geometry
from onnxcomp.converter.qdq import QUANTIZED_OPS
from onnxcomp.errors import OnnxcompError

METHODS = ("l1", "thinet")
ACTIVATIONS = frozenset({"Relu", "Clip"})
_TIED = {
    "Add": "residual: channels tied",
    "Sum": "residual: channels tied",
    "Concat": "concat: channels tied",
}


@dataclass(frozen=True)
class PruneConfig:
    """Settings of the pruning pass.

    ``ratio``: fraction of each group's channels to remove, in (0, 1). ``method``: ``l1`` or
    ``thinet``. ``min_channels``: never keep fewer channels. ``exclude``: Conv A names (shell
    patterns) to leave alone. ``samples_per_image``: ThiNet samples per image and group;
    ``max_samples`` caps them (reservoir sampling). ``reconstruct``: ThiNet's least-squares
    rescaling of B's kept weights.
    """

    ratio: float = 0.5
    method: str = "l1"
    min_channels: int = 4
    exclude: tuple[str, ...] = ()
    samples_per_image: int = 10
    max_samples: int = 20_000
    reconstruct: bool = True
    compensate_bias: bool = True  # with calibration data: B's bias absorbs removed means
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise OnnxcompError(f"prune ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise OnnxcompError(f"prune method must be one of {METHODS}, got {self.method!r}")
        if self.min_channels < 1:
            raise OnnxcompError(f"min_channels must be at least 1, got {self.min_channels}")
        if self.samples_per_image < 1 or self.max_samples < 1:
            raise OnnxcompError("samples_per_image and max_samples must be at least 1")

    def keep_count(self, channels: int) -> int:
        """k = max(min_channels, round(C * (1 - ratio)))."""
        return max(self.min_channels, round(channels * (1.0 - self.ratio)))


@dataclass
class Group:
    """A prunable pair: Conv A, the optional activation between, Conv B."""

    name: str
    conv_a: ir.Node
    activation: ir.Node | None
    conv_b: ir.Node

    @property
    def channels(self) -> int:
        return int(self.conv_a.inputs[1].const_value.shape[0])  # type: ignore[union-attr]

    @property
    def link(self) -> ir.Value:
        """B's input: the value whose channels are pruned."""
        return self.conv_b.inputs[0]  # type: ignore[return-value]


@dataclass
class PrunedGroup:
    """What the pass did to one group; MACs are those of A and B together, per sample."""

    conv_a: str
    conv_b: str
    channels_before: int
    channels_after: int
    macs_before: int | None
    macs_after: int | None

    def describe(self) -> str:
        text = (
            f"Conv '{self.conv_a}' -> Conv '{self.conv_b}': channels "
            f"{self.channels_before} -> {self.channels_after}"
        )
        if self.macs_before and self.macs_after is not None:
            change = self.macs_after / self.macs_before - 1.0
            text += (
                f", MACs {format_count(self.macs_before)} -> "
                f"{format_count(self.macs_after)} ({change:+.0%})"
            )
        return text


# ---------------------------------------------------------------------------------------------
# Finding groups


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'"


def _group_attr(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return attr.as_int() if attr is not None else 1


def _weight_problem(node: ir.Node) -> str | None:
    """Why this Conv's weight (and bias) cannot be edited, or None."""
    for index, role in ((1, "weight"), (2, "bias")):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            if role == "weight":
                return f"{_label(node)} has no weight"
            continue
        if value.const_value is None or value.is_graph_input():
            return f"the {role} of {_label(node)} is not a constant initializer"
        if len(value.uses()) > 1:
            return f"the {role} '{value.name}' of {_label(node)} is shared by {len(value.uses())}"
        if not np.issubdtype(value.const_value.dtype.numpy(), np.floating):
            return f"the {role} of {_label(node)} is not floating point"
    if len(node.inputs[1].const_value.shape) != 4:  # type: ignore[union-attr]
        return f"{_label(node)} is not a 2-D convolution"
    return None


def _conv_problem(node: ir.Node) -> str | None:
    group = _group_attr(node)
    if group != 1:
        weight = node.inputs[1]
        depthwise = weight is not None and weight.shape is not None and weight.shape[1] == 1
        kind = "depthwise" if depthwise else "grouped"
        return f"{_label(node)} is a {kind} convolution (group={group})"
    return _weight_problem(node)


def _readers_problem(value: ir.Value, where: str) -> tuple[ir.Node | None, str | None]:
    """The single reader of ``value`` (input 0), or why there is not exactly one."""
    if value.is_graph_output():
        return None, f"output of {where} is a graph output"
    uses = value.uses()
    if not uses:
        return None, f"output of {where} is not read"
    readers = [use.node for use in uses]
    if len(uses) == 1:
        node, index = uses[0].node, uses[0].idx
        if index != 0:
            return None, f"output of {where} is input {index} of {_label(node)}"
        return node, None
    main = next((n for n in readers if n.op_type in ACTIVATIONS or n.op_type == "Conv"), None)
    others = [n for n in readers if n is not main] if main is not None else readers
    tag = _TIED.get(others[0].op_type, "channels tied")
    verb = "also feeds" if main is not None else "feeds"
    return None, f"output of {where} {verb} {', '.join(map(_label, others))} ({tag})"


def find_group(node: ir.Node) -> tuple[Group | None, str | None]:
    """The group starting at Conv ``node``, or why it is not prunable."""
    problem = _conv_problem(node)
    if problem:
        return None, problem
    where = _label(node)
    reader, problem = _readers_problem(node.outputs[0], where)
    if reader is None:
        return None, problem
    activation = None
    if reader.op_type in ACTIVATIONS and reader.domain in ("", "ai.onnx"):
        activation = reader
        where = f"{where} (via {_label(reader)})"
        reader, problem = _readers_problem(reader.outputs[0], where)
        if reader is None:
            return None, problem
    if reader.op_type != "Conv" or reader.domain not in ("", "ai.onnx"):
        tag = _TIED.get(reader.op_type)
        suffix = f" ({tag})" if tag else ""
        return None, f"output of {where} goes to {_label(reader)}, not a Conv{suffix}"
    problem = _conv_problem(reader)
    if problem:
        return None, f"{problem} (reads the output of {where})"
    channels = node.inputs[1].const_value.shape[0]  # type: ignore[union-attr]
    if reader.inputs[1].const_value.shape[1] != channels:  # type: ignore[union-attr]
        return None, f"{_label(reader)} does not read the {channels} channels of {where}"
    return Group(node.name or "", node, activation, reader), None


# ---------------------------------------------------------------------------------------------
# Choosing channels


def l1_keep(weight_a: np.ndarray, keep: int) -> np.ndarray:
    """Indices (sorted) of the ``keep`` filters of A with the largest L1 norm."""
    norms = np.abs(weight_a.reshape(weight_a.shape[0], -1)).sum(axis=1)
    return np.sort(np.argsort(-norms, kind="stable")[:keep])


def thinet_remove(contributions: np.ndarray, remove: int) -> np.ndarray:
    """ThiNet's greedy: the channel set T (sorted) minimising ||sum_{c in T} x_c||^2.

    ``contributions`` is (samples, C); T grows one channel at a time.
    """
    x = np.asarray(contributions, np.float64)
    total = np.zeros(x.shape[0])
    removed: list[int] = []
    available = np.ones(x.shape[1], bool)
    for _ in range(remove):
        candidates = np.flatnonzero(available)
        cost = np.square(total[:, None] + x[:, candidates]).sum(axis=0)
        best = int(candidates[int(np.argmin(cost))])
        removed.append(best)
        available[best] = False
        total += x[:, best]
    return np.sort(np.asarray(removed, np.int64))


def least_squares_scales(contributions: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """w minimising ||y - sum_{c kept} w_c x_c||^2 with y = sum_c x_c (ThiNet's w step)."""
    x = np.asarray(contributions, np.float64)
    target = x.sum(axis=1)
    scales, *_ = np.linalg.lstsq(x[:, kept], target, rcond=None)
    return scales


class ContributionSampler:
    """Observer of B's input: sampled per-channel contributions x_c to B's outputs.

    For each image, ``per_image`` random (output channel, output position) pairs give a row
    x (length C) with x_c = sum_window W_B[o, c] * input[c, window]. At most ``cap`` rows are
    kept, uniformly over all rows seen (reservoir sampling).
    """

    def __init__(
        self, weight_b: np.ndarray, geometry: ConvGeometry, per_image: int, cap: int, seed: int
    ) -> None:
        self.weight = np.asarray(weight_b, np.float64)
        self.geometry = geometry
        self.per_image = per_image
        self.cap = cap
        self.rng = np.random.default_rng(seed)
        self.rows = np.zeros((0, self.weight.shape[1]))
        self.seen = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        g = self.geometry
        top, left, bottom, right = g.pads
        padded = np.pad(values, ((0, 0), (0, 0), (top, bottom), (left, right)))
        ho, wo = _out_hw(values.shape[2:], g)
        n = values.shape[0] * self.per_image
        image = np.repeat(np.arange(values.shape[0]), self.per_image)
        out_ch = self.rng.integers(0, self.weight.shape[0], n)
        oy, ox = self.rng.integers(0, ho, n), self.rng.integers(0, wo, n)
        kh, kw = self.weight.shape[2:]
        rows = oy[:, None] * g.strides[0] + np.arange(kh) * g.dilations[0]
        cols = ox[:, None] * g.strides[1] + np.arange(kw) * g.dilations[1]
        channels = np.arange(values.shape[1])
        patch = padded[
            image[:, None, None, None],
            channels[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]  # (n, C, kh, kw)
        self._add(np.einsum("sckl,sckl->sc", patch, self.weight[out_ch]))

    def _add(self, rows: np.ndarray) -> None:
        free = max(0, min(self.cap - len(self.rows), len(rows)))
        if free:
            self.rows = np.concatenate([self.rows, rows[:free]])
        for offset, row in enumerate(rows[free:]):
            slot = int(self.rng.integers(0, self.seen + free + offset + 1))
            if slot < self.cap:
                self.rows[slot] = row
        self.seen += len(rows)


def _out_hw(in_hw: tuple[int, ...], g: ConvGeometry) -> tuple[int, int]:
    sizes = []
    for axis in (0, 1):
        extent = g.dilations[axis] * (g.kernel[axis] - 1) + 1
        padded = in_hw[axis] + g.pads[axis] + g.pads[axis + 2]
        sizes.append((padded - extent) // g.strides[axis] + 1)
    return sizes[0], sizes[1]


# ---------------------------------------------------------------------------------------------
# Graph edits


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()  # type: ignore[union-attr]


def _set_array(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def _set_channels(value: ir.Value, channels: int) -> None:
    if value.shape is not None and value.shape.rank() >= 2:
        dims = list(value.shape)
        dims[1] = channels
        value.shape = ir.Shape(dims)


def _conv_macs(node: ir.Node, weight_shape: tuple[int, ...]) -> int | None:
    """MACs of a Conv with this weight shape (per sample), or None if its output is unknown."""
    shape = node.outputs[0].shape
    if shape is None or shape.rank() != 4 or not all(shape.is_static(i) for i in (2, 3)):
        return None
    out = (1, weight_shape[0], int(shape[2]), int(shape[3]))
    return conv_macs(out, weight_shape)


def _pair_macs(group: Group, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> int | None:
    a, b = _conv_macs(group.conv_a, shape_a), _conv_macs(group.conv_b, shape_b)
    return None if a is None or b is None else a + b


def compensate_bias(
    conv_b: ir.Node, old_weight: np.ndarray, new_full: np.ndarray, input_mean: np.ndarray
) -> None:
    """Add B's expected output change to its bias: sum over inputs and kernel of
    (W_old - W_new) x E[input channel] (zero padding at the borders is ignored)."""
    delta = np.einsum(
        "oc,c->o",
        (old_weight.astype(np.float64) - new_full).sum(axis=(2, 3)),
        input_mean.astype(np.float64),
    )
    if len(conv_b.inputs) > 2 and conv_b.inputs[2] is not None:
        bias = _array(conv_b.inputs[2]).astype(np.float64)
        _set_array(conv_b.inputs[2], (bias + delta).astype(old_weight.dtype))
        return
    value = ir.Value(name=f"{conv_b.name}.pruned_bias")
    value.const_value = ir.tensor(delta.astype(old_weight.dtype))
    conv_b.graph.register_initializer(value)
    conv_b.resize_inputs(3)
    conv_b.replace_input_with(2, value)


def prune_group(
    group: Group,
    kept: np.ndarray,
    scales: np.ndarray | None = None,
    input_mean: np.ndarray | None = None,
) -> PrunedGroup:
    """Keep A's output channels ``kept`` (and B's matching inputs, times ``scales``); with
    ``input_mean`` (B's per-channel input mean), B's bias absorbs the mean of what was removed."""
    a, b = group.conv_a, group.conv_b
    weight_a, weight_b = _array(a.inputs[1]), _array(b.inputs[1])  # type: ignore[arg-type]
    before = _pair_macs(group, weight_a.shape, weight_b.shape)
    new_a = np.ascontiguousarray(weight_a[kept])
    new_b = np.ascontiguousarray(weight_b[:, kept])
    if scales is not None:
        new_b = (new_b * scales.reshape(1, -1, 1, 1)).astype(weight_b.dtype)
    if input_mean is not None and input_mean.shape == (weight_b.shape[1],):
        full = np.zeros(weight_b.shape, np.float64)
        full[:, kept] = new_b
        compensate_bias(b, weight_b, full, input_mean)
    _set_array(a.inputs[1], new_a)  # type: ignore[arg-type]
    _set_array(b.inputs[1], new_b)  # type: ignore[arg-type]
    if len(a.inputs) > 2 and a.inputs[2] is not None:
        _set_array(a.inputs[2], np.ascontiguousarray(_array(a.inputs[2])[kept]))
    _set_channels(a.outputs[0], len(kept))
    if group.activation is not None:
        _set_channels(group.activation.outputs[0], len(kept))
    after = _pair_macs(group, new_a.shape, new_b.shape)
    channels = weight_a.shape[0]
    return PrunedGroup(a.name or "", b.name or "", channels, len(kept), before, after)


# ---------------------------------------------------------------------------------------------
# The pass


def _check_not_quantized(model: ir.Model) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in QUANTIZED_OPS:
            raise OnnxcompError(
                f"pruning needs a float model, this one is quantized ({node.op_type} found): "
                "prune before --int8"
            )


class PrunePass(CompressionPass):
    """Remove channels between Conv -> [Relu | Clip] -> Conv pairs (``l1`` or ``thinet``).

    Rules:

    1. A group is a 2-D Conv A (group 1) whose output, optionally through one Relu or Clip,
       is read only by input 0 of one 2-D Conv B (group 1), and is not a graph output. A's
       weight and bias and B's weight must be float constant initializers used only there.
    2. Each group keeps max(min_channels, round(C (1 - ratio))) channels; groups that would
       keep all are skipped. Every other Conv is recorded in ``record.skipped`` with why.
    3. ``thinet`` needs calibration data (``context.calibration``); all groups are sampled
       in one pass over it, on the unpruned model.
    4. Quantized models are refused. Only the main graph is visited.
    """

    name = "prune"
    lossless = False
    min_opset = 7

    def __init__(self, config: PruneConfig | None = None, context: PassContext | None = None):
        super().__init__(context)
        self.config = config or PruneConfig()
        self.groups: list[PrunedGroup] = []
        # ThiNet: per group, (samples kept, samples seen).
        self.samples: dict[str, tuple[int, int]] = {}

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.groups = []
        self.samples = {}
        _check_not_quantized(model)
        graph = model.graph
        convs = [n for n in graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]
        if not convs:
            record.summary = "no Conv in the graph"
            return
        ir_passes.ShapeInferencePass()(model)
        groups: list[Group] = []
        for index, node in enumerate(convs):
            if not node.name:
                node.name = f"Conv_{index}"
            if any(fnmatch.fnmatchcase(node.name, p) for p in self.config.exclude):
                record.skipped.append(Skipped(node.name, f"{_label(node)} is excluded"))
                continue
            group, problem = find_group(node)
            if group is None:
                record.skipped.append(Skipped(node.name, problem or "not prunable"))
                continue
            if self.config.keep_count(group.channels) >= group.channels:
                reason = f"{_label(node)} has {group.channels} channels, would keep all"
                record.skipped.append(Skipped(node.name, reason))
                continue
            groups.append(group)
        samplers, means = self._sample(model, groups, record)
        for group in groups:
            if self.config.method == "thinet" and group.name not in samplers:
                continue
            mean = means.get(group.link.name or "")
            done = self._prune(group, samplers.get(group.name), mean)
            self.groups.append(done)
            record.changes.append(done.describe())
        record.summary = self._summary(len(convs))

    def _prune(
        self, group: Group, sampler: ContributionSampler | None, mean: ChannelMean | None
    ) -> PrunedGroup:
        channels = group.channels
        keep = self.config.keep_count(channels)
        usable = mean is not None and mean.count and self.config.compensate_bias
        input_mean = mean.mean if usable else None
        if sampler is None:
            kept = l1_keep(_array(group.conv_a.inputs[1]), keep)  # type: ignore[arg-type]
            return prune_group(group, kept, input_mean=input_mean)
        self.samples[group.name] = (len(sampler.rows), sampler.seen)
        removed = thinet_remove(sampler.rows, channels - keep)
        kept = np.setdiff1d(np.arange(channels), removed)
        scales = least_squares_scales(sampler.rows, kept) if self.config.reconstruct else None
        return prune_group(group, kept, scales, input_mean)

    def _sample(
        self, model: ir.Model, groups: list[Group], record: PassRecord
    ) -> tuple[dict[str, ContributionSampler], dict[str, ChannelMean]]:
        """From one pass over the calibration data (when there is some): ThiNet samples of
        every group and the per-channel means of B's inputs (for the bias compensation)."""
        from onnxcomp.backends.inputs import input_specs
        from onnxcomp.calibration.collector import collect_statistics
        from onnxcomp.converter.verify import sample_batches

        context = self.context
        thinet = self.config.method == "thinet"
        if not groups or (context.calibration is None and not thinet):
            return {}, {}
        if context.calibration is None:
            raise OnnxcompError("prune method 'thinet' needs calibration data (--calib DIR)")
        samplers: dict[str, ContributionSampler] = {}
        means = {group.link.name or "": ChannelMean() for group in groups}
        observers: dict[str, list] = {name: [mean] for name, mean in means.items()}
        for i, group in enumerate(groups if thinet else []):
            weight_b = _array(group.conv_b.inputs[1])  # type: ignore[arg-type]
            geometry = conv_geometry(group.conv_b, weight_b.shape[2:])
            if isinstance(geometry, str):
                record.skipped.append(Skipped(group.name, f"{_label(group.conv_b)}: {geometry}"))
                continue
            sampler = ContributionSampler(
                weight_b,
                geometry,
                self.config.samples_per_image,
                self.config.max_samples,
                self.config.seed + i,
            )
            samplers[group.name] = sampler
            observers.setdefault(group.link.name or "", []).append(sampler)
        if thinet and not samplers:
            return {}, {}
        batches, description, count = sample_batches(
            input_specs(ir.to_proto(model)), context.calibration
        )
        context.task(f"pruning statistics on {description}", count)
        collect_statistics(
            model, [], batches, context.session, on_batch=context.advance, observers=observers
        )
        return samplers, means

    def _summary(self, total: int) -> str:
        if not self.groups:
            return f"no channel pruned ({total} Conv(s) considered)"
        channels = sum(g.channels_before for g in self.groups)
        kept = sum(g.channels_after for g in self.groups)
        text = (
            f"pruned {len(self.groups)} group(s) with {self.config.method}: "
            f"channels {channels} -> {kept}"
        )
        known = [g for g in self.groups if g.macs_before and g.macs_after is not None]
        if len(known) == len(self.groups):
            before = sum(g.macs_before or 0 for g in known)
            after = sum(g.macs_after or 0 for g in known)
            text += f", their MACs {format_count(before)} -> {format_count(after)}"
        return text
