"""The ``ort`` deploy target: the .ort loads in a regular InferenceSession and matches ORT on
the .onnx; the manifest, checksums and samples; the output folder rules; bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from graphs import make_model, tensor
from int8_models import minmax_ranges, quantize, small_cnn
from onnx import TensorProto, helper

from onnxcomp.converter.verify import VerifyOptions
from onnxcomp.data.preprocess import PRESETS
from onnxcomp.deploy import DeployOptions, deploy
from onnxcomp.deploy.manifest import guess_layout
from onnxcomp.errors import OnnxcompError, OptionError

X = np.random.default_rng(1).normal(size=(12, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    float_model = small_cnn()
    onnx.save(float_model, folder / "cnn.onnx")
    onnx.save(quantize(float_model, minmax_ranges(float_model, X)), folder / "cnn_int8.onnx")
    return {"float": folder / "cnn.onnx", "int8": folder / "cnn_int8.onnx"}


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("kind", "platform"), [("float", "arm"), ("int8", "arm"), ("int8", "amd64")]
)
def test_ort_file_loads_and_matches_the_onnx(models, tmp_path, kind, platform):
    out = tmp_path / "out"
    report = deploy(models[kind], out, DeployOptions(platform=platform))
    ort_file = out / f"{models[kind].stem}.ort"
    assert report.artifact == ort_file.name
    got, want = ort_outputs(ort_file, X), ort_outputs(models[kind], X)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < (1e-5 if kind == "float" else 1e-2)
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0
    assert report.judged == (kind == "float")
    assert report.fidelity.relative_error == pytest.approx(0.0, abs=1e-2)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ort_file.name, "manifest.json", "required_operators.config", "samples.npz"]
    )
    assert not list(tmp_path.glob(".onnxcomp-*"))  # the staging folder is gone


def test_required_operators_config_lists_the_ops(models, tmp_path):
    deploy(models["int8"], tmp_path / "out")
    text = (tmp_path / "out" / "required_operators.config").read_text()
    assert "# - cnn_int8.ort" in text and str(tmp_path) not in text
    lines = {line.split(";")[0]: line.split(";")[2].split(",") for line in text.splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    # ORT fused the QDQ CNN into int8 kernels: these are what a reduced build must keep.
    assert {"QLinearConv", "QGemm"} <= set(lines["com.microsoft"])
    assert "QuantizeLinear" in lines["ai.onnx"]
    assert "Conv" not in lines["ai.onnx"]


def test_manifest_contents_and_checksums(models, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    out = tmp_path / "out"
    options = DeployOptions(labels=labels, verify=VerifyOptions(preprocess=PRESETS["cifar10"]))
    deploy(models["float"], out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "ort" and manifest["platform"] == "arm"
    assert manifest["source"] == {"file": "cnn.onnx", "sha256": sha(models["float"])}
    assert manifest["inputs"] == [
        {"name": "input", "dtype": "float", "shape": ["N", 3, 8, 8], "layout": "NCHW"}
    ]
    assert manifest["preprocessing"]["mean"] == list(PRESETS["cifar10"].mean)
    assert manifest["outputs"] == [{"name": "logits", "dtype": "float", "shape": ["N", 10]}]
    assert manifest["labels"] == [f"class{i}" for i in range(10)]
    assert manifest["ops"] == {
        "Conv": 2, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 2
    }  # fmt: skip
    shipped = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == shipped
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (out / name).stat().st_size, "sha256": sha(out / name)}
    assert manifest["artifact"]["bytes"] == (out / "cnn.ort").stat().st_size
    # The samples: inputs and the artifact's outputs on them, which ORT on the .onnx matches.
    samples = np.load(out / "samples.npz")
    keys = manifest["samples"]
    assert keys["inputs"] == {"input_0": "input"} and keys["outputs"] == {"output_0": "logits"}
    assert samples["input_0"].shape == (4, 3, 8, 8)
    want = ort_outputs(models["float"], samples["input_0"])
    np.testing.assert_allclose(samples["output_0"], want, rtol=1e-5, atol=1e-5)


def test_non_empty_output_is_refused_without_force_and_left_unchanged(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OnnxcompError, match=r"not empty.*--force") as info:
        deploy(models["float"], out)
    assert "\n" not in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    deploy(models["float"], out, DeployOptions(force=True))
    assert not (out / "keep.txt").exists() and (out / "cnn.ort").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_output_folder_is_used(models, tmp_path):
    (tmp_path / "out").mkdir()
    deploy(models["float"], tmp_path / "out")
    assert (tmp_path / "out" / "cnn.ort").is_file()


def test_output_holding_the_input_is_refused_even_with_force(models, tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(models["float"].read_bytes())
    with pytest.raises(OnnxcompError, match="holds the input model"):
        deploy(model, tmp_path, DeployOptions(force=True))
    assert model.read_bytes() == models["float"].read_bytes()


def int4_model() -> onnx.ModelProto:
    weights = helper.make_tensor("w", TensorProto.INT4, [4, 4], [1, -2, 3, -4] * 4)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name="dq"),
        helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm"),
    ]
    return make_model(
        nodes, [("x", ["N", 4])], ["y"], [weights, tensor("s", np.float32(0.1))], opset=21
    )


def test_int4_is_refused_in_one_line(tmp_path):
    model = tmp_path / "int4.onnx"
    onnx.save(int4_model(), model)
    with pytest.raises(OnnxcompError, match="initializer 'w' is INT4") as info:
        deploy(model, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4.onnx"]


def two_layout_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 3, 1, 2]),
        helper.make_node("Add", ["a", "bt"], ["y"]),
    ]
    return make_model(nodes, [("a", [1, 3, 8, 8]), ("b", [1, 8, 8, 3])], ["y"], [])


def test_two_inputs_of_different_layouts_with_one_preprocessing_are_refused(tmp_path):
    model = tmp_path / "two.onnx"
    onnx.save(two_layout_model(), model)
    options = DeployOptions(verify=VerifyOptions(preprocess=PRESETS["cifar10"]))
    with pytest.raises(OnnxcompError, match="'a' NCHW, 'b' NHWC") as info:
        deploy(model, tmp_path / "out", options)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    deploy(model, tmp_path / "out")  # without preprocessing each input keeps its own layout
    layouts = [
        i["layout"] for i in json.loads((tmp_path / "out/manifest.json").read_text())["inputs"]
    ]
    assert layouts == ["NCHW", "NHWC"]


def test_op_ort_cannot_run_is_one_line(tmp_path):
    node = helper.make_node("Foo", ["x"], ["y"], domain="custom.ops")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), tmp_path / "foo.onnx")
    with pytest.raises(OnnxcompError, match=r"custom\.ops:Foo") as info:
        deploy(tmp_path / "foo.onnx", tmp_path / "out")
    assert "\n" not in str(info.value) and ".onnxcomp-deploy" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foo.onnx"]


def test_guess_layout():
    assert guess_layout([1, 3, 224, 224]) == "NCHW"
    assert guess_layout(["N", 224, 224, 3]) == "NHWC"
    assert guess_layout([1, 3, 3, 3]) is None
    assert guess_layout([1, 10]) is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"target": "coreml"}, "--target coreml: unknown target; choose one of ort, tflite"),
        ({"platform": "x86"}, "--platform x86"),
        ({"io_dtype": "int8"}, "--io-dtype int8: target ort takes float32 only"),
        ({"labels": Path("/nonexistent/labels.txt")}, "--labels"),
    ],
)
def test_bad_options_are_one_line(kwargs, fragment):
    with pytest.raises(OptionError) as info:
        DeployOptions(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_tflite_without_its_writer_is_one_line(models, tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("onnxcomp.deploy.tflite"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(OnnxcompError, match=r"--target tflite: .*no TFLite writer"):
        deploy(models["float"], tmp_path / "out", DeployOptions(target="tflite"))
    assert not (tmp_path / "out").exists()


def test_verification_failure_writes_nothing(models, tmp_path, monkeypatch):
    """A float artifact that differs from its model is refused: nothing is left behind."""
    from dataclasses import replace

    from onnxcomp.deploy import targets

    ort = targets.TARGETS["ort"]
    broken = replace(ort, runner=lambda s: lambda feeds: [o + 1.0 for o in ort.runner(s)(feeds)])
    monkeypatch.setitem(targets.TARGETS, "ort", broken)
    with pytest.raises(OnnxcompError, match="nothing written"):
        deploy(models["float"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tflite_target_end_to_end_matches_the_onnx_model(models, tmp_path):
    """The tflite target takes NCHW float feeds through its adapter (NHWC, int8 I/O)."""
    pytest.importorskip("ai_edge_litert")
    for io_dtype, source in (("float32", models["float"]), ("int8", models["int8"])):
        out = tmp_path / f"out-{io_dtype}"
        report = deploy(source, out, DeployOptions(target="tflite", io_dtype=io_dtype))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["target"] == "tflite"
        assert (out / f"{Path(source).stem}.tflite").is_file()
        assert oct(out.stat().st_mode & 0o777) != oct(0o700)
        fidelity = report.fidelity
        if io_dtype == "float32":
            assert fidelity.relative_error < 1e-4
        else:
            assert min(o.cosine for o in fidelity.outputs) > 0.99
