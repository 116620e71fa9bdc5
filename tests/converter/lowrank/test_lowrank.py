"""LowRankPass on hand-built graphs: each method at full rank, exact low-rank weights, skips."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import RNG, make_model, ops, run, tensor
from onnx import helper, numpy_helper

from onnxcomp.converter.lowrank import LowRankConfig, LowRankPass
from onnxcomp.errors import OptionError

FULL_RANK = {"rank_energy": 1.0, "min_macs_saving": -10.0}


def factorize(model: onnx.ModelProto, **config):
    """Run the pass; returns the new proto, the record and the per-layer results."""
    lowrank = LowRankPass(LowRankConfig(**config))
    result = lowrank(ir.from_proto(model))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.record, lowrank.layers


def assert_close(got: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max()


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def gemm_model(w: np.ndarray, trans_a: int = 0, trans_b: int = 0, batch: int = 3):
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    node = helper.make_node(
        "Gemm", ["x", "w", "c"], ["y"], name="fc", transA=trans_a, transB=trans_b,
        alpha=0.7, beta=1.5,
    )  # fmt: skip
    x_shape = [k, batch] if trans_a else [batch, k]
    inits = [tensor("w", w), tensor("c", RNG.normal(size=n).astype(np.float32))]
    return make_model([node], [("x", x_shape)], ["y"], inits)


def matmul_model(w: np.ndarray, x_shape: list[int | str]):
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [("x", x_shape)], ["y"], [tensor("w", w)])


def conv_model(w: np.ndarray, hw: tuple[int, int] = (11, 9), bias: bool = True, **attrs):
    inits = [tensor("w", w)]
    inputs = ["x", "w"]
    if bias:
        inits.append(tensor("b", RNG.normal(size=w.shape[0]).astype(np.float32)))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    cin = w.shape[1] * attrs.get("group", 1)
    return make_model([node], [("x", ["N", cin, *hw])], ["y"], inits)


def random(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


CONV_GEOMETRY = {"strides": [2, 2], "pads": [1, 0, 2, 1], "dilations": [2, 1]}
FULL_RANK_CASES = {
    "gemm-transB0": (lambda: gemm_model(random(8, 6)), (3, 8), ["Gemm", "Gemm"], "svd"),
    "gemm-transB1": (
        lambda: gemm_model(random(6, 8), trans_b=1),
        (3, 8),
        ["Gemm", "Gemm"],
        "svd",
    ),
    "gemm-transA1": (
        lambda: gemm_model(random(8, 6), trans_a=1, trans_b=0),
        (8, 3),
        ["Gemm", "Gemm"],
        "svd",
    ),
    "matmul-3d": (
        lambda: matmul_model(random(8, 6), ["N", 5, 8]),
        (2, 5, 8),
        ["MatMul", "MatMul"],
        "svd",
    ),
    "conv-spatial": (
        lambda: conv_model(random(8, 6, 3, 3), **CONV_GEOMETRY),
        (2, 6, 11, 9),
        ["Conv", "Conv"],
        "spatial",
    ),
    "conv-tucker2": (
        lambda: conv_model(random(8, 6, 3, 3), **CONV_GEOMETRY),
        (2, 6, 11, 9),
        ["Conv", "Conv", "Conv"],
        "tucker2",
    ),
    "conv-spatial-5x3-same": (
        lambda: conv_model(random(8, 6, 5, 3), auto_pad="SAME_UPPER", strides=[2, 1]),
        (2, 6, 11, 9),
        ["Conv", "Conv"],
        "spatial",
    ),
    "conv-tucker2-same-lower-no-bias": (
        lambda: conv_model(
            random(8, 6, 3, 3), hw=(10, 9), bias=False, auto_pad="SAME_LOWER", strides=[2, 2]
        ),
        (2, 6, 10, 9),
        ["Conv", "Conv", "Conv"],
        "tucker2",
    ),
    "conv-1x1-stride-pad": (
        lambda: conv_model(random(8, 6, 1, 1), strides=[2, 2], pads=[1, 1, 0, 1]),
        (2, 6, 11, 9),
        ["Conv", "Conv"],
        "svd",
    ),
}


@pytest.mark.parametrize("case", list(FULL_RANK_CASES), ids=list(FULL_RANK_CASES))
def test_full_rank_reproduces_the_original(case):
    """At rank_energy=1 every method is exact; the reference is the original model in ORT."""
    build, x_shape, expected_ops, method = FULL_RANK_CASES[case]
    model = build()
    x = RNG.normal(size=x_shape).astype(np.float32)
    ref = run(model, {"x": x})[0]
    out, record, layers = factorize(model, methods=(method,), **FULL_RANK)
    assert ops(out) == expected_ops
    assert [layer.method for layer in layers] == [method]
    assert layers[0].error < 1e-6
    assert record.skipped == []
    assert not record.lossless and record.modified
    assert "w" not in initializers(out)  # the old weight is gone
    assert [o.name for o in out.graph.output] == ["y"]
    assert all(
        n.name.startswith(("fc.lowrank", "mm.lowrank", "conv.lowrank")) for n in out.graph.node
    )
    assert_close(run(out, {"x": x})[0], ref)


def low_rank(rows: int, cols: int, rank: int) -> np.ndarray:
    return (random(rows, rank) @ random(rank, cols)).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_exact_rank3_gemm_is_found_and_exact(trans_b):
    w = low_rank(32, 32, 3)
    model = gemm_model(w, trans_b=trans_b, batch=4)
    x = random(4, 32)
    ref = run(model, {"x": x})[0]
    out, record, layers = factorize(model, rank_energy=0.999)
    (layer,) = layers
    assert layer.ranks == (3,)
    assert layer.macs_before == 4 * 32 * 32
    assert layer.macs_after == 4 * (32 * 3 + 3 * 32)
    shapes = sorted(a.shape for a in initializers(out).values() if a.ndim == 2)
    assert shapes == sorted([(32, 3), (3, 32)])
    assert "svd, rank 32 -> 3, MACs" in record.changes[0]
    assert "4.10 K -> 768" in record.changes[0]
    assert_close(run(out, {"x": x})[0], ref, rel=1e-5)


def test_exact_rank3_matmul_with_symbolic_batch_counts_per_sample():
    model = matmul_model(low_rank(32, 24, 3), ["N", 32])
    x = random(5, 32)
    ref = run(model, {"x": x})[0]
    out, _, layers = factorize(model, rank_energy=0.9999)
    assert layers[0].ranks == (3,)
    assert (layers[0].macs_before, layers[0].macs_after) == (32 * 24, 3 * (32 + 24))
    assert_close(run(out, {"x": x})[0], ref, rel=1e-5)


def test_exact_spatial_rank2_conv_and_its_macs():
    """W[o, c, i, j] = sum_r V[r, c, i] H[o, r, j] has spatial rank 2."""
    v, h = random(2, 16, 3), random(16, 2, 3)
    w = np.einsum("rci,orj->ocij", v, h).astype(np.float32)
    model = conv_model(w, hw=(12, 10), pads=[1, 1, 1, 1], strides=[2, 1])
    x = random(1, 16, 12, 10)
    ref = run(model, {"x": x})[0]
    out, _, layers = factorize(model, rank_energy=0.9999, methods=("spatial",))
    (layer,) = layers
    assert layer.ranks == (2,)
    ho, wo = (12 + 2 - 3) // 2 + 1, 10
    assert layer.macs_before == 16 * 16 * 9 * ho * wo
    # (3 x 1) conv 16 -> 2 on (ho, 10 input columns), then (1 x 3) conv 2 -> 16
    assert layer.macs_after == 2 * 16 * 3 * ho * 10 + 16 * 2 * 3 * ho * wo
    kernels = sorted(a.shape for a in initializers(out).values() if a.ndim == 4)
    assert kernels == [(2, 16, 3, 1), (16, 2, 1, 3)]
    assert_close(run(out, {"x": x})[0], ref, rel=1e-5)


def test_tucker2_wins_on_a_tucker_low_rank_conv():
    """Ranks (2, 2) of 16: Tucker-2 needs far fewer MACs than spatial SVD (rank 6)."""
    core, u_out, u_in = random(2, 2, 3, 3), random(16, 2), random(16, 2)
    w = np.einsum("rskl,or,is->oikl", core, u_out, u_in).astype(np.float32)
    model = conv_model(w, hw=(8, 8), pads=[1, 1, 1, 1])
    x = random(1, 16, 8, 8)
    ref = run(model, {"x": x})[0]
    out, record, layers = factorize(model, rank_energy=0.9999)
    (layer,) = layers
    assert (layer.method, layer.ranks) == ("tucker2", (2, 2))
    assert layer.macs_after == 64 * (2 * 16 + 2 * 2 * 9 + 16 * 2)
    assert ops(out) == ["Conv", "Conv", "Conv"]
    assert "tucker2, rank 16/16 -> 2/2" in record.changes[0]
    assert_close(run(out, {"x": x})[0], ref, rel=1e-5)


def test_truncation_error_is_the_weight_error_and_within_budget():
    """The reported error equals ||W - A B|| / ||W|| of the weights written to the model."""
    w = random(48, 40)
    model = matmul_model(w, ["N", 48])
    out, _, layers = factorize(model, rank_energy=0.9, min_macs_saving=-10.0)
    inits = initializers(out)
    a, b = inits["mm.lowrank0.weight"], inits["mm.lowrank1.weight"]
    error = np.linalg.norm(w - a.astype(np.float64) @ b) / np.linalg.norm(w)
    assert 0.0 < error <= math.sqrt(0.1) + 1e-6
    assert layers[0].error == pytest.approx(error, rel=1e-4)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
    energy = np.cumsum(s) / s.sum()
    assert layers[0].ranks == (int(np.argmax(energy >= 0.9)) + 1,)


def test_depthwise_conv_is_skipped():
    model = conv_model(random(6, 1, 3, 3), group=6, pads=[1, 1, 1, 1])
    out, record, layers = factorize(model, **FULL_RANK)
    assert layers == [] and ops(out) == ["Conv"]
    assert record.skipped[0].node == "conv"
    assert "depthwise convolution (group=6)" in record.skipped[0].reason
    assert record.summary.startswith("no layer factorized")


def test_grouped_conv_is_skipped():
    _, record, _ = factorize(conv_model(random(8, 3, 3, 3), group=2), **FULL_RANK)
    assert "grouped convolution (group=2)" in record.skipped[0].reason


def test_tiny_layer_where_macs_would_grow_is_left_alone():
    model = gemm_model(random(4, 4))
    out, record, layers = factorize(model, rank_energy=1.0)
    assert layers == [] and ops(out) == ["Gemm"]
    assert record.skipped[0].reason.startswith("svd rank 4 of 4 would keep 200% of the MACs")
    assert not record.modified


def test_shared_weight_is_skipped():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y1"], name="mm1"),
        helper.make_node("MatMul", ["x", "w"], ["y2"], name="mm2"),
    ]
    model = make_model(nodes, [("x", ["N", 32])], ["y1", "y2"], [tensor("w", low_rank(32, 32, 2))])
    out, record, _ = factorize(model, rank_energy=0.99)
    assert ops(out) == ["MatMul", "MatMul"]
    assert [s.node for s in record.skipped] == ["mm1", "mm2"]
    assert all("'w' of MatMul" in s.reason and "shared by 2" in s.reason for s in record.skipped)


def test_non_constant_weight_is_skipped():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = make_model([node], [("x", ["N", 8]), ("w", [8, 8])], ["y"], [])
    _, record, _ = factorize(model, **FULL_RANK)
    assert "not a constant initializer" in record.skipped[0].reason


def test_excluded_and_disabled_methods_are_reported():
    model = gemm_model(low_rank(32, 32, 2))
    _, record, _ = factorize(model, exclude=("f*",))
    assert record.skipped[0].reason == "Gemm 'fc' is excluded"
    _, record, _ = factorize(model, methods=("spatial",))
    assert "needs method 'svd'" in record.skipped[0].reason


def test_new_names_do_not_collide_with_existing_ones():
    w = low_rank(32, 32, 2)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "mm.lowrank0.weight"], ["y"], name="mm.lowrank0"),
    ]
    inits = [tensor("w", w), tensor("mm.lowrank0.weight", random(32))]
    model = make_model(nodes, [("x", ["N", 32])], ["y"], inits)
    x = random(3, 32)
    ref = run(model, {"x": x})[0]
    out, _, layers = factorize(model, rank_energy=0.9999)
    assert layers[0].ranks == (2,)
    names = [n.name for n in out.graph.node]
    assert len(set(names)) == len(names) == 3
    assert ops(out) == ["MatMul", "MatMul", "Add"]  # topologically sorted
    assert_close(run(out, {"x": x})[0], ref, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"rank_energy": 0.0}, {"rank_energy": 1.5}, {"methods": ("cp",)}, {"min_macs_saving": 1.0}],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(OptionError):
        LowRankConfig(**kwargs)


def test_truncated_tucker2_meets_the_error_budget():
    """Error of the written factors, rebuilt independently, stays within sqrt(1 - energy)."""
    w = random(16, 12, 3, 3)
    model = conv_model(w, hw=(6, 6), pads=[1, 1, 1, 1])
    out, record, layers = factorize(
        model, rank_energy=0.9, methods=("tucker2",), min_macs_saving=-10.0
    )
    assert record.skipped == [] and layers[0].method == "tucker2"
    inits = {k: v.astype(np.float64) for k, v in initializers(out).items()}
    first, core, last = (inits[f"conv.lowrank{i}.weight"] for i in range(3))
    rebuilt = np.einsum("is,rskl,or->oikl", first[:, :, 0, 0].T, core, last[:, :, 0, 0])
    error = np.linalg.norm(w - rebuilt) / np.linalg.norm(w)
    assert error <= math.sqrt(0.1) + 1e-6
    assert layers[0].error == pytest.approx(error, rel=1e-4)
    assert layers[0].ranks == (first.shape[0], core.shape[0])
    assert sum(layers[0].ranks) < 12 + 16  # truncated, not full rank


def test_depthwise_with_channel_multiplier_is_skipped():
    _, record, _ = factorize(conv_model(random(12, 1, 3, 3), group=6), **FULL_RANK)
    assert "depthwise convolution (group=6)" in record.skipped[0].reason


def test_conv_with_unknown_spatial_dims_is_skipped():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model(
        [node], [("x", ["N", 8, "H", "W"])], ["y"], [tensor("w", random(8, 8, 3, 3))]
    )
    _, record, _ = factorize(model, **FULL_RANK)
    assert "input height and width are not known" in record.skipped[0].reason
