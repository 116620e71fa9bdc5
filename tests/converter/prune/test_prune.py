"""Channel pruning of Conv -> [Relu] -> Conv pairs: l1 and ThiNet."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.cleanup.cleanup_pass import CleanupPass
from onnxcomp.converter.prune import PruneConfig, PrunePass
from onnxcomp.converter.prune.allocation import allocate_levels
from onnxcomp.converter.prune.criteria import thinet_remove
from onnxcomp.converter.prune.reconstruct import least_squares_scales
from onnxcomp.converter.prune.samplers import ContributionSampler
from onnxcomp.core.geometry import ConvGeometry
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OnnxcompError, OptionError


def prune(model: onnx.ModelProto, context: PassContext | None = None, **config):
    """Run the pass on a copy; return the new proto and the pass result."""
    config.setdefault("multiple", 1)  # exact counts on these small layers
    result = PrunePass(PruneConfig(**config), context)(ir.from_proto(model))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def reasons(result) -> dict[str, str]:
    return {s.node: s.reason for s in result.record.skipped}


def conv_relu_conv(
    wa: np.ndarray, ba: np.ndarray, wb: np.ndarray, hw: int = 8, relu: bool = True
) -> onnx.ModelProto:
    """x -> Conv A (3x3, pad 1) -> [Relu] -> Conv B (3x3, pad 1) -> y."""
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1, 1, 1, 1])]
    link = "a"
    if relu:
        nodes.append(helper.make_node("Relu", ["a"], ["r"], name="R"))
        link = "r"
    nodes.append(helper.make_node("Conv", [link, "wb", "bb"], ["y"], name="B", pads=[1] * 4))
    inits = [
        tensor("wa", wa.astype(np.float32)),
        tensor("ba", ba.astype(np.float32)),
        tensor("wb", wb.astype(np.float32)),
        tensor("bb", np.linspace(-1, 1, wb.shape[0]).astype(np.float32)),
    ]
    return make_model(nodes, [("x", ["N", wa.shape[1], hw, hw])], ["y"], inits)


def random_pair(seed: int, cin: int = 3, mid: int = 8, cout: int = 5) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.5, (mid, cin, 3, 3))
    ba = rng.normal(0, 0.2, mid)
    wb = rng.normal(0, 0.5, (cout, mid, 3, 3))
    return conv_relu_conv(wa, ba, wb)


# ---------------------------------------------------------------------------------------------
# l1


def test_l1_removes_exactly_the_zero_channels_and_keeps_the_outputs():
    rng = np.random.default_rng(1)
    wa = rng.normal(0, 1, (8, 3, 3, 3))
    ba = rng.normal(0, 0.5, 8)
    zero = [1, 2, 5, 6]
    wa[zero] = 0.0
    ba[zero] = 0.0
    wb = rng.normal(0, 1, (4, 8, 3, 3))
    model = conv_relu_conv(wa, ba, wb)
    out, result = prune(model, ratio=0.5, method="l1")

    weights = initializers(out)
    assert weights["wa"].shape == (4, 3, 3, 3)
    assert weights["ba"].shape == (4,)
    assert weights["wb"].shape == (4, 4, 3, 3)
    kept = [0, 3, 4, 7]
    np.testing.assert_array_equal(weights["wa"], wa[kept].astype(np.float32))
    np.testing.assert_array_equal(weights["wb"], wb[:, kept].astype(np.float32))
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], atol=1e-5)

    record = result.record
    assert result.modified
    # MACs per sample: A 8*64*27 + B 4*64*72 = 13824 + 18432 -> 6912 + 9216.
    assert record.changes == [
        "Conv 'A' -> Conv 'B': channels 8 -> 4, MACs 32.26 K -> 16.13 K (-50%)"
    ]
    assert "pruned 1 of 2 channel group(s)" in record.summary
    assert set(reasons(result)) == {"B"}  # B's output is the graph output


def test_keep_count_respects_min_channels_and_a_group_without_relu():
    assert PruneConfig(ratio=0.9, min_channels=4, multiple=1).keep_count(16) == 4
    assert PruneConfig(ratio=0.25, min_channels=1, multiple=1).keep_count(16) == 12
    # Multiples of 8: 64 * 0.7 = 44.8 -> 48; at least one multiple; never above C.
    assert PruneConfig(ratio=0.3).keep_count(64) == 48
    assert PruneConfig(ratio=0.9).keep_count(64) == 8
    assert PruneConfig(ratio=0.3).keep_count(6) == 6
    assert PruneConfig(ratio=0.3, multiple=16).keep_count(40) == 32
    # The multiple is strict, small groups included: 32 * 0.7 = 22.4 -> 16, never 24.
    assert PruneConfig(ratio=0.3, multiple=16).keep_count(32) == 16
    assert PruneConfig(ratio=0.3, multiple=16).keep_count(16) == 16
    assert PruneConfig(min_channels=20, multiple=16).min_keep(64) == 32
    rng = np.random.default_rng(2)
    model = conv_relu_conv(
        rng.normal(size=(6, 2, 3, 3)), rng.normal(size=6), rng.normal(size=(3, 6, 3, 3)), relu=False
    )
    out, _ = prune(model, ratio=0.5, min_channels=4)
    assert initializers(out)["wa"].shape == (4, 2, 3, 3)
    assert initializers(out)["wb"].shape == (3, 4, 3, 3)


# ---------------------------------------------------------------------------------------------
# What is skipped


def _residual_model() -> onnx.ModelProto:
    """x -> A -> Relu -> B -> y, and Relu's output also goes to an Add with B's output."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="A", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("Conv", ["r", "wb"], ["b"], name="B", pads=[1] * 4),
        helper.make_node("Add", ["b", "r"], ["y"], name="Y"),
    ]
    inits = [
        tensor("wa", rng.normal(size=(8, 8, 3, 3)).astype(np.float32)),
        tensor("wb", rng.normal(size=(8, 8, 3, 3)).astype(np.float32)),
    ]
    return make_model(nodes, [("x", [1, 8, 6, 6])], ["y"], inits)


def test_residual_add_ending_in_a_graph_output_is_skipped_with_the_reason():
    out, result = prune(_residual_model())
    assert not result.record.changes
    assert reasons(result)["A"] == "graph output 'y'"
    assert initializers(out)["wa"].shape == (8, 8, 3, 3)


def test_second_reader_loses_the_same_columns():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="A", pads=[1] * 4),
        helper.make_node("Conv", ["a", "wb"], ["y"], name="B", pads=[1] * 4),
        helper.make_node("Conv", ["a", "wc"], ["z"], name="C", pads=[1] * 4),
    ]
    wa = rng.normal(size=(8, 8, 3, 3))
    wa[[1, 5]] = 0.0  # the two channels l1 removes carry nothing: pruning is exact
    inits = [tensor("wa", wa.astype(np.float32))] + [
        tensor(n, rng.normal(size=(8, 8, 3, 3)).astype(np.float32)) for n in ("wb", "wc")
    ]
    model = make_model(nodes, [("x", [1, 8, 6, 6])], ["y", "z"], inits)
    out, result = prune(model, ratio=0.25)
    weights = initializers(out)
    assert weights["wa"].shape == (6, 8, 3, 3)
    np.testing.assert_array_equal(weights["wb"], initializers(model)["wb"][:, [0, 2, 3, 4, 6, 7]])
    np.testing.assert_array_equal(weights["wc"], initializers(model)["wc"][:, [0, 2, 3, 4, 6, 7]])
    x = rng.normal(size=(1, 8, 6, 6)).astype(np.float32)
    for got, ref in zip(run(out, {"x": x}), run(model, {"x": x}), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4)
    # MACs per sample: A, B and C each 8 x 36 positions x 72 = 20736; all lose a quarter.
    assert result.record.changes == [
        "Conv 'A' -> Conv 'B', Conv 'C': channels 8 -> 6, MACs 62.21 K -> 46.66 K (-25%)"
    ]


def test_depthwise_conv_is_pruned_with_its_input():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="A", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("Conv", ["r", "wd", "bd"], ["d"], name="D", pads=[1] * 4, group=8),
        helper.make_node("Conv", ["d", "wb"], ["y"], name="B", pads=[1] * 4),
    ]
    wa = rng.normal(size=(8, 4, 3, 3))
    wa[[2, 6]] = 0.0
    bd = rng.normal(size=8)
    bd[[2, 6]] = 0.0
    inits = [
        tensor("wa", wa.astype(np.float32)),
        tensor("wd", rng.normal(size=(8, 1, 3, 3)).astype(np.float32)),
        tensor("bd", bd.astype(np.float32)),
        tensor("wb", rng.normal(size=(4, 8, 3, 3)).astype(np.float32)),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["y"], inits)
    out, result = prune(model, ratio=0.25)
    weights = initializers(out)
    assert weights["wd"].shape == (6, 1, 3, 3)
    assert weights["bd"].shape == (6,)
    assert weights["wb"].shape == (4, 6, 3, 3)
    assert next(n for n in out.graph.node if n.name == "D").attribute[0].i == 6  # group
    x = rng.normal(size=(1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], atol=1e-4)
    assert result.record.changes[0].startswith("Conv 'A' -> Conv 'B': channels 8 -> 6")


def test_grouped_conv_is_skipped_with_the_reason():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="A", pads=[1] * 4),
        helper.make_node("Conv", ["a", "wg"], ["g"], name="G", pads=[1] * 4, group=2),
        helper.make_node("Conv", ["g", "wb"], ["y"], name="B", pads=[1] * 4),
    ]
    inits = [
        tensor("wa", rng.normal(size=(8, 4, 3, 3)).astype(np.float32)),
        tensor("wg", rng.normal(size=(8, 4, 3, 3)).astype(np.float32)),
        tensor("wb", rng.normal(size=(4, 8, 3, 3)).astype(np.float32)),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["y"], inits)
    _, result = prune(model)
    assert not result.record.changes
    assert reasons(result)["A"] == "Conv 'G' is a grouped convolution (group=2)"
    assert reasons(result)["G"] == "Conv 'G' is a grouped convolution (group=2)"


@pytest.mark.parametrize(
    "kwargs", [{"ratio": 0.0}, {"ratio": 1.0}, {"ratio": -0.5}, {"method": "random"}]
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(OptionError):
        PruneConfig(**kwargs)


def test_quantized_model_is_refused():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ"),
    ]
    inits = [tensor("s", np.float32(0.1)), tensor("z", np.uint8(128))]
    model = make_model(nodes, [("x", [1, 4])], ["y"], inits)
    with pytest.raises(OnnxcompError, match="quantized"):
        PrunePass()(ir.from_proto(model))


def test_binarized_model_is_refused():
    nodes = [
        helper.make_node("Sign", ["w"], ["wb"], name="binarize"),
        helper.make_node("Conv", ["x", "wb"], ["y"], name="C"),
    ]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], ["y"], [tensor("w", w_binary())])
    with pytest.raises(OnnxcompError, match="binarized"):
        PrunePass()(ir.from_proto(model))


def w_binary() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 4, 3, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ThiNet


def test_thinet_greedy_and_least_squares_on_known_contributions():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 6))
    x[:, 2] *= 0.01
    x[:, 4] *= 0.02
    np.testing.assert_array_equal(thinet_remove(x, 2), [2, 4])
    # Channel 5 is a copy of channel 0: dropping it, channel 0's scale doubles exactly.
    x[:, 5] = x[:, 0]
    kept = np.array([0, 1, 2, 3, 4])
    np.testing.assert_allclose(least_squares_scales(x, kept), [2, 1, 1, 1, 1], atol=1e-9)


def _error(model: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray) -> float:
    ref, got = run(model, {"x": x})[0], run(pruned, {"x": x})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def correlated_pair(seed: int) -> onnx.ModelProto:
    """16 middle channels in near-duplicate pairs (scaled copies plus noise), no bias."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.5, (8, 3, 3, 3))
    copies = base * rng.uniform(0.3, 1.0, (8, 1, 1, 1))
    wa = np.concatenate([base, copies]) + rng.normal(0, 0.05, (16, 3, 3, 3))
    return conv_relu_conv(wa, np.zeros(16), rng.normal(0, 0.5, (8, 16, 3, 3)))


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_thinet_beats_l1_and_reconstruction_helps(tmp_path: Path, seed: int):
    model = correlated_pair(seed)
    x = np.random.default_rng(seed + 1).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    context = PassContext(calibration=DataOptions(data=data, batch_size=8))

    l1, _ = prune(model, ratio=0.5, method="l1")
    thinet, result = prune(
        model, context, ratio=0.5, method="thinet", samples_per_image=20, compensate_bias=False
    )
    plain, _ = prune(
        model,
        context,
        ratio=0.5,
        method="thinet",
        samples_per_image=20,
        reconstruct=False,
        compensate_bias=False,
    )
    assert initializers(thinet)["wb"].shape == (8, 8, 3, 3)
    assert result.record.changes[0].startswith("Conv 'A' -> Conv 'B': channels 16 -> 8")
    e_l1, e_thinet, e_plain = (_error(model, m, x) for m in (l1, thinet, plain))
    assert e_thinet < e_l1
    assert e_thinet < e_plain
    # Without reconstruction only B's kept columns are copied, unscaled.
    kept_columns = initializers(plain)["wb"]
    original = initializers(model)["wb"]
    assert all(
        any(np.array_equal(col, o) for o in original.transpose(1, 0, 2, 3))
        for col in kept_columns.transpose(1, 0, 2, 3)
    )


def test_reservoir_keeps_at_most_max_samples(tmp_path: Path):
    model = random_pair(seed=11)
    x = np.random.default_rng(12).normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    context = PassContext(calibration=DataOptions(data=data, batch_size=16))
    pass_ = PrunePass(PruneConfig(method="thinet", max_samples=100, multiple=1), context)
    result = pass_(ir.from_proto(model))
    assert result.record.changes
    assert pass_.samples == {"B": (100, 400)}  # 40 images x 10 samples seen, 100 kept


def test_sampler_contributions_sum_to_the_conv_output():
    """Each sampled row sums to B's output (without bias) at its position and channel."""
    rng = np.random.default_rng(13)
    weight = rng.normal(size=(5, 4, 3, 3))
    geometry = ConvGeometry((7, 7), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    sampler = ContributionSampler(weight, geometry, per_image=1, cap=10, seed=0)
    x = rng.normal(size=(1, 4, 7, 7))
    sampler.update(x)
    padded = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    outputs = {
        float(np.sum(weight[o] * padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]))
        for o in range(5)
        for i in range(4)
        for j in range(4)
    }
    total = float(sampler.rows.sum())
    assert min(abs(total - v) for v in outputs) < 1e-9


def test_thinet_needs_calibration_data():
    with pytest.raises(OnnxcompError, match="calibration"):
        PrunePass(PruneConfig(method="thinet"))(ir.from_proto(random_pair(seed=9)))


# ---------------------------------------------------------------------------------------------
# ResNet-20


def test_resnet20_every_group_is_pruned_including_the_residual_streams(tmp_path: Path):
    """ResNet-20 exported by torch (option-A shortcuts: Slice + zero Pad on the channel axis)
    after the cleanup pass: the three residual streams and the nine inner channels are pruned;
    only the logits are left, with their reasons."""
    zoo = pytest.importorskip("models.zoo")
    path = zoo.export_reference("resnet20", tmp_path / "r20.onnx", keep_batchnorm=False)
    model = ir.load(path)
    CleanupPass()(model)
    cleaned = ir.to_proto(model)
    out, result = prune(cleaned, ratio=0.5, method="l1")
    record = result.record
    assert len(record.changes) == 12
    assert sum(" 37 tensors" in c for c in record.changes) == 1  # stage-1 stream
    assert {s.reason for s in record.skipped} == {"graph output 'logits'"}
    x = np.random.default_rng(10).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    name = cleaned.graph.input[0].name
    ref, got = run(cleaned, {name: x})[0], run(out, {name: x})[0]
    assert got.shape == ref.shape == (2, 10)
    assert np.all(np.isfinite(got))
    convs = [i for i in out.graph.initializer if len(i.dims) == 4]
    assert max(i.dims[0] for i in convs) == 32  # 64 -> 32


@pytest.mark.parametrize("method", ["l1", "thinet"])
def test_bias_compensation_lowers_the_error(tmp_path: Path, method: str):
    """B's input follows a Relu (mean > 0): what the removed channels added on average goes
    into B's bias, so the pruned output is closer to the original."""
    model = correlated_pair(21)
    x = np.random.default_rng(22).normal(0.5, 1, (32, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    context = PassContext(calibration=DataOptions(data=data, batch_size=8))
    with_bias, _ = prune(model, context, ratio=0.5, method=method)
    without, _ = prune(model, context, ratio=0.5, method=method, compensate_bias=False)
    assert not np.allclose(initializers(with_bias)["bb"], initializers(without)["bb"])
    assert _error(model, with_bias, x) < _error(model, without, x)


def test_bias_compensation_creates_a_bias_where_there_was_none(tmp_path: Path):
    model = correlated_pair(23)
    conv_b = next(n for n in model.graph.node if n.name == "B")
    del conv_b.input[2]  # B without bias
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "bb"))
    x = np.random.default_rng(24).normal(0.5, 1, (16, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    context = PassContext(calibration=DataOptions(data=data, batch_size=8))
    pruned, _ = prune(model, context, ratio=0.5, method="l1")
    without, _ = prune(model, context, ratio=0.5, method="l1", compensate_bias=False)
    assert "B.pruned_bias" in initializers(pruned)
    assert _error(model, pruned, x) < _error(model, without, x)


def test_refit_reader_is_the_least_squares_fit_of_the_original_output():
    """Gemm reading 6 features, 2 removed: the refit equals numpy's lstsq of the original
    output on the kept features and a constant (bias included)."""
    from onnxcomp.converter.prune.channels import Consumer, Space
    from onnxcomp.converter.prune.reconstruct import refit_reader
    from onnxcomp.stats.gram import InputGram

    rng = np.random.default_rng(30)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5  # correlated, non-zero mean
    weight, bias = rng.normal(size=(3, 6)), rng.normal(size=3)
    gram = InputGram(6)
    gram.update(x)
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=8)
    w_value, b_value = ir.Value(name="w"), ir.Value(name="b")
    w_value.const_value, b_value.const_value = ir.tensor(weight), ir.tensor(bias)
    node = ir.Node("", "Gemm", [ir.Value(name="x"), w_value, b_value], name="G")
    model.graph.append(node)
    consumer = Consumer(node, Space(node.inputs[0], 6, 0), w_value, 1, b_value)
    refit_reader(consumer, weight, np.array([1, 4]), gram)

    kept = [0, 2, 3, 5]
    design = np.concatenate([x[:, kept], np.ones((200, 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, x @ weight.T + bias, rcond=None)
    new_weight = w_value.const_value.numpy()
    np.testing.assert_allclose(new_weight[:, kept], solution[:4].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(new_weight[:, [1, 4]], 0.0)
    np.testing.assert_allclose(b_value.const_value.numpy(), solution[4], rtol=1e-4, atol=1e-6)


def test_layer_by_layer_refit_lowers_the_error_of_the_layers_below(tmp_path: Path):
    """A -> B -> C: pruning A's channels changes B's output; refitting B and then C on the
    pruned model's own inputs brings the final output closer to the original's."""
    rng = np.random.default_rng(40)
    relu = [helper.make_node("Relu", [f"{n}"], [f"r{n}"], name=f"R{n}") for n in ("a", "b")]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1] * 4),
        relu[0],
        helper.make_node("Conv", ["ra", "wb", "bb"], ["b"], name="B", pads=[1] * 4),
        relu[1],
        helper.make_node("Conv", ["rb", "wc", "bc"], ["y"], name="C", pads=[1] * 4),
    ]
    shapes = {"wa": (16, 3, 3, 3), "wb": (8, 16, 3, 3), "wc": (4, 8, 3, 3)}
    inits = [tensor(k, rng.normal(0, 0.3, s).astype(np.float32)) for k, s in shapes.items()]
    inits += [
        tensor(b, rng.normal(0, 0.1, n).astype(np.float32))
        for b, n in (("ba", 16), ("bb", 8), ("bc", 4))
    ]
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], ["y"], inits)
    x = rng.normal(0.3, 1, (64, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    context = PassContext(calibration=DataOptions(data=data, batch_size=16))
    config = {"ratio": 0.5, "method": "thinet", "overrides": (("B", 0.0),)}
    once, _ = prune(model, context, refit_pruned=False, **config)
    refitted, result = prune(model, context, **config)
    assert result.record.changes[-1] == "refitted 3 layer(s) on the pruned model's inputs"
    assert initializers(refitted)["wa"].shape == (8, 3, 3, 3)
    assert not np.allclose(initializers(refitted)["wc"], initializers(once)["wc"])
    assert _error(model, refitted, x) < _error(model, once, x)


def _two_blocks(seed: int) -> onnx.ModelProto:
    """x -> S -> relu = s0; two residual blocks s_k = relu(B_k(relu(A_k(s_k-1))) + s_k-1)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "ws", "bs"], ["s"], name="S", pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["s0"], name="RS"),
    ]
    inits = [tensor("ws", rng.normal(0, 0.3, (8, 3, 3, 3))), tensor("bs", rng.normal(0, 0.1, 8))]
    for k in (1, 2):
        prev = f"s{k - 1}"
        nodes += [
            helper.make_node("Conv", [prev, f"wa{k}"], [f"a{k}"], name=f"A{k}", pads=[1] * 4),
            helper.make_node("Relu", [f"a{k}"], [f"ra{k}"], name=f"RA{k}"),
            helper.make_node("Conv", [f"ra{k}", f"wb{k}"], [f"b{k}"], name=f"B{k}", pads=[1] * 4),
            helper.make_node("Add", [f"b{k}", prev], [f"t{k}"], name=f"Add{k}"),
            helper.make_node("Relu", [f"t{k}"], [f"s{k}"], name=f"R{k}"),
        ]
        inits += [
            tensor(f"wa{k}", rng.normal(0, 0.25, (16, 8, 3, 3))),
            tensor(f"wb{k}", rng.normal(0, 0.15, (8, 16, 3, 3))),
        ]
    nodes.append(helper.make_node("Conv", ["s2", "wc"], ["y"], name="C", pads=[1] * 4))
    inits.append(tensor("wc", rng.normal(0, 0.3, (4, 8, 3, 3))))
    inits = [tensor(t.name, onnx.numpy_helper.to_array(t).astype(np.float32)) for t in inits]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], ["y"], inits)


@pytest.mark.parametrize("seed", [41, 42])
def test_residual_refit_makes_up_for_the_error_of_the_block_above(tmp_path: Path, seed: int):
    """B2 is fitted to (original sum) - (pruned shortcut): it absorbs block 1's error."""
    model = _two_blocks(seed)
    x = np.random.default_rng(seed).normal(0.3, 1, (96, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x)
    context = PassContext(calibration=DataOptions(data=data, batch_size=16))
    config = {"ratio": 0.5, "method": "thinet", "overrides": (("S", 0.0),)}
    plain, _ = prune(model, context, refit_residual=False, **config)
    residual, _ = prune(model, context, **config)
    assert initializers(residual)["wa1"].shape == (8, 8, 3, 3)
    assert _error(model, residual, x) < _error(model, plain, x)


def test_a_group_below_two_multiples_stays_whole_with_its_reason():
    rng = np.random.default_rng(5)
    model = conv_relu_conv(
        rng.normal(size=(16, 2, 3, 3)), rng.normal(size=16), rng.normal(size=(3, 16, 3, 3))
    )
    out, result = prune(model, ratio=0.5, multiple=16)
    assert initializers(out)["wa"].shape == (16, 2, 3, 3)
    assert "multiples of 16" in reasons(result)["A"]
    out, _ = prune(model, ratio=0.5, multiple=8)
    assert initializers(out)["wa"].shape == (8, 2, 3, 3)


def _additive_macs(saving: dict[int, list[float]], total: float = 100.0):
    """MACs of a state when each group's level saves saving[g][level] (level 0 saves 0)."""
    return lambda state: total - sum(saving[g][level] for g, level in state.items())


def test_allocation_does_not_jump_far_past_the_target():
    # Group 0 has the best error per MAC but removes half the model in one step; group 1
    # takes small steps. Target 90: two small steps reach it with less error (0.02) than
    # the big one (0.05), which would keep 50.
    levels = {0: [(0, 0.0), (8, 0.05)], 1: [(0, 0.0), (2, 0.01), (4, 0.02), (6, 0.03)]}
    saving = {0: [0.0, 50.0], 1: [0.0, 5.0, 10.0, 15.0]}
    state = allocate_levels(levels, _additive_macs(saving), 90.0)
    assert state == {0: 0, 1: 2}


def test_allocation_matches_the_best_split_on_a_small_problem():
    # Independent reference: every combination of levels, the least total error at or
    # below the target. (Greedy on error per MAC down to the target alone: 1.28x here.)
    rng = np.random.default_rng(0)
    levels, saving = {}, {}
    for g in range(3):
        steps = np.sort(rng.uniform(1, 10, 4))
        saved = np.concatenate([[0.0], np.cumsum(steps)])
        marginal = np.sort(rng.uniform(0.1, 1.0, 4))  # error per MAC grows: convex
        error = np.concatenate([[0.0], np.cumsum(steps * marginal)])
        levels[g] = [(n, float(e)) for n, e in enumerate(error)]
        saving[g] = list(saved)
    macs = _additive_macs(saving)
    target = 100.0 - 0.5 * sum(s[-1] for s in saving.values())
    state = allocate_levels(levels, macs, target)
    assert state is not None and macs(state) <= target
    got = sum(levels[g][level][1] for g, level in state.items())
    best = min(
        sum(levels[g][lv][1] for g, lv in enumerate(combo))
        for combo in itertools.product(range(5), repeat=3)
        if macs(dict(enumerate(combo))) <= target
    )
    assert got <= 1.05 * best


def test_allocation_that_cannot_reach_the_target_says_so():
    levels = {0: [(0, 0.0), (4, 0.1)]}
    assert allocate_levels(levels, _additive_macs({0: [0.0, 10.0]}), 50.0) is None
