"""LowRankPass with calibration data (output-error ranks, data-aware refit) and latency checks.

References are computed here in numpy from the calibration inputs themselves: brute-force
ranks, the whitened (data-aware) SVD, im2col Gram matrices, numpy convolutions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, ops, run, tensor
from onnx import helper, numpy_helper

from onnxcomp.converter.base import PassContext
from onnxcomp.converter.lowrank import LowRankConfig, LowRankPass
from onnxcomp.core.geometry import ConvGeometry
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError
from onnxcomp.stats.gram import ConvPatchGram


def correlated(rng: np.random.Generator, samples: int, features: int) -> np.ndarray:
    """Rows whose features are mixed with a decaying spectrum (a few directions dominate)."""
    mix = rng.normal(size=(features, features)) * (0.7 ** np.arange(features))[:, None]
    return rng.normal(size=(samples, features)) @ mix


def calibration(tmp_path: Path, x: np.ndarray, batch_size: int = 8) -> DataOptions:
    data = tmp_path / "calib.npz"
    np.savez(data, x=x.astype(np.float32))
    return DataOptions(data=data, batch_size=batch_size)


def factorize(model: onnx.ModelProto, context: PassContext | None = None, timer=None, **config):
    lowrank = LowRankPass(LowRankConfig(**config), context, timer=timer)
    result = lowrank(ir.from_proto(model))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.record, lowrank.layers


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def svd_truncation(m: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def whitened_truncation(m: np.ndarray, x: np.ndarray, rank: int) -> np.ndarray:
    """argmin over rank-r M_r of ||x (M - M_r)||_F, from the SVD of G^{1/2} M, G = x^T x."""
    values, vectors = np.linalg.eigh(x.T @ x)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    return inverse_root @ svd_truncation(root @ m, rank)


def gemm_model(w: np.ndarray, c: np.ndarray, trans_b: int) -> onnx.ModelProto:
    node = helper.make_node(
        "Gemm", ["x", "w", "c"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0
    )
    k = w.shape[1] if trans_b else w.shape[0]
    inits = [tensor("w", w.astype(np.float32)), tensor("c", c.astype(np.float32))]
    return make_model([node], [("x", ["N", k])], ["y"], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_output_error_rank_is_the_smallest_meeting_the_budget(tmp_path, trans_b):
    rng = np.random.default_rng(3)
    x = correlated(rng, 64, 24).astype(np.float32).astype(np.float64)
    m = rng.normal(size=(24, 20))  # y = x M
    c = rng.normal(size=20)
    model = gemm_model(m.T if trans_b else m, c, trans_b)
    budget = 0.08
    errors = {r: rel(x @ svd_truncation(m, r), x @ m) for r in range(1, 21)}
    expected = min(r for r, e in errors.items() if e <= budget)
    weight_errors = {r: rel(svd_truncation(m, r), m) for r in range(1, 21)}
    assert min(r for r, e in weight_errors.items() if e <= budget) != expected  # data matters

    context = PassContext(calibration=calibration(tmp_path, x))
    out, record, layers = factorize(model, context, output_error=budget, min_macs_saving=-10.0)
    (layer,) = layers
    assert layer.ranks == (expected,) and layer.full_ranks == (20,)
    assert layer.output_error == pytest.approx(errors[expected], rel=1e-4)
    assert f"svd, rank 20 -> {expected} (by output error <= 0.08)" in record.changes[0]
    assert f"output error {errors[expected]:.4f}" in record.changes[0]

    reference = 0.5 * x @ svd_truncation(m, expected) + 2.0 * c
    got = run(out, {"x": x.astype(np.float32)})[0]
    assert rel(got, reference) < 1e-5


def test_refit_beats_plain_svd_and_matches_the_whitened_svd(tmp_path):
    rng = np.random.default_rng(4)
    x = correlated(rng, 96, 32).astype(np.float32).astype(np.float64)
    m = rng.normal(size=(32, 24))
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["N", 32])],
        ["y"],
        [tensor("w", m.astype(np.float32))],
    )
    budget = 0.05
    context = PassContext(calibration=calibration(tmp_path, x))
    out, record, layers = factorize(model, context, output_error=budget, refit=True)
    (layer,) = layers
    (rank,) = layer.ranks
    assert layer.refit and "refit on data" in record.changes[0]
    got = run(out, {"x": x.astype(np.float32)})[0]
    y = x @ m
    refit_error = rel(got, y)
    assert refit_error <= budget
    assert layer.output_error == pytest.approx(refit_error, rel=1e-3)
    assert refit_error < 0.5 * rel(x @ svd_truncation(m, rank), y)  # plain SVD, same rank
    assert rel(got, x @ whitened_truncation(m, x, rank)) < 1e-4
    assert rel(x @ whitened_truncation(m, x, rank - 1), y) > budget  # smallest rank
    a, b = initializers(out)["mm.lowrank0.weight"], initializers(out)["mm.lowrank1.weight"]
    assert a.shape == (32, rank) and b.shape == (rank, 24)


def conv2d(x: np.ndarray, w: np.ndarray, pads: tuple[int, int, int, int], strides=(1, 1)):
    """A plain numpy Conv (no dilation): x (N, C, H, W), w (O, C, kh, kw)."""
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1]]
    return np.einsum("nchwij,ocij->nohw", windows, w)


def correlated_images(rng: np.random.Generator, n: int, channels: int, hw: int) -> np.ndarray:
    mix = rng.normal(size=(channels, channels)) * (0.6 ** np.arange(channels))[:, None]
    return np.einsum("nchw,cd->ndhw", rng.normal(size=(n, channels, hw, hw)), mix)


def spatial_kernel(w: np.ndarray, rank: int) -> np.ndarray:
    """The plain spatial SVD of W at ``rank``, as a full kernel."""
    o, c, kh, kw = w.shape
    matrix = w.transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    return svd_truncation(matrix, rank).reshape(c, kh, o, kw).transpose(2, 0, 1, 3)


def test_spatial_refit_meets_the_budget_and_beats_plain_spatial(tmp_path):
    rng = np.random.default_rng(5)
    x = correlated_images(rng, 16, 12, 7).astype(np.float32).astype(np.float64)
    w = rng.normal(size=(16, 12, 3, 3))
    pads = (1, 1, 1, 1)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=list(pads))
    b = rng.normal(size=16)
    inits = [tensor("w", w.astype(np.float32)), tensor("b", b.astype(np.float32))]
    model = make_model([node], [("x", ["N", 12, 7, 7])], ["y"], inits)
    y = conv2d(x, w, pads)
    assert rel(run(model, {"x": x.astype(np.float32)})[0], y + b[:, None, None]) < 1e-5

    budget = 0.1
    context = PassContext(calibration=calibration(tmp_path, x))
    config = {
        "output_error": budget,
        "methods": ("spatial",),
        "patches_per_image": 49,
        "min_macs_saving": -10.0,
    }
    plain_out, _, (plain,) = factorize(model, context, **config)
    refit_out, _, (refit,) = factorize(model, context, refit=True, **config)
    assert ops(refit_out) == ["Conv", "Conv"] and refit.refit and not plain.refit

    def measured(out: onnx.ModelProto) -> float:
        return rel(run(out, {"x": x.astype(np.float32)})[0] - b[:, None, None], y)

    # All 49 positions per image are in the Gram: the recorded errors are the true ones.
    assert plain.output_error == pytest.approx(measured(plain_out), rel=1e-3)
    assert refit.output_error == pytest.approx(measured(refit_out), rel=1e-3)
    assert max(plain.output_error, refit.output_error) <= budget
    (plain_rank,), (refit_rank,) = plain.ranks, refit.ranks
    assert rel(conv2d(x, spatial_kernel(w, plain_rank - 1), pads), y) > budget  # smallest
    assert refit_rank < plain_rank
    plain_at_refit_rank = rel(conv2d(x, spatial_kernel(w, refit_rank), pads), y)
    assert refit.output_error < plain_at_refit_rank


def test_tucker2_and_1x1_under_an_output_budget(tmp_path):
    rng = np.random.default_rng(6)
    x = correlated_images(rng, 8, 8, 6).astype(np.float32).astype(np.float64)
    context = PassContext(calibration=calibration(tmp_path, x))
    for kernel, method in ((3, "tucker2"), (1, "svd")):
        core = rng.normal(size=(3, 3, kernel, kernel))
        w = np.einsum("rskl,or,is->oikl", core, rng.normal(size=(16, 3)), rng.normal(size=(8, 3)))
        w += 0.05 * rng.normal(size=w.shape)
        pads = (kernel // 2,) * 4
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=list(pads))
        model = make_model(
            [node], [("x", ["N", 8, 6, 6])], ["y"], [tensor("w", w.astype(np.float32))]
        )
        out, _, (layer,) = factorize(
            model, context, output_error=0.1, refit=True, methods=(method,), patches_per_image=36
        )
        got = run(out, {"x": x.astype(np.float32)})[0]
        error = rel(got, conv2d(x, w, pads))
        assert layer.method == method
        assert layer.output_error == pytest.approx(error, rel=1e-3)
        assert error <= 0.1
        assert layer.refit == (method == "svd")  # Tucker-2 stays weight-only


def im2col_gram(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """sum over images and output positions of p p^T, p the (C, kh, kw) patch, by loops."""
    top, left, bottom, right = geometry.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    ho, wo = geometry.out_hw
    features = x.shape[1] * kh * kw
    gram = np.zeros((features, features))
    for image in padded:
        for oy in range(ho):
            for ox in range(wo):
                rows = oy * sh + dh * np.arange(kh)
                cols = ox * sw + dw * np.arange(kw)
                p = image[:, rows][:, :, cols].reshape(-1)
                gram += np.outer(p, p)
    return gram


def test_patch_gram_is_the_im2col_gram_and_sampling_is_bounded():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 3, 7, 6))
    geometry = ConvGeometry((7, 6), (3, 2), (2, 1), (1, 2), (1, 0, 2, 1))
    observer = ConvPatchGram(geometry, 3, per_image=1000)
    observer.update(x[:2])
    observer.update(x[2:])
    assert observer.rows == 5 * geometry.out_hw[0] * geometry.out_hw[1]
    assert np.allclose(observer.gram, im2col_gram(x, geometry))

    sampled = ConvPatchGram(geometry, 3, per_image=4, seed=1)
    sampled.update(x)
    assert sampled.rows == 5 * 4
    assert np.all(np.linalg.eigvalsh(sampled.gram) >= -1e-9)  # a sum of outer products


def test_one_pass_over_the_data_for_all_layers(tmp_path):
    rng = np.random.default_rng(8)
    x = correlated(rng, 40, 16)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
    ]
    inits = [tensor("w1", rng.normal(size=(16, 16))), tensor("w2", rng.normal(size=(16, 12)))]
    inits = [tensor(i.name, numpy_helper.to_array(i).astype(np.float32)) for i in inits]
    model = make_model(nodes, [("x", ["N", 16])], ["y"], inits)
    seen: list[int] = []
    tasks: list[str] = []
    context = PassContext(
        calibration=calibration(tmp_path, x),
        on_task=lambda text, total: tasks.append(text),
        on_advance=seen.append,
    )
    _, record, layers = factorize(
        model, context, output_error=0.2, refit=True, min_macs_saving=-10.0
    )
    assert [layer.node for layer in layers] == ["mm1", "mm2"]
    assert sum(seen) == 40 and len(tasks) == 1  # one pass, shared
    assert all(layer.output_error is not None for layer in layers)
    assert all("by output error <= 0.2" in change for change in record.changes)


def test_without_calibration_data_the_ranks_come_from_the_energy():
    rng = np.random.default_rng(9)
    w = rng.normal(size=(32, 24)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["N", 32])],
        ["y"],
        [tensor("w", w)],
    )
    _, _, energy_layers = factorize(model, rank_energy=0.8, min_macs_saving=-10.0)
    _, record, layers = factorize(
        model, output_error=0.01, refit=True, rank_energy=0.8, min_macs_saving=-10.0
    )
    assert layers[0].ranks == energy_layers[0].ranks
    assert layers[0].output_error is None and not layers[0].refit
    assert "no calibration data: ranks from rank_energy 0.8" in record.summary
    assert "(by energy 0.80: no calibration data)" in record.changes[0]


def test_too_many_conv_features_fall_back_to_the_energy(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 8, 5, 5))
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    model = make_model([node], [("x", ["N", 8, 5, 5])], ["y"], [tensor("w", w)])
    context = PassContext(calibration=calibration(tmp_path, x))
    _, record, layers = factorize(
        model, context, output_error=0.1, max_gram_features=64, min_macs_saving=-10.0
    )
    assert layers[0].output_error is None
    assert "(by energy 0.90: 72 input features, no statistics)" in record.changes[0]


def two_layer_model(rng: np.random.Generator) -> onnx.ModelProto:
    low = [rng.normal(size=(32, 2)) @ rng.normal(size=(2, 32)) for _ in range(2)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
    ]
    inits = [tensor(f"w{i + 1}", w.astype(np.float32)) for i, w in enumerate(low)]
    return make_model(nodes, [("x", ["N", 32])], ["y"], inits)


def test_latency_choice_follows_the_timer():
    """fc1's chain is timed faster than fc1, fc2's slower: only fc1 is factorized."""
    times = {"fc1": 1.0, "fc1.lowrank0": 0.5, "fc2": 1.0, "fc2.lowrank0": 1.2}
    calls: list[tuple[list[str], tuple[int, ...]]] = []

    def timer(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        names = [n.name for n in model.graph.node]
        calls.append((names, feeds["x"].shape))
        assert run(model, feeds)[0].shape == (1, 32)
        return times[names[0]]

    model = two_layer_model(np.random.default_rng(11))
    out, record, layers = factorize(
        model, timer=timer, rank_energy=0.999, measure_latency=True, latency_margin=0.1
    )
    assert [layer.node for layer in layers] == ["fc1"]
    assert layers[0].latency_ratio == pytest.approx(0.5)
    assert record.changes[0].endswith("latency x0.50")
    assert [s.node for s in record.skipped] == ["fc2"]
    assert "runs in x1.20 the time of MatMul 'fc2' (at most x0.90" in record.skipped[0].reason
    assert ops(out) == ["MatMul", "MatMul", "MatMul"]
    assert [names for names, _ in calls] == [
        ["fc1"],
        ["fc1.lowrank0", "fc1.lowrank1"],
        ["fc2"],
        ["fc2.lowrank0", "fc2.lowrank1"],
    ]
    assert all(shape == (1, 32) for _, shape in calls)  # batch 1


def test_latency_models_compute_the_layer_and_its_chain():
    """The timed models are the real layer and chain: on the same feeds they agree."""
    outputs: dict[str, np.ndarray] = {}

    def timer(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        outputs[model.graph.node[0].name] = run(model, feeds)[0]
        return 1.0

    model = two_layer_model(np.random.default_rng(12))
    _, record, layers = factorize(model, timer=timer, rank_energy=0.999, measure_latency=True)
    assert layers == [] and len(record.skipped) == 2  # x1.00 is not faster by the margin
    for name in ("fc1", "fc2"):
        ref = outputs[name]
        assert np.abs(outputs[f"{name}.lowrank0"] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_latency_with_the_onnxruntime_timer_records_a_ratio():
    model = two_layer_model(np.random.default_rng(13))
    _, record, layers = factorize(model, rank_energy=0.999, measure_latency=True, latency_runs=3)
    assert len(layers) + len(record.skipped) == 2
    assert all(layer.latency_ratio is not None and layer.latency_ratio > 0 for layer in layers)
    assert all("runs in x" in s.reason for s in record.skipped)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_error": 0.0},
        {"output_error": 1.0},
        {"patches_per_image": 0},
        {"latency_margin": 1.0},
        {"latency_runs": 0},
    ],
)
def test_bad_data_config_is_refused(kwargs):
    with pytest.raises(OptionError):
        LowRankConfig(**kwargs)
