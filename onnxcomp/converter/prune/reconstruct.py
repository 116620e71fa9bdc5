"""What a reading layer does when its input channels go: ThiNet's least-squares rescaling,
the whole-layer refit on its input Gram matrix, and bias compensation by input means."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.converter.prune.channels import ChannelAnalysis, Consumer, ParamEdit, Space
from onnxcomp.converter.prune.samplers import ReaderStats
from onnxcomp.core.graph import set_constant
from onnxcomp.stats.gram import ConvPatchGram, InputGram


def least_squares_scales(contributions: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """w minimising ||y - sum_{c kept} w_c x_c||^2 with y = sum_c x_c (ThiNet's w step)."""
    x = np.asarray(contributions, np.float64)
    target = x.sum(axis=1)
    scales, *_ = np.linalg.lstsq(x[:, kept], target, rcond=None)
    return scales


def adjust_readers(
    analysis: ChannelAnalysis,
    removed: dict[Space, np.ndarray],
    stats: dict[str, ReaderStats],
    reconstruct: bool,
    compensate: bool,
) -> None:
    """Before the columns go: each reading layer rescales its kept inputs (least squares on
    its samples) and its bias absorbs the mean of what is removed."""
    for consumer in analysis.consumers:
        gone = removed.get(consumer.space)
        entry = stats.get(consumer.node.name or "")
        if gone is None or entry is None:
            continue
        had_bias = consumer.bias is not None
        _adjust_reader(consumer, gone, entry, analysis, reconstruct, compensate)
        if not had_bias and consumer.bias is not None:
            _prune_new_bias_with_its_rows(analysis, consumer)


def _prune_new_bias_with_its_rows(analysis: ChannelAnalysis, consumer: Consumer) -> None:
    """A bias created for a reader that also loses output rows (it produces a pruned space)
    must lose the same entries: register it like the biases the analysis found."""
    for producer in analysis.producers:
        if producer.node is consumer.node and consumer.bias is not None:
            analysis.params.append(ParamEdit(consumer.bias, 0, producer.space))
            return


def _adjust_reader(
    consumer: Consumer,
    gone: np.ndarray,
    entry: ReaderStats,
    analysis: ChannelAnalysis,
    reconstruct: bool,
    compensate: bool,
) -> None:
    """One reader of :func:`adjust_readers`."""
    weight = consumer.weight_array().astype(np.float64)
    if reconstruct and entry.gram is not None and entry.gram.rows:
        refit_reader(consumer, weight, gone, entry.gram, with_bias=compensate)
        return
    new = weight.copy()
    roots = analysis.roots(consumer.space)
    if reconstruct and entry.sampler is not None and len(entry.sampler.rows):
        gone_roots = set(int(r) for r in roots[gone])
        kept = np.array([int(r) not in gone_roots for r in entry.classes])
        if kept.any():
            scales = least_squares_scales(entry.sampler.rows, np.flatnonzero(kept))
            by_root = dict(zip(entry.classes[kept].tolist(), scales, strict=True))
            per_channel = np.array([by_root.get(int(r), 1.0) for r in roots])
            shape = [1] * weight.ndim
            shape[consumer.axis] = -1
            new = new * per_channel.reshape(shape)
    index = [slice(None)] * weight.ndim
    index[consumer.axis] = gone
    new[tuple(index)] = 0.0
    if compensate and entry.mean.count and entry.mean.mean.shape == (consumer.space.size,):
        _compensate_bias(consumer, weight, new, entry.mean.mean)
    set_constant(consumer.weight, new.astype(consumer.weight_array().dtype))


def refit_reader(
    consumer: Consumer,
    weight: np.ndarray,
    gone: np.ndarray,
    gram: ConvPatchGram | InputGram,
    with_bias: bool = True,
) -> None:
    """Refit a reading layer on what is kept: with x~ = [x; 1] its input features and a
    constant, [W', b'] = [W, b] G~[:, K] G~[K, K]^-1 over the kept features K (and the
    constant), G~ = E[x~ x~^T]: the least-squares fit of the original output, bias included
    unless ``with_bias`` is False (then the bias stays). A MatMul has no bias to refit."""
    n = float(gram.rows)
    features = gram.gram.shape[0]
    augmented = np.zeros((features + 1, features + 1))
    augmented[:features, :features] = gram.gram / n
    augmented[:features, features] = augmented[features, :features] = gram.total / n
    augmented[features, features] = 1.0
    matrix = consumer.as_matrix(weight)  # (outputs, features)
    per_channel = int(np.prod(weight.shape[2:])) if consumer.kind == "conv" else 1
    bias = np.zeros(matrix.shape[0])
    if consumer.bias is not None:
        bias = bias_array(consumer).reshape(-1)
        if bias.size != matrix.shape[0]:
            return  # a broadcast bias: leave the layer as it is
    full = np.concatenate([matrix, bias[:, None]], axis=1)
    removed = np.zeros(features + 1, bool)
    for channel in gone:
        removed[channel * per_channel : (channel + 1) * per_channel] = True
    with_bias = with_bias and (consumer.node.op_type != "MatMul" or consumer.bias is not None)
    if not with_bias:
        removed[features] = True
    kept = np.flatnonzero(~removed)
    system = augmented[np.ix_(kept, kept)]
    ridge = 1e-6 * float(np.trace(system)) / len(kept)
    solved = np.linalg.solve(system + ridge * np.eye(len(kept)), (full @ augmented[:, kept]).T).T
    new_full = np.zeros_like(full)
    new_full[:, kept] = solved
    new_matrix = new_full[:, :features]
    dtype = consumer.weight_array().dtype
    new_weight = consumer.from_matrix(new_matrix, weight.shape)
    set_constant(consumer.weight, new_weight.astype(dtype))
    if with_bias:
        set_bias(consumer, new_full[:, features].astype(dtype))


def bias_array(consumer: Consumer) -> np.ndarray:
    """The reading layer's bias in float64 (it has one)."""
    return consumer.bias.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]


def set_bias(consumer: Consumer, values: np.ndarray) -> None:
    """Give the reading layer this bias (creating the input when it has none)."""
    node = consumer.node
    if consumer.bias is not None:
        shape = consumer.bias.const_value.numpy().shape  # type: ignore[union-attr]
        consumer.bias.const_value = ir.tensor(values.reshape(shape), name=consumer.bias.name)
        return
    value = ir.Value(name=f"{node.name}.pruned_bias")
    value.const_value = ir.tensor(values)
    node.graph.register_initializer(value)  # type: ignore[union-attr]
    node.resize_inputs(3)
    node.replace_input_with(2, value)
    consumer.bias = value


def _compensate_bias(
    consumer: Consumer, old: np.ndarray, new: np.ndarray, input_mean: np.ndarray
) -> None:
    """Add the expected output change, sum over inputs (and kernel) of (W_old - W_new) x
    E[input channel], to the bias (zero padding at the borders is ignored). A MatMul without
    a following bias has nowhere to put it and is left as it is."""
    diff = old - new
    if consumer.kind == "conv":
        diff = diff.sum(axis=(2, 3))  # (O, C)
    elif consumer.axis == 0:
        diff = diff.T  # (outputs, K)
    delta = diff @ input_mean
    dtype = consumer.weight_array().dtype
    if consumer.bias is not None:
        bias = bias_array(consumer)
        if bias.size == delta.size:
            set_bias(consumer, (bias.reshape(-1) + delta).astype(dtype))
        return
    if consumer.node.op_type != "MatMul":
        set_bias(consumer, delta.astype(dtype))
