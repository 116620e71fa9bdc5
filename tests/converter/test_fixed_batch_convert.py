"""``convert --int8``, verification, debug, the data passes of pruning, low-rank and mixed
precision, and bench on models whose batch is fixed to 1 or 4, or symbolic: 10 samples, each
counted once, metrics equal to a reference computed sample by sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from int8_models import small_cnn, with_symbolic_batch

from onnxcomp.backends.bench import benchmark
from onnxcomp.backends.ort import SessionConfig, create_session
from onnxcomp.converter.base import PassContext
from onnxcomp.converter.convert import convert
from onnxcomp.converter.debug import debug_models
from onnxcomp.converter.lowrank.config import LowRankConfig
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.prune.config import PruneConfig
from onnxcomp.converter.quantize import mixed_precision
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.converter.verify import VerifyOptions, verify_files
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OnnxcompError
from onnxcomp.stats import request as stats_request

SAMPLES = np.random.default_rng(21).normal(size=(10, 3, 8, 8)).astype(np.float32)
LABELS = np.random.default_rng(22).integers(0, 10, size=10)
BATCHES = [1, 4, "N"]


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, input=SAMPLES, labels=LABELS)
    return path


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def per_sample(model: onnx.ModelProto, optimization: str) -> np.ndarray:
    """Logits of each sample run alone on a symbolic-batch copy."""
    config = SessionConfig(optimization_level=optimization)
    session = create_session(with_symbolic_batch(model).SerializeToString(), config)
    return np.concatenate([session.run(None, {"input": s[None]})[0] for s in SAMPLES])


def reference_metrics(original: onnx.ModelProto, converted: onnx.ModelProto) -> dict:
    ref = per_sample(original, "disable").astype(np.float64)
    cand = per_sample(converted, "all").astype(np.float64)
    diff = np.abs(cand - ref)
    return {
        "max_abs_error": diff.max(),
        "mean_abs_error": diff.mean(),
        "relative_error": diff.max() / np.abs(ref).max(),
        "cosine": np.vdot(ref, cand) / np.sqrt(np.vdot(ref, ref) * np.vdot(cand, cand)),
        "top1_agreement": np.mean(ref.argmax(1) == cand.argmax(1)),
        "reference_accuracy": np.mean(ref.argmax(1) == LABELS),
        "candidate_accuracy": np.mean(cand.argmax(1) == LABELS),
    }


def check_fidelity(fidelity, original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    assert fidelity.samples == 10
    out = fidelity.outputs[0]
    got = {
        "max_abs_error": out.max_abs_error,
        "mean_abs_error": out.mean_abs_error,
        "relative_error": out.relative_error,
        "cosine": out.cosine,
        "top1_agreement": out.top1_agreement,
        "reference_accuracy": fidelity.reference_accuracy,
        "candidate_accuracy": fidelity.candidate_accuracy,
    }
    expected = reference_metrics(original, converted)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("batch", BATCHES)
def test_convert_int8_calibrates_and_verifies_each_sample_once(tmp_path, npz, monkeypatch, batch):
    samples: list[int] = []
    real = stats_request.collect_statistics

    def spy(*args, **kwargs):
        statistics = real(*args, **kwargs)
        samples.append(statistics.samples)
        return statistics

    monkeypatch.setattr(stats_request, "collect_statistics", spy)
    original = small_cnn(batch=batch)
    source, output = save(original, tmp_path / "m.onnx"), tmp_path / "m.int8.onnx"
    report = convert(
        source,
        output,
        PipelineOptions(int8=QuantizeConfig()),
        VerifyOptions(data=npz),
        calibration=DataOptions(data=npz, batch_size=32),
    )
    assert samples == [10]
    converted = onnx.load(output)
    assert any(n.op_type == "QuantizeLinear" for n in converted.graph.node)
    check_fidelity(report.fidelity, original, converted)
    if batch == "N":
        assert report.notes == [] and report.fidelity.notes == []
    else:
        note = f"batch fixed to {batch} by the model: calibration and verification run {batch}"
        assert len(report.notes) == 1 and report.notes[0].startswith(note)
        assert report.fidelity.notes == report.notes


@pytest.mark.parametrize("batch", [1, 4])
def test_calibration_statistics_count_ten_samples(npz, batch):
    context = PassContext(calibration=DataOptions(data=npz, batch_size=32))
    model = ir.from_proto(small_cnn(batch=batch))
    Pipeline.from_options(PipelineOptions(int8=QuantizeConfig()), context).run(model)
    statistics = context.collected.statistics
    assert statistics.samples == 10
    # conv1's input is the model input: its histogram counts exactly the 10 samples' values.
    assert statistics.histograms["input"].count == SAMPLES.size
    assert statistics.histograms["input"].max == float(SAMPLES.max())


def test_data_passes_of_prune_lowrank_and_mixed_precision(tmp_path, npz, monkeypatch):
    """thinet pruning, --rank-error and --max-drop on a batch fixed to 4: every run over the
    data sees the 10 samples once."""
    runs: list[tuple[str, int]] = []
    real = stats_request.collect_statistics

    def spy(model, *args, **kwargs):
        statistics = real(model, *args, **kwargs)
        runs.append(("collect", statistics.samples))
        return statistics

    real_top1 = mixed_precision.Evaluator._top1

    def top1(session, feeds):
        predictions = real_top1(session, feeds)
        assert len(predictions) == feeds["input"].shape[0]
        runs.append(("evaluate", len(predictions)))
        return predictions

    monkeypatch.setattr(stats_request, "collect_statistics", spy)
    monkeypatch.setattr(mixed_precision.Evaluator, "_top1", staticmethod(top1))
    options = PipelineOptions(
        prune=PruneConfig(ratio=0.5, method="thinet", multiple=1, min_channels=1),
        lowrank=LowRankConfig(output_error=0.5, min_macs_saving=0.0),
        int8=QuantizeConfig(max_drop=0.0),
    )
    source = save(small_cnn(batch=4), tmp_path / "m.onnx")
    report = convert(
        source,
        tmp_path / "out.onnx",
        options,
        VerifyOptions(data=npz),
        calibration=DataOptions(data=npz, batch_size=32),
    )
    collects = [n for kind, n in runs if kind == "collect"]
    records = {r.name: r for r in report.records}
    assert records["prune"].modified and records["lowrank"].modified  # both read the data
    assert len(collects) >= 4 and all(n == 10 for n in collects)
    evaluated = [n for kind, n in runs if kind == "evaluate"]
    assert evaluated == [4, 4, 2] * (len(evaluated) // 3) and evaluated
    assert report.fidelity.samples == 10
    assert (
        onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    )


@pytest.fixture(scope="module")
def int8_pairs(tmp_path_factory) -> dict:
    """For batch 1 and 4: the float model, its int8 version and calibration data."""
    folder = tmp_path_factory.mktemp("fixed")
    data = folder / "calib.npz"
    np.savez(data, input=SAMPLES, labels=LABELS)
    pairs = {}
    for batch in (1, 4):
        fp32 = save(small_cnn(batch=batch), folder / f"b{batch}.onnx")
        int8 = folder / f"b{batch}.int8.onnx"
        convert(
            fp32,
            int8,
            PipelineOptions(int8=QuantizeConfig()),
            None,
            calibration=DataOptions(data=data),
        )
        pairs[batch] = (fp32, int8)
    return {"data": data, "pairs": pairs}


@pytest.mark.parametrize("batch", [1, 4])
def test_compare_and_debug_run_each_sample_once(int8_pairs, batch):
    fp32, int8 = int8_pairs["pairs"][batch]
    data = DataOptions(data=int8_pairs["data"], batch_size=8)
    fidelity = verify_files(fp32, int8, VerifyOptions(data=data.data, batch_size=8))
    check_fidelity(fidelity, onnx.load(fp32), onnx.load(int8))
    report = debug_models(fp32, int8, data)
    assert report.samples == 10
    assert report.top1_agreement == fidelity.top1_agreement
    assert any(f"batch fixed to {batch}" in note for note in report.notes)
    assert all(layer.activation_sqnr_db is not None for layer in report.layers if layer.tensor)


def test_compare_a_fixed_batch_with_a_symbolic_one(tmp_path, npz):
    fixed = save(small_cnn(batch=4), tmp_path / "fixed.onnx")
    symbolic = save(small_cnn(), tmp_path / "symbolic.onnx")
    for a, b in ((fixed, symbolic), (symbolic, fixed)):
        fidelity = verify_files(a, b, VerifyOptions(data=npz))
        assert fidelity.samples == 10 and fidelity.relative_error < 1e-5
        assert any("batch fixed to 4" in note for note in fidelity.notes)


def test_models_fixing_different_batches_are_refused(tmp_path, npz):
    one = save(small_cnn(batch=1), tmp_path / "one.onnx")
    four = save(small_cnn(batch=4), tmp_path / "four.onnx")
    with pytest.raises(OnnxcompError, match=r"four\.onnx: fixes the batch to 4.*one\.onnx to 1"):
        verify_files(one, four, VerifyOptions(data=npz))
    with pytest.raises(OnnxcompError, match="fix different batch sizes"):
        benchmark([one, four], SessionConfig(), iterations=1, warmup=0)


@pytest.mark.parametrize("batch", [1, 4])
def test_bench_times_the_fixed_batch(int8_pairs, batch):
    fp32, int8 = int8_pairs["pairs"][batch]
    results = benchmark([fp32, int8], SessionConfig(), batch=8, iterations=3, warmup=1)
    assert [r.batch for r in results] == [batch, batch]
    assert results[0].notes == (
        f"batch fixed to {batch} by the model: timed at batch {batch}, not 8",
    )
    same = benchmark([fp32], SessionConfig(), batch=batch, iterations=2, warmup=0)
    assert same[0].batch == batch and same[0].notes == ()
