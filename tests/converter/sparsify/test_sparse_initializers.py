"""ONNX sparse_initializer storage (``convert --sparse-initializers``) and every reader of such
a file: ORT on the dense file is the reference; load_model, convert, pack/unpack and the
training importer must see the same weights (onnx-ir alone drops them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.sparsify import SparsityConfig
from onnxcomp.core.io import load_model
from onnxcomp.core.proto import densify, store_sparse
from onnxcomp.errors import OnnxcompError
from onnxcomp.storage.packed import pack, unpack
from tests.graphs import make_model, tensor

RNG = np.random.default_rng(12)
X = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)


def net(zeros: float = 0.9) -> onnx.ModelProto:
    """Conv(3->8) -> Relu -> Conv(8->16, ``zeros`` of its weights exactly 0) -> Relu -> Flatten
    -> Gemm(576->10): only w2 is mostly zeros; biases are 1-D."""
    w2 = RNG.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    w2.ravel()[RNG.permutation(w2.size)[: round(zeros * w2.size)]] = 0
    inits = [
        tensor("w1", RNG.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)),
        tensor("b1", RNG.normal(0, 0.1, 8).astype(np.float32)),
        tensor("w2", w2),
        tensor("b2", np.zeros(16, np.float32)),
        tensor("w3", RNG.normal(0, 0.1, (10, 16 * 6 * 6)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [("x", ["N", 3, 6, 6])], ["y"], inits)


def ort_run(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


def files(tmp_path: Path, zeros: float = 0.9) -> tuple[Path, Path]:
    """The dense file and the same model with store_sparse applied."""
    dense = net(zeros)
    onnx.save(dense, tmp_path / "dense.onnx")
    moved = store_sparse(dense)
    onnx.save(dense, tmp_path / "sparse.onnx")
    assert moved == (["w2"] if zeros > 2 / 3 else [])
    return tmp_path / "dense.onnx", tmp_path / "sparse.onnx"


def weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_sparse_file_runs_in_ort_like_the_dense_file_and_is_smaller(tmp_path):
    dense, sparse = files(tmp_path)
    onnx.checker.check_model(str(sparse))
    np.testing.assert_array_equal(ort_run(sparse), ort_run(dense))
    # w2: 1,152 floats = 4,608 B dense; 115 non-zeros x (4 + 8) B = 1,380 B sparse
    assert dense.stat().st_size - sparse.stat().st_size > 3000


def test_below_two_thirds_zeros_nothing_is_moved(tmp_path):
    _, sparse = files(tmp_path, zeros=0.6)
    assert not onnx.load(sparse).graph.sparse_initializer


def test_onnx_ir_drops_them_and_load_model_reads_them(tmp_path):
    dense, sparse = files(tmp_path)
    assert "w2" not in ir.load(str(sparse)).graph.initializers  # why load_model densifies
    model = load_model(sparse)
    expected = weights(onnx.load(dense))
    got = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)
    onnx.save(ir.to_proto(model), tmp_path / "round.onnx")
    np.testing.assert_array_equal(ort_run(tmp_path / "round.onnx"), ort_run(dense))


def test_densify_reads_coordinate_indices():
    array = np.zeros((3, 4), np.float32)
    array[0, 1], array[2, 3] = 1.5, -2.0
    graph = helper.make_graph([], "g", [], [], sparse_initializer=[
        helper.make_sparse_tensor(
            tensor("w", np.array([1.5, -2.0], np.float32)),
            tensor("w.indices", np.array([[0, 1], [2, 3]], np.int64)),
            [3, 4],
        )
    ])  # fmt: skip
    proto = helper.make_model(graph)
    assert densify(proto) == 1 and not proto.graph.sparse_initializer
    np.testing.assert_array_equal(weights(proto)["w"], array)


def test_sparse_values_in_external_data_are_refused_in_one_line():
    values = tensor("w", np.ones(2, np.float32))
    values.data_location = onnx.TensorProto.EXTERNAL
    sparse = helper.make_sparse_tensor(values, tensor("w.indices", np.array([0, 3])), [2, 2])
    proto = helper.make_model(helper.make_graph([], "g", [], [], sparse_initializer=[sparse]))
    with pytest.raises(OnnxcompError, match=r"sparse initializer 'w'.*external data") as error:
        densify(proto)
    assert "\n" not in str(error.value)


def test_convert_writes_them_with_sparsity_and_reads_them_back(tmp_path):
    onnx.save(net(zeros=0.0), tmp_path / "m.onnx")
    options = PipelineOptions(sparsity=SparsityConfig(0.9))
    plain = tmp_path / "plain.onnx"
    convert(tmp_path / "m.onnx", plain, options)
    out = tmp_path / "out.onnx"
    report = convert(tmp_path / "m.onnx", out, options, sparse_initializers=True)
    stored = onnx.load(out)
    assert sorted(s.values.name for s in stored.graph.sparse_initializer) == ["w2", "w3"]
    assert any("2 weight(s) stored as ONNX sparse_initializer" in n for n in report.notes)
    assert report.output_bytes < plain.stat().st_size
    np.testing.assert_array_equal(ort_run(out), ort_run(plain))
    again = tmp_path / "again.onnx"  # convert -> convert: lossless passes verified against out
    convert(out, again, PipelineOptions(), sparse_initializers=True)
    np.testing.assert_array_equal(ort_run(again), ort_run(plain))


def test_without_mostly_zero_weights_convert_says_so_in_one_line(tmp_path):
    onnx.save(net(zeros=0.0), tmp_path / "m.onnx")
    report = convert(tmp_path / "m.onnx", tmp_path / "o.onnx", sparse_initializers=True)
    (note,) = [n for n in report.notes if "--sparse-initializers" in n]
    assert "no weight is sparse enough" in note and "--sparsity" in note
    assert not onnx.load(tmp_path / "o.onnx").graph.sparse_initializer


def test_already_sparse_weights_are_stored_without_sparsity(tmp_path):
    dense, _ = files(tmp_path)
    report = convert(dense, tmp_path / "o.onnx", PipelineOptions(), sparse_initializers=True)
    assert [s.values.name for s in onnx.load(tmp_path / "o.onnx").graph.sparse_initializer] == [
        "w2"
    ]
    assert any("1 weight(s) stored" in n for n in report.notes)


def test_pack_and_unpack_read_the_sparse_file(tmp_path):
    dense, sparse = files(tmp_path)
    packed = pack(sparse, tmp_path / "m.ocpk")
    assert packed.packed_bytes < sparse.stat().st_size
    assert ("w2", "sparse") in packed.kinds
    result = unpack(tmp_path / "m.ocpk", tmp_path / "back.onnx")
    assert not result.identical  # the dense form comes back: same weights, other bytes
    back = onnx.load(tmp_path / "back.onnx")
    assert not back.graph.sparse_initializer
    expected = weights(onnx.load(dense))
    for name, array in weights(back).items():
        np.testing.assert_array_equal(array, expected[name])
    np.testing.assert_array_equal(ort_run(tmp_path / "back.onnx"), ort_run(dense))


def test_training_importer_reads_the_sparse_file(tmp_path):
    torch = pytest.importorskip("torch")
    from onnxcomp.training.importer import import_onnx

    dense, sparse = files(tmp_path)
    module = import_onnx(load_model(sparse)).eval()
    with torch.no_grad():
        out = module(torch.from_numpy(X))
    out = out[0] if isinstance(out, (tuple, list)) else out
    np.testing.assert_allclose(out.numpy(), ort_run(dense), rtol=1e-5, atol=1e-5)
