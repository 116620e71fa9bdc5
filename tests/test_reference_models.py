"""convert removes every foldable BatchNorm from the reference and torchvision-style networks."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp.converter.convert import convert
from onnxcomp.converter.verify import VerifyOptions

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("models.zoo")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)


def runtime_noise_floor(path: Path, options: VerifyOptions) -> float:
    """Relative error ONNX Runtime's own optimizations cause on the unchanged model."""
    from onnxcomp.backends.ort import SessionConfig
    from onnxcomp.converter.verify import verify_files

    return verify_files(path, path, options, SessionConfig()).relative_error


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_every_batchnorm_is_folded_and_verified(name, tmp_path):
    """Randomly initialised deep nets amplify float32 rounding: the fold must stay within
    1e-5, or within twice what ONNX Runtime's own graph optimizations cause on the original."""
    source = zoo.export_reference(name, tmp_path / f"{name}.onnx", keep_batchnorm=True)
    assert bn_count(source) > 0
    out = tmp_path / f"{name}.folded.onnx"
    options = VerifyOptions(samples=4, batch_size=2)
    report = convert(source, out, verify=options)
    assert bn_count(out) == 0
    fold = next(r for r in report.records if r.name == "fold-batchnorm")
    assert fold.skipped == []
    bound = max(1e-5, 2 * runtime_noise_floor(source, options))
    assert report.fidelity.relative_error <= bound
    assert report.fidelity.outputs[0].cosine > 0.999999


def test_nhwc_graph_with_transposes_converts(tmp_path):
    """TensorFlow converters wrap NCHW ops in Transposes around an NHWC interface."""
    from graphs import RNG, bn_node, bn_params, make_model, tensor
    from onnx import helper

    inits = [tensor("w", RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)), *bn_params("bn", 8)]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "w"], ["c"], pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "b"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1]),
    ]
    model = make_model(nodes, [("x", ["N", 6, 6, 3])], ["y"], inits, opset=13)
    source = tmp_path / "nhwc.onnx"
    onnx.save(model, source)
    report = convert(source, tmp_path / "out.onnx", verify=VerifyOptions(tolerance=1e-5))
    assert bn_count(tmp_path / "out.onnx") == 0
    assert report.fidelity.relative_error <= 1e-5


@pytest.mark.skipif(not (SHARED / "pretrained").is_dir(), reason=f"{SHARED} is absent")
def test_pretrained_resnet20_on_real_images_keeps_accuracy(tmp_path):
    archive = SHARED / "cifar10" / "test_jpg.tar.gz"
    images = tmp_path / "images"
    with tarfile.open(archive) as tar:
        taken: dict[str, int] = {}
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            label = Path(member.name).parent.name
            if taken.get(label, 0) >= 6:
                if len(taken) == 10 and all(v >= 6 for v in taken.values()):
                    break
                continue
            taken[label] = taken.get(label, 0) + 1
            target = images / label / Path(member.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    source = zoo.export_reference(
        "resnet20", tmp_path / "r20.onnx", keep_batchnorm=True, pretrained_dir=SHARED
    )
    from onnxcomp.data import get_preset

    verify = VerifyOptions(data=images, preprocess=get_preset("cifar10"), tolerance=1e-5)
    report = convert(source, tmp_path / "r20.folded.onnx", verify=verify)
    fidelity = report.fidelity
    assert bn_count(tmp_path / "r20.folded.onnx") == 0
    assert fidelity.samples == 60
    assert fidelity.top1_agreement == 1.0
    assert fidelity.candidate_accuracy == fidelity.reference_accuracy
    assert fidelity.reference_accuracy > 0.6


def test_inspect_counts_every_layer_of_the_raw_export(tmp_path):
    """The export computes Pad's pads with a ConstantOfShape chain: shapes behind it are still
    known (inspect folds constants on a copy) and the MACs equal those of the cleaned model."""
    from onnxcomp.core.analysis import summarize

    source = zoo.export_reference("resnet20", tmp_path / "r20.onnx", keep_batchnorm=True)
    raw = summarize(onnx.load(source))
    folded_path = tmp_path / "r20.folded.onnx"
    convert(source, folded_path, verify=None)
    folded = summarize(onnx.load(folded_path))
    assert raw.unknown_shape_layers == [] and folded.unknown_shape_layers == []
    # 40.55 M MACs is the published count for the CIFAR ResNet-20 (e.g. ptflops, thop)
    assert raw.total_macs == folded.total_macs == 40_551_040
    assert raw.op_histogram["BatchNormalization"] == 19  # the report describes the raw model
