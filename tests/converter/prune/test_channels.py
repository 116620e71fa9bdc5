"""Channel dependency analysis: groups through Concat/Split/Slice/Pad/Flatten/Mul, removal.

Removal is checked against the original model's outputs: the channels to remove are first
made exactly zero (their producers' rows, biases and per-channel parameters), so deleting them
must leave every output unchanged; any index mistake in Concat offsets, Split sizes, Slice
bounds, Pad amounts or Gemm columns shows up as a difference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

from onnxcomp.converter.prune import PruneConfig, PrunePass
from onnxcomp.converter.prune.channels import ChannelAnalysis, ChannelGroup, prepare_analysis
from onnxcomp.core.analysis import summarize

RNG = np.random.default_rng(0)


def w(*shape: int) -> np.ndarray:
    return RNG.normal(0, 0.5, shape).astype(np.float32)


def conv(name: str, x: str, y: str, weight: str, bias: str | None = None, **attrs):
    inputs = [x, weight] + ([bias] if bias else [])
    return helper.make_node("Conv", inputs, [y], name=name, pads=[1] * 4, **attrs)


def by_producer(name: str) -> Callable[[ChannelAnalysis], ChannelGroup]:
    def pick(analysis: ChannelAnalysis) -> ChannelGroup:
        return next(g for g in analysis.groups if name in g.names)

    return pick


def _zero(analysis: ChannelAnalysis, classes: set[int]) -> None:
    """Make the chosen classes exactly zero: producer rows, biases, per-channel params."""
    edits = [(p.weight, p.axis, p.space) for p in analysis.producers]
    edits += [(e.value, e.axis, e.space) for e in analysis.params]
    for value, axis, space in edits:
        roots = analysis.roots(space)
        index = np.flatnonzero([int(r) in classes for r in roots])
        array = value.const_value.numpy().copy()
        if index.size and array.shape[axis] == space.size:
            np.moveaxis(array, axis, 0)[index] = 0.0
            value.const_value = ir.tensor(array, name=value.name)


def part(name: str, channels: int, tensors: int | None = None):
    """The group of ``name``'s channels with this many channels (and tensors)."""

    def pick(analysis: ChannelAnalysis) -> ChannelGroup:
        return next(
            g
            for g in analysis.groups
            if name in g.names
            and g.channels == channels
            and (tensors is None or len(g.spaces) == tensors)
        )

    return pick


def remove_zeroed(
    model: onnx.ModelProto, picks: list[tuple[Callable[[ChannelAnalysis], ChannelGroup], int]]
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(zeroed model, zeroed model with those channels removed) for the first k classes of
    each picked group."""
    ir_model = ir.from_proto(model)
    analysis = prepare_analysis(ir_model)
    classes: list[int] = []
    for pick, k in picks:
        group = pick(analysis)
        assert group.blocked is None, group.blocked
        classes += [int(c) for c in group.classes[:k]]
    _zero(analysis, set(classes))
    zeroed = ir.to_proto(ir_model)
    copy = ir.from_proto(zeroed)
    prepare_analysis(copy).remove(classes)
    pruned = ir.to_proto(copy)
    onnx.checker.check_model(pruned, full_check=True)
    return zeroed, pruned


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    x = RNG.normal(0, 1, shape).astype(np.float32)
    name = a.graph.input[0].name
    for got, ref in zip(run(b, {name: x}), run(a, {name: x}), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def ints(model: onnx.ModelProto, name: str) -> list[int]:
    init = next(t for t in model.graph.initializer if t.name == name)
    return onnx.numpy_helper.to_array(init).tolist()


def test_concat_offsets():
    nodes = [
        conv("A", "x", "a", "wa", "ba"),
        helper.make_node("Relu", ["a"], ["ra"], name="RA"),
        conv("B", "x", "b", "wb"),
        helper.make_node("Concat", ["ra", "b"], ["cat"], name="Cat", axis=1),
        conv("C", "cat", "y", "wc"),
    ]
    inits = [
        tensor("wa", w(6, 4, 3, 3)),
        tensor("ba", w(6)),
        tensor("wb", w(5, 4, 3, 3)),
        tensor("wc", w(3, 11, 3, 3)),
    ]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], ["y"], inits)
    analysis = prepare_analysis(ir.from_proto(model))
    assert sorted(g.channels for g in analysis.groups if g.producers) == [3, 5, 6]
    zeroed, pruned = remove_zeroed(model, [(by_producer("A"), 2), (by_producer("B"), 3)])
    assert weights(pruned)["wc"] == (3, 6, 3, 3)
    assert_same_outputs(zeroed, pruned, (2, 4, 6, 6))


def test_split_sizes_follow():
    nodes = [
        conv("A", "x", "a", "wa"),
        helper.make_node("Split", ["a", "sizes"], ["s1", "s2"], name="S", axis=1),
        conv("B", "s1", "y1", "wb"),
        conv("C", "s2", "y2", "wc"),
    ]
    inits = [
        tensor("wa", w(8, 4, 3, 3)),
        tensor("sizes", np.array([3, 5], np.int64)),
        tensor("wb", w(2, 3, 3, 3)),
        tensor("wc", w(2, 5, 3, 3)),
    ]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], ["y1", "y2"], inits)
    analysis = prepare_analysis(ir.from_proto(model))
    sizes = sorted(g.channels for g in analysis.groups if "A" in g.names)
    assert sizes == [3, 5]  # the two halves are separate decisions
    first, second = part("A", 3), part("A", 5)
    zeroed, pruned = remove_zeroed(model, [(first, 1), (second, 2)])
    assert ints(pruned, "sizes") == [2, 3]
    assert weights(pruned)["wa"] == (5, 4, 3, 3)
    assert_same_outputs(zeroed, pruned, (2, 4, 6, 6))


def test_slice_on_channels_moves_its_bounds():
    nodes = [
        conv("A", "x", "a", "wa"),
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["s"], name="Sl"),
        conv("B", "s", "y1", "wb"),
        conv("C", "a", "y2", "wc"),
    ]
    inits = [
        tensor("wa", w(8, 4, 3, 3)),
        tensor("st", np.array([2], np.int64)),
        tensor("en", np.array([6], np.int64)),
        tensor("ax", np.array([1], np.int64)),
        tensor("wb", w(3, 4, 3, 3)),
        tensor("wc", w(2, 8, 3, 3)),
    ]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], ["y1", "y2"], inits)
    outside, inside = part("A", 4, tensors=1), part("A", 4, tensors=2)
    zeroed, pruned = remove_zeroed(model, [(outside, 3), (inside, 1)])
    start, end = ints(pruned, "st")[0], ints(pruned, "en")[0]
    assert end - start == 3
    assert weights(pruned)["wa"] == (4, 4, 3, 3)
    assert_same_outputs(zeroed, pruned, (2, 4, 6, 6))


def test_zero_padded_shortcut_and_residual_add():
    """Option-A shortcut: relu(A(x)) zero-padded from 4 to 8 channels, added to B(x)."""
    nodes = [
        conv("A", "x", "a", "wa", "ba"),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("Pad", ["r", "pads", "zero"], ["p"], name="P", mode="constant"),
        conv("B", "x", "b", "wb", "bb"),
        helper.make_node("Add", ["p", "b"], ["s"], name="Add"),
        helper.make_node("Relu", ["s"], ["rs"], name="RS"),
        conv("C", "rs", "y", "wc"),
    ]
    inits = [
        tensor("wa", w(4, 4, 3, 3)),
        tensor("ba", w(4)),
        tensor("pads", np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64)),
        tensor("zero", np.array(0.0, np.float32)),
        tensor("wb", w(8, 4, 3, 3)),
        tensor("bb", w(8)),
        tensor("wc", w(3, 8, 3, 3)),
    ]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], ["y"], inits)
    analysis = prepare_analysis(ir.from_proto(model))
    stream = by_producer("A")(analysis)
    assert stream.channels == 4 and set(stream.names) == {"A", "B"}
    pad = next(g for g in analysis.groups if g.names == ["B"])
    assert pad.channels == 4  # B's channels facing the zero padding: 2 before, 2 after
    zeroed, pruned = remove_zeroed(model, [(by_producer("A"), 1), (lambda a: pad_group(a), 3)])
    padded = ints(pruned, "pads")
    assert padded[1] + padded[5] == 1
    assert weights(pruned)["wb"] == (4, 4, 3, 3)
    assert weights(pruned)["wc"] == (3, 4, 3, 3)
    assert_same_outputs(zeroed, pruned, (2, 4, 6, 6))


def pad_group(analysis: ChannelAnalysis) -> ChannelGroup:
    return next(g for g in analysis.groups if g.names == ["B"])


def test_flatten_to_gemm_and_a_hidden_mlp_layer():
    nodes = [
        conv("A", "x", "a", "wa", "ba", strides=[2, 2]),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("Flatten", ["r"], ["f"], name="F", axis=1),
        helper.make_node("Gemm", ["f", "g1", "g1b"], ["h"], name="G1", transB=1),
        helper.make_node("Relu", ["h"], ["rh"], name="RH"),
        helper.make_node("Gemm", ["rh", "g2"], ["y"], name="G2"),
    ]
    inits = [
        tensor("wa", w(6, 4, 3, 3)),
        tensor("ba", w(6)),
        tensor("g1", w(10, 6 * 9)),
        tensor("g1b", w(10)),
        tensor("g2", w(10, 3)),
    ]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], ["y"], inits)
    zeroed, pruned = remove_zeroed(model, [(by_producer("A"), 2), (by_producer("G1"), 4)])
    assert weights(pruned)["g1"] == (6, 4 * 9)  # 2 channels x 3 x 3 features gone
    assert weights(pruned)["g2"] == (6, 3)
    assert_same_outputs(zeroed, pruned, (2, 4, 6, 6))


def test_squeeze_excitation_mul_ties_the_gate_to_its_input():
    nodes = [
        conv("A", "x", "a", "wa"),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="GAP"),
        helper.make_node("Conv", ["g", "w1", "b1"], ["e1"], name="E1"),
        helper.make_node("Relu", ["e1"], ["re"], name="RE"),
        helper.make_node("Conv", ["re", "w2", "b2"], ["e2"], name="E2"),
        helper.make_node("Sigmoid", ["e2"], ["gate"], name="Sig"),
        helper.make_node("Mul", ["r", "gate"], ["m"], name="M"),
        conv("B", "m", "y", "wb"),
    ]
    inits = [
        tensor("wa", w(6, 4, 3, 3)),
        tensor("w1", w(3, 6, 1, 1)),
        tensor("b1", w(3)),
        tensor("w2", w(6, 3, 1, 1)),
        tensor("b2", w(6)),
        tensor("wb", w(2, 6, 3, 3)),
    ]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], ["y"], inits)
    group = by_producer("A")(prepare_analysis(ir.from_proto(model)))
    assert set(group.names) == {"A", "E2"}
    zeroed, pruned = remove_zeroed(model, [(by_producer("A"), 2)])
    assert weights(pruned)["w2"] == (4, 3, 1, 1)
    assert weights(pruned)["w1"] == (3, 4, 1, 1)
    assert_same_outputs(zeroed, pruned, (2, 4, 6, 6))


def test_channel_shuffle_and_shape_reads_block_with_reasons():
    nodes = [
        conv("A", "x", "a", "wa"),
        helper.make_node("Reshape", ["a", "s5"], ["r5"], name="Split4D"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="Shuffle", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "s4"], ["sh"], name="Merge"),
        conv("B", "sh", "b", "wb"),
        helper.make_node("Shape", ["b"], ["shape"], name="Shape"),
        helper.make_node("Gather", ["shape", "one"], ["channels"], name="G", axis=0),
        helper.make_node("Cast", ["channels"], ["cf"], name="Cast", to=1),
        helper.make_node("Mul", ["b", "cf"], ["y"], name="Scale"),
    ]
    inits = [
        tensor("wa", w(8, 4, 3, 3)),
        tensor("s5", np.array([-1, 2, 4, 6, 6], np.int64)),
        tensor("s4", np.array([-1, 8, 6, 6], np.int64)),
        tensor("wb", w(4, 8, 3, 3)),
        tensor("one", np.array(1, np.int64)),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["y"], inits)
    result = PrunePass(PruneConfig(ratio=0.5, multiple=1))(ir.from_proto(model))
    why = {s.node: s.reason for s in result.record.skipped}
    assert not result.record.changes
    assert why["A"] == "Reshape 'Split4D': channels cannot be followed through the reshape"
    assert why["B"] == "Shape 'Shape': its result may depend on the channels"


def test_macs_after_pruning_match_an_independent_count(tmp_path):
    zoo = pytest.importorskip("models.zoo")
    from onnxcomp.converter.cleanup.cleanup_pass import CleanupPass

    model = ir.load(zoo.export_reference("resnet20", tmp_path / "r20.onnx", keep_batchnorm=False))
    CleanupPass()(model)
    pass_ = PrunePass(PruneConfig(ratio=0.3, multiple=1))
    out = ir.to_proto(pass_(model).model)
    before, after = pass_.macs  # type: ignore[misc]
    assert summarize(out).total_macs == after < before


@pytest.mark.parametrize(
    ("name", "pruned", "blocked_by"),
    [
        ("resnet18", 12, {"graph output"}),  # every stream and inner group
        ("mobilenet_v2", 25, {"graph output"}),  # depthwise convs follow their input
        (
            "shufflenet_v2_x0_5",
            2,
            {"Shape", "Reshape", "Conv", "Concat", "ReduceMean", "graph output"},
        ),
    ],
)
def test_torchvision_style_networks(tmp_path, name: str, pruned: int, blocked_by: set[str]):
    """Pruned where the channels can be followed, the rest explained; the result is valid and
    runs. ShuffleNet's channel shuffle (Reshape with a run-time shape, Transpose) blocks most
    of its groups."""
    zoo = pytest.importorskip("models.zoo")
    from onnxcomp.converter.cleanup.cleanup_pass import CleanupPass

    model = ir.load(zoo.export_reference(name, tmp_path / "m.onnx", keep_batchnorm=False))
    CleanupPass()(model)
    source = ir.to_proto(model)
    result = PrunePass(PruneConfig(ratio=0.3, multiple=1))(ir.from_proto(source))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert len(result.record.changes) == pruned
    first_words = {s.reason.split(" ")[0] for s in result.record.skipped}
    assert first_words <= {w.split(" ")[0] for w in blocked_by}
    dims = [d.dim_value or 2 for d in source.graph.input[0].type.tensor_type.shape.dim]
    x = RNG.normal(0, 1, dims).astype(np.float32)
    got = run(out, {source.graph.input[0].name: x})[0]
    assert got.shape == run(source, {source.graph.input[0].name: x})[0].shape
    assert np.all(np.isfinite(got))
