"""Pruning's last step: refit every layer, in graph order, on the pruned model's own inputs.

ThiNet's reconstruction fits each reading layer's kept weights to its original output as if
the rest of its input were unchanged; once every group is pruned it is not (the layers above
lost channels too). For every Conv (group 1), Gemm and MatMul with at most ``max_features``
inputs, in graph order, the original and the pruned model run side by side over (a slice of)
the calibration data (one ONNX Runtime session on a model holding both graphs), collecting at
the same
sampled positions G = E[x~_p x~_p^T] (the pruned model's input patches and a constant) and
C = E[x~_o x~_p^T] (the original model's patches against them). Then
[W', b'] = [W, b]_(kept rows) C G^-1 is the least-squares fit of the original layer's output
from the input the pruned layer actually gets, after the layers above were refitted (He et
al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks", reconstruct layer by
layer). One data pass per layer: ``refit_samples`` bounds its cost. Memory: two
(features + 1)^2 matrices at a time, whatever the data size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxcomp.converter.prune.channels import ChannelAnalysis, Consumer, Space
from onnxcomp.converter.prune.reconstruct import set_bias
from onnxcomp.core.geometry import ConvGeometry, conv_geometry, patches_at
from onnxcomp.core.graph import set_constant

PREFIX = "pruned/"
# Ridge of the layer-by-layer fit, relative to the mean diagonal of the Gram matrix.
RIDGE = 1e-6


def side_by_side(original: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """One model computing both graphs from the same inputs (the pruned one prefixed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(pruned)
    del copy.graph.value_info[:]
    prefixed = onnx.compose.add_prefix(copy, PREFIX)
    feeds = [
        helper.make_node("Identity", [i.name], [PREFIX + i.name], name=f"{PREFIX}feed/{i.name}")
        for i in original.graph.input
    ]
    graph = helper.make_graph(
        [*original.graph.node, *feeds, *prefixed.graph.node],
        "side_by_side",
        list(original.graph.input),
        [*original.graph.output, *prefixed.graph.output],
        [*original.graph.initializer, *prefixed.graph.initializer],
    )
    model = helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    return model


class PairedGram:
    """Statistics of one layer: fed the original input, then the pruned one, per run."""

    def __init__(
        self, geometry: ConvGeometry | None, features: tuple[int, int], per_image: int, seed: int
    ) -> None:
        self.geometry = geometry
        self.per_image = per_image
        self.rng = np.random.default_rng(seed)
        original, pruned = features
        self.gram = np.zeros((pruned + 1, pruned + 1))
        self.cross = np.zeros((original + 1, pruned + 1))
        self.rows = 0
        self._original: np.ndarray | None = None
        # Residual target: the original sum's kept channels minus the pruned other addend.
        self.kept_rows: np.ndarray | None = None
        self.target_cross: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._other: np.ndarray | None = None

    def original(self, values: np.ndarray) -> None:
        self._original = np.asarray(values, np.float64)

    def residual(self, kept_rows: np.ndarray) -> None:
        """Fit the layer to (original sum) - (pruned other addend) instead of its own output."""
        self.kept_rows = kept_rows
        self.target_cross = np.zeros((len(kept_rows), self.gram.shape[0]))

    def original_sum(self, values: np.ndarray) -> None:
        self._sum = np.asarray(values, np.float64)

    def pruned_other(self, values: np.ndarray) -> None:
        self._other = np.asarray(values, np.float64)

    def pruned(self, values: np.ndarray) -> None:
        x_o, self._original = self._original, None
        x_p = np.asarray(values, np.float64)
        if x_o is None:
            return
        target = None
        if self.geometry is None:
            rows_o, rows_p = x_o.reshape(len(x_o), -1), x_p.reshape(len(x_p), -1)
            if self.kept_rows is not None and self._sum is not None and self._other is not None:
                target = self._sum[:, self.kept_rows] - self._other
        else:
            g = self.geometry
            positions = g.out_hw[0] * g.out_hw[1]
            count = len(x_o) * min(self.per_image, positions)
            image = np.repeat(np.arange(len(x_o)), count // len(x_o))
            flat = self.rng.integers(0, positions, count)
            rows_o = patches_at(g.pad(x_o), g, image, flat)
            rows_p = patches_at(g.pad(x_p), g, image, flat)
            if self.kept_rows is not None and self._sum is not None and self._other is not None:
                oy, ox = np.divmod(flat, g.out_hw[1])
                at_sum = self._sum[image, :, oy, ox][:, self.kept_rows]
                target = at_sum - self._other[image, :, oy, ox]
        ones = np.ones((len(rows_p), 1))
        rows_o = np.concatenate([rows_o, ones], axis=1)
        rows_p = np.concatenate([rows_p, ones], axis=1)
        self.gram += rows_p.T @ rows_p
        self.cross += rows_o.T @ rows_p
        if target is not None and self.target_cross is not None:
            self.target_cross += target.T @ rows_p
        self.rows += len(rows_p)
        self._sum = self._other = None


class _Port:
    def __init__(self, update: Callable[[np.ndarray], None]) -> None:
        self.update = update


def refit_on_pruned(
    original: onnx.ModelProto,
    model: ir.Model,
    analysis: ChannelAnalysis,
    removed: dict[Space, np.ndarray],
    run_pass: Callable[[ir.Model, dict[str, list]], None],
    per_image: int,
    max_features: int,
    seed: int = 0,
    with_bias: bool = True,
    residual: bool = True,
) -> int:
    """Refit the layers of the pruned ``model`` one after the other; ``run_pass(model,
    observers)`` runs one pass over the calibration data. Returns how many were refitted."""
    initial = {t.name: t for t in original.graph.initializer}
    stats: dict[int, tuple[Consumer, PairedGram]] = {}
    for i, consumer in enumerate(analysis.consumers):
        weight = consumer.weight.const_value.numpy()  # type: ignore[union-attr]
        features = consumer.as_matrix(weight).shape[1]
        before = initial.get(consumer.weight.name or "")
        if before is None or features > max_features:
            continue
        old_features = consumer.as_matrix(onnx.numpy_helper.to_array(before)).shape[1]
        geometry = None
        if consumer.kind == "conv":
            found = conv_geometry(consumer.node, weight.shape[2:])
            if isinstance(found, str):
                continue
            geometry = found
        stats[i] = (consumer, PairedGram(geometry, (old_features, features), per_image, seed + i))
    done = 0
    for consumer, paired in stats.values():  # graph order: each layer sees its final inputs
        name = consumer.space.name
        observers: dict[str, list] = {name: [_Port(paired.original)]}
        addend = _residual_addend(consumer) if residual else None
        if addend is not None:
            total, other = addend
            paired.residual(_kept_rows(consumer, initial, analysis, removed))
            observers.setdefault(total, []).append(_Port(paired.original_sum))
            observers.setdefault(PREFIX + other, []).append(_Port(paired.pruned_other))
        observers.setdefault(PREFIX + name, []).append(_Port(paired.pruned))  # last of a run
        run_pass(ir.from_proto(side_by_side(original, ir.to_proto(model))), observers)
        if paired.rows:
            _refit(consumer, paired, initial, analysis, removed, with_bias)
            done += 1
    return done


def _refit(
    consumer: Consumer,
    paired: PairedGram,
    initial: dict[str, onnx.TensorProto],
    analysis: ChannelAnalysis,
    removed: dict[Space, np.ndarray],
    with_bias: bool,
) -> None:
    old = onnx.numpy_helper.to_array(initial[consumer.weight.name or ""]).astype(np.float64)
    matrix = consumer.as_matrix(old)
    bias = np.zeros(matrix.shape[0])
    if consumer.bias is not None and consumer.bias.name in initial:
        bias = onnx.numpy_helper.to_array(initial[consumer.bias.name]).astype(np.float64)
        if bias.size != matrix.shape[0]:
            return
        bias = bias.reshape(-1)
    rows = _kept_rows(consumer, initial, analysis, removed)
    full = np.concatenate([matrix, bias[:, None]], axis=1)[rows]
    gram, cross = paired.gram / paired.rows, paired.cross / paired.rows
    if paired.target_cross is not None:  # fit [W', b'] x~_p to the residual target
        full, cross = (
            np.eye(len(rows) + 1)[:-1],
            np.concatenate([paired.target_cross / paired.rows, np.zeros((1, len(gram)))]),
        )
    with_bias = with_bias and (consumer.node.op_type != "MatMul" or consumer.bias is not None)
    if not with_bias:
        gram, cross, full = gram[:-1, :-1], cross[:-1, :-1], full[:, :-1]
    ridge = RIDGE * float(np.trace(gram)) / len(gram)
    solved = np.linalg.solve(gram + ridge * np.eye(len(gram)), (full @ cross).T).T
    current = consumer.weight.const_value.numpy()  # type: ignore[union-attr]
    new_matrix = solved[:, :-1] if with_bias else solved
    new_weight = consumer.from_matrix(new_matrix, current.shape)
    set_constant(consumer.weight, new_weight.astype(current.dtype))
    if with_bias:
        set_bias(consumer, solved[:, -1].astype(current.dtype))


def _kept_rows(
    consumer: Consumer,
    initial: dict[str, onnx.TensorProto],
    analysis: ChannelAnalysis,
    removed: dict[Space, np.ndarray],
) -> np.ndarray:
    """The layer's original output channels that the pruning kept."""
    old = initial[consumer.weight.name or ""]
    axis = 0 if consumer.kind == "conv" else (0 if consumer.axis == 1 else 1)
    outputs = int(old.dims[axis])
    out_space = analysis.spaces.get(consumer.node.outputs[0])
    gone = removed.get(out_space) if out_space is not None else None
    return np.setdiff1d(np.arange(outputs), gone if gone is not None else [])


def _residual_addend(consumer: Consumer) -> tuple[str, str] | None:
    """(sum, other addend) when the layer's output only feeds a two-input Add of activations."""
    output = consumer.node.outputs[0]
    uses = output.uses()
    if output.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    others = [v for v in add.inputs if v is not output]
    if len(add.inputs) != 2 or len(others) != 1 or others[0] is None:
        return None
    other = others[0]
    if other.const_value is not None or other.shape != output.shape:
        return None
    return add.outputs[0].name or "", other.name or ""
