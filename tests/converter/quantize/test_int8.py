"""int8 conversion end to end: fused int8 graph, settings, calibration table, error paths."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxcomp.cli import main
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.converter.quantize.table import CalibrationTable
from onnxcomp.converter.verify import VerifyOptions
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OnnxcompError

zoo = pytest.importorskip("models.zoo")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8")


@pytest.fixture(scope="module")
def resnet(workdir) -> Path:
    """A CIFAR ResNet-20 (random weights, realistic BatchNorm statistics), BN kept."""
    return zoo.export_reference("resnet20", workdir / "resnet20.onnx", keep_batchnorm=True)


@pytest.fixture(scope="module")
def calib(workdir) -> Path:
    rng = np.random.default_rng(0)
    path = workdir / "calib.npz"
    np.savez(path, input=rng.standard_normal((48, 3, 32, 32)).astype(np.float32))
    return path


def quantize(source: Path, out: Path, calib: Path | None, **config) -> object:
    return convert(
        source,
        out,
        PipelineOptions(int8=QuantizeConfig(**config)),
        VerifyOptions(data=calib, batch_size=16),
        force=True,
        calibration=DataOptions(data=calib, batch_size=16) if calib else None,
    )


@pytest.fixture(scope="module")
def int8_model(resnet, calib, workdir) -> tuple[Path, object]:
    out = workdir / "resnet20.int8.onnx"
    cache = workdir / "table.json"
    report = quantize(resnet, out, calib, calib_cache=cache)
    return out, report


def optimized_ops(path: Path, workdir: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(workdir / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )


def test_every_conv_and_residual_add_runs_on_int8_kernels(int8_model, resnet, workdir):
    out, report = int8_model
    onnx.checker.check_model(str(out))
    fp32 = collections.Counter(n.op_type for n in onnx.load(resnet).graph.node)
    ops = optimized_ops(out, workdir)
    assert ops["QLinearConv"] == fp32["Conv"] == 19
    assert ops["QLinearAdd"] == fp32["Add"] == 9
    assert ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    # no float islands: one QuantizeLinear at the input, nothing dequantized on the way
    assert ops["Conv"] == ops["Add"] == ops["DequantizeLinear"] == 0
    assert ops["QuantizeLinear"] == 1
    assert report.fidelity.outputs[0].cosine > 0.99


def test_weights_are_stored_as_int8(int8_model, resnet):
    out, _ = int8_model
    model = onnx.load(out)
    int8_bytes = sum(
        numpy_helper.to_array(i).nbytes
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8
    )
    conv_weights = sum(
        numpy_helper.to_array(i).size
        for i in onnx.load(resnet).graph.initializer
        if i.name.endswith(("conv1.weight", "conv2.weight", "linear.weight"))
    )
    assert int8_bytes >= conv_weights  # every weight element stored in one byte
    assert not [
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(i).size > 64
    ]  # no large float tensor left
    assert out.stat().st_size < 0.35 * Path(resnet).stat().st_size


def test_calibration_table_is_reused_without_data(int8_model, resnet, workdir, monkeypatch):
    _, _ = int8_model
    table = CalibrationTable.load(workdir / "table.json")
    assert table.method == "mse" and len(table.ranges) > 25

    from onnxcomp.converter.base import PassContext

    def no_data_pass(*args, **kwargs):
        raise AssertionError("the data was run although the table has every range")

    # Every data pass goes through PassContext.collect (declared statistics).
    monkeypatch.setattr(PassContext, "collect", no_data_pass)
    out = workdir / "again.onnx"
    convert(
        resnet,
        out,
        PipelineOptions(int8=QuantizeConfig(calib_cache=workdir / "table.json")),
        verify=None,
        force=True,
    )
    first = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(workdir / "resnet20.int8.onnx").graph.initializer
    }
    again = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_table_that_does_not_match_is_refused(int8_model, resnet, workdir):
    table = CalibrationTable.load(workdir / "table.json")
    missing = sorted(table.ranges)[:2]
    for name in missing:
        del table.ranges[name]
    bad = workdir / "bad_table.json"
    table.save(bad)
    with pytest.raises(OnnxcompError, match="does not match the model") as info:
        convert(
            resnet,
            workdir / "x.onnx",
            PipelineOptions(int8=QuantizeConfig(calib_cache=bad)),
            verify=None,
            force=True,
        )
    assert missing[0] in str(info.value)


def test_already_quantized_model_is_refused(int8_model, calib, workdir):
    out, _ = int8_model
    with pytest.raises(OnnxcompError, match="already quantized"):
        quantize(out, workdir / "twice.onnx", calib)


def test_symmetric_int8_activations_for_tensorrt_and_per_tensor_weights(resnet, calib, workdir):
    out = workdir / "s8.onnx"
    quantize(resnet, out, calib, target="tensorrt", per_channel=False)
    model = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and zero_point.item() == 0
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None:
            assert inits[node.input[1]].size == 1  # per-tensor scale


@pytest.mark.parametrize("method", ["minmax", "entropy", "mse", "dfp"])
def test_each_calibrator_gives_a_faithful_model(method, resnet, calib, workdir):
    report = quantize(resnet, workdir / f"{method}.onnx", calib, calibration=method)
    # random weights and inputs: a loose bound; the real-model figures are in BENCHMARKS.md
    assert report.fidelity.outputs[0].cosine > 0.9
    assert report.records[-1].summary.startswith("U8S8 per-channel QDQ, " + method)


def test_all_zero_calibration_data_gives_finite_scales(resnet, workdir):
    zeros = workdir / "zeros.npz"
    np.savez(zeros, input=np.zeros((8, 3, 32, 32), np.float32))
    out = workdir / "zeros.onnx"
    quantize(resnet, out, zeros)
    for init in onnx.load(out).graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype.kind == "f":
            assert np.isfinite(values).all(), init.name
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0]).all()


def convert_int8(capsys, resnet, workdir, *args: str) -> tuple[int, str]:
    """``convert MODEL -o o.onnx --int8 ARGS``: the exit code and stderr."""
    code = main(["convert", str(resnet), "-o", str(workdir / "o.onnx"), "--int8", *args])
    return code, capsys.readouterr().err


def test_cli_int8_needs_calibration_data(resnet, workdir, capsys):
    code, err = convert_int8(capsys, resnet, workdir)
    assert code == 2 and "--calib" in err and "Traceback" not in err


def test_cli_unknown_calibrator(resnet, calib, workdir, capsys):
    code, err = convert_int8(
        capsys, resnet, workdir, "--calib", str(calib), "--calibration", "magic"
    )
    assert code == 2 and "minmax" in err


def test_cli_calibration_images_of_the_wrong_size(resnet, workdir, capsys):
    from PIL import Image

    folder = workdir / "big_images" / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / f"{i}.png")
    code, err = convert_int8(capsys, resnet, workdir, "--calib", str(folder.parent))
    assert code == 2 and "--resize" in err


def test_classifier_mlp_has_no_float_island(calib, workdir):
    """Linear -> ReLU -> Linear: the hidden Gemm keeps an int8 output (its ReLU folds into the
    uint8 clamp); only the last Gemm, feeding the graph output, outputs float."""
    source = zoo.export_reference("vgg_cifar", workdir / "vgg.onnx", keep_batchnorm=True)
    out = workdir / "vgg.int8.onnx"
    quantize(source, out, calib)
    fp32 = collections.Counter(n.op_type for n in onnx.load(source).graph.node)
    ops = optimized_ops(out, workdir)
    assert ops["QGemm"] == fp32["Gemm"] == 2
    assert ops["QLinearConv"] == fp32["Conv"]
    assert ops["Relu"] == ops["Gemm"] == ops["Conv"] == ops["DequantizeLinear"] == 0


def test_bias_correction_and_equalization_run_in_the_pipeline(resnet, calib, workdir):
    out = workdir / "bc.onnx"
    report = convert(
        resnet,
        out,
        PipelineOptions(equalize="exact", int8=QuantizeConfig(bias_correction=True)),
        VerifyOptions(data=calib, batch_size=16),
        force=True,
        calibration=DataOptions(data=calib, batch_size=16),
    )
    names = [r.name for r in report.records]
    assert names == ["cleanup", "fold-batchnorm", "equalize", "int8"]
    int8 = report.records[-1]
    assert any(
        c.startswith("bias correction: ") and not c.endswith(" 0 layer(s)") for c in int8.changes
    )
    assert report.fidelity.outputs[0].cosine > 0.98
