"""--prune-latency: kept counts limited to those the (measured) convolutions run fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper
from typer.testing import CliRunner

from onnxcomp.backends.kernel_latency import ConvGeometry, KernelLatency
from onnxcomp.cli.root import app
from onnxcomp.converter.base import PassContext
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.prune import PruneConfig, PrunePass
from onnxcomp.converter.prune.channels import prepare_analysis
from onnxcomp.converter.prune.latency import _Layer, fast_counts, group_layers, nearest
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError


def stepped_timer(step: int):
    """A fake kernel: time grows with in and out channels rounded up to ``step``."""

    def timer(model: onnx.ModelProto, feeds) -> float:
        weight = next(t for t in model.graph.initializer if t.name in ("w", "w_q"))
        out, cin = weight.dims[0], weight.dims[1]
        return 1e-6 * (-(-out // step) * step) * (-(-cin // step) * step)

    return timer


def lookup(step: int) -> KernelLatency:
    return KernelLatency(None, timer=stepped_timer(step), rounds=1)


def pair(mid: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x (3 ch, 8x8) -> Conv A (3 -> mid) -> Relu -> Conv B (mid -> 5) -> y."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["y"], name="B", pads=[1] * 4),
    ]
    inits = [
        tensor("wa", rng.normal(0, 0.5, (mid, 3, 3, 3)).astype(np.float32)),
        tensor("ba", rng.normal(0, 0.2, mid).astype(np.float32)),
        tensor("wb", rng.normal(0, 0.5, (5, mid, 3, 3)).astype(np.float32)),
        tensor("bb", np.linspace(-1, 1, 5).astype(np.float32)),
    ]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], ["y"], inits)


def two_blocks(seed: int = 0, width: int = 16, inner: int = 24) -> onnx.ModelProto:
    """A stem and two residual blocks (width channels on the residual stream, inner inside).

    Every Conv has a bias (see test_bias_free_convs_prune_with_calibration_data for none)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "ws", "bs"], ["s"], name="S", pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["s0"], name="RS"),
    ]
    inits = [
        tensor("ws", rng.normal(0, 0.3, (width, 3, 3, 3)).astype(np.float32)),
        tensor("bs", rng.normal(0, 0.1, width).astype(np.float32)),
    ]
    for k in (1, 2):
        prev = f"s{k - 1}"
        nodes += [
            helper.make_node(
                "Conv", [prev, f"wa{k}", f"ba{k}"], [f"a{k}"], name=f"A{k}", pads=[1] * 4
            ),
            helper.make_node("Relu", [f"a{k}"], [f"ra{k}"], name=f"RA{k}"),
            helper.make_node(
                "Conv", [f"ra{k}", f"wb{k}", f"bb{k}"], [f"b{k}"], name=f"B{k}", pads=[1] * 4
            ),
            helper.make_node("Add", [f"b{k}", prev], [f"t{k}"], name=f"Add{k}"),
            helper.make_node("Relu", [f"t{k}"], [f"s{k}"], name=f"R{k}"),
        ]
        inits += [
            tensor(f"wa{k}", rng.normal(0, 0.2, (inner, width, 3, 3)).astype(np.float32)),
            tensor(f"ba{k}", rng.normal(0, 0.1, inner).astype(np.float32)),
            tensor(f"wb{k}", rng.normal(0, 0.1, (width, inner, 3, 3)).astype(np.float32)),
            tensor(f"bb{k}", rng.normal(0, 0.1, width).astype(np.float32)),
        ]
    nodes.append(helper.make_node("Conv", ["s2", "wc", "bc"], ["y"], name="C", pads=[1] * 4))
    inits.append(tensor("bc", np.zeros(4, np.float32)))
    inits.append(tensor("wc", rng.normal(0, 0.3, (4, width, 3, 3)).astype(np.float32)))
    return make_model(nodes, [("x", ["N", 3, 8, 8])], ["y"], inits)


def weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def test_fast_counts_are_those_no_larger_count_beats():
    analysis = prepare_analysis(ir.from_proto(pair()))
    (group,) = [g for g in analysis.groups if g.producers and not g.blocked]
    layers = group_layers(analysis, group, batch=4)
    assert [(lay.geometry.in_channels, lay.geometry.out_channels) for lay in layers] == [
        (3, 16), (16, 5)
    ]  # fmt: skip
    fast, seconds = fast_counts(analysis, group, list(range(1, 16)), lookup(8), "int8", 4)
    # time is flat from 1 to 8 channels and from 9 to 16: only 8 and 16 are worth keeping.
    assert fast == [8, 16]
    assert seconds[8] < seconds[9] == seconds[16] and seconds[1] == seconds[8]
    assert nearest(fast, 6) == 8 and nearest(fast, 12) == 16 and nearest(fast, 3) == 8


def test_a_layer_never_drops_below_one_channel():
    layer = _Layer(ConvGeometry(8, 4, 3, 1, 1, 8, 8), share_in=1.0, share_out=0.0)
    assert layer.at(20).in_channels == 1 and layer.at(20).out_channels == 4


def test_ratio_rounds_to_a_fast_count():
    model = pair()
    plain = PrunePass(PruneConfig(ratio=0.6, multiple=1))(ir.from_proto(model))
    assert weights(ir.to_proto(plain.model))["wa"] == (6, 3, 3, 3)
    result = PrunePass(PruneConfig(ratio=0.6, multiple=1, latency="int8"), lookup=lookup(8))(
        ir.from_proto(model)
    )
    out = ir.to_proto(result.model)
    assert weights(out)["wa"] == (8, 3, 3, 3) and weights(out)["wb"] == (5, 8, 3, 3)
    assert any("fast kept counts [8, 16]" in c for c in result.record.changes)
    assert any("--prune-latency int8" in c for c in result.record.changes)


def test_macs_budget_is_kept_with_fast_counts(tmp_path: Path):
    model = two_blocks()
    x = np.random.default_rng(3).normal(0.3, 1, (32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    context = PassContext(calibration=DataOptions(data=tmp_path / "calib.npz", batch_size=16))
    config = PruneConfig(ratio=None, macs=0.5, multiple=1, min_channels=1, latency="fp32")
    prune = PrunePass(config, context, lookup=lookup(4))
    result = prune(ir.from_proto(model))
    out = ir.to_proto(result.model)
    before, after = prune.macs  # type: ignore[misc]
    assert 0.5 - 0.05 <= after / before <= 0.5
    for name, dims in weights(out).items():
        assert dims[0] >= 1
        if (
            name.startswith("w") and name != "wc"
        ):  # every kept count of the pruned groups is a multiple of 4
            assert dims[0] % 4 == 0, (name, dims)
    assert run(out, {"x": x})[0].shape == (32, 4, 8, 8)


def test_convert_with_prune_latency_and_int8_runs_in_ort(tmp_path: Path, monkeypatch):
    """Real measurements (cached in tmp_path): counts are multiples of --prune-multiple."""
    monkeypatch.setenv("ONNXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "model.onnx"
    onnx.save(two_blocks(seed=1), source)
    x = np.random.default_rng(4).normal(0.3, 1, (32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    options = PipelineOptions(
        prune=PruneConfig(ratio=0.5, multiple=4, latency="int8", latency_batch=2),
        int8=QuantizeConfig(),
    )
    out = tmp_path / "out.onnx"
    report = convert(
        source, out, options, calibration=DataOptions(data=tmp_path / "calib.npz", batch_size=16)
    )
    dims = weights(onnx.load(out))
    kept = {n: d[0] for n, d in dims.items() if n.startswith(("wa", "ws")) and len(d) == 4}
    assert kept and all(c % 4 == 0 and c >= 4 for c in kept.values())
    assert any("--prune-latency int8" in c for r in report.records for c in r.changes)
    assert (tmp_path / "cache" / "kernel_latency.json").exists()
    (y,) = run(onnx.load(out), {"x": x[:3]})
    assert y.shape == (3, 4, 8, 8) and np.isfinite(y).all()


def test_bias_free_convs_prune_with_calibration_data(tmp_path: Path):
    """A bias-free Conv that reads a pruned group and produces one gets its compensating bias
    pruned with its rows (it used to keep its unpruned width and ORT refused the model)."""
    model = two_blocks(seed=2)
    for node in model.graph.node:
        if node.name in ("A1", "A2", "S"):
            del node.input[2]
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    x = np.random.default_rng(5).normal(0.3, 1, (32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "out.onnx"
    options = PipelineOptions(prune=PruneConfig(ratio=0.5, multiple=4))
    convert(source, out, options, calibration=DataOptions(data=tmp_path / "calib.npz"))
    pruned = onnx.load(out)
    dims = weights(pruned)
    assert dims["wa1"][0] < 24
    (y,) = run(pruned, {"x": x[:3]})
    assert y.shape == (3, 4, 8, 8) and np.isfinite(y).all()


def test_option_errors():
    with pytest.raises(OptionError, match="--prune-latency 'int4': choose one of fp32, int8"):
        PruneConfig(latency="int4")
    with pytest.raises(OptionError, match="latency batch"):
        PruneConfig(latency="int8", latency_batch=0)
    result = CliRunner().invoke(app, ["convert", "m.onnx", "-o", "o.onnx", "--prune", "0.5",
                                      "--prune-latency", "int4"])  # fmt: skip
    assert isinstance(result.exception, OptionError)
    assert "'int4' is not one of 'int8', 'fp32'" in str(result.exception)
