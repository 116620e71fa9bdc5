"""The Deep Compression archive: bit-exact round trips of hand-built dense, sparse, shared and
sparse+shared models, each encoding chosen where it is smaller (checked against sizes computed
here), the Huffman coder, bad archives refused in one line with nothing written, the stage
table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from int8_models import small_cnn
from onnx import numpy_helper

from onnxcomp.cli import main
from onnxcomp.errors import OnnxcompError
from onnxcomp.storage import huffman, pack, read_header, unpack
from onnxcomp.storage.encodings import pack_bits, relative_indices, unpack_bits


def edited(tmp_path: Path, sparse: tuple = (), shared: tuple = (), name: str = "m.onnx") -> Path:
    """small_cnn with 70 % of ``sparse`` weights zeroed (magnitude) and ``shared`` weights
    replaced by 16 values (with -0.0 among the kept zeros: bit patterns must survive)."""
    model = small_cnn(3)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor).copy()
        if tensor.name in sparse:
            w[np.abs(w) <= np.quantile(np.abs(w), 0.7)] = 0.0
        if tensor.name in shared:
            book = rng.normal(size=16).astype(np.float32)
            w = np.where(w == 0, w, book[rng.integers(0, 16, w.shape)]).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    path = tmp_path / name
    onnx.save(model, path)
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize(
    ("sparse", "shared", "kinds"),
    [
        ((), (), {}),
        (("w2",), (), {"w2": "sparse"}),
        ((), ("w2",), {"w2": "codebook"}),
        (("w2",), ("w2",), {"w2": "sparse-codebook"}),
        (("w1",), ("w2",), {"w1": "sparse", "w2": "codebook"}),
    ],
)
def test_round_trip_is_bit_exact_with_the_smaller_encoding(tmp_path, sparse, shared, kinds):
    source = edited(tmp_path, sparse, shared)
    result = pack(source, tmp_path / "m.ocpk")
    assert dict(result.kinds) == kinds
    back = unpack(tmp_path / "m.ocpk", tmp_path / "back.onnx")
    assert back.identical
    assert (tmp_path / "back.onnx").read_bytes() == source.read_bytes()
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "back.onnx", x), run(source, x))
    if kinds:  # a dense model of random weights does not shrink (header, incompressible)
        assert result.packed_bytes < source.stat().st_size


def test_sparse_and_codebook_sizes_follow_the_paper(tmp_path):
    """Sizes computed here: 16 values -> 4-bit indices; gaps bit-packed + float32 values."""
    source = edited(tmp_path, ("w2",), ("w2",))
    w = numpy_helper.to_array(
        next(t for t in onnx.load(source).graph.initializer if t.name == "w2")
    )
    nonzero = np.flatnonzero(w.ravel())
    best_sparse = min(
        -(-relative_indices(nonzero, b)[0].size * b // 8) + 4 * relative_indices(nonzero, b)[0].size
        for b in range(2, 9)
    )
    result = pack(source, tmp_path / "m.ocpk")
    assert result.sparse_bytes - result.codebook_bytes > 0
    # one float tensor encoded: sparse stage = rest of graph + its best sparse form
    rest = result.sparse_bytes - best_sparse
    entries = [relative_indices(nonzero, b)[0].size for b in range(2, 9)]
    shared = min(
        -(-n * b // 8) + -(-n * 5 // 8) + 4 * 17 for n, b in zip(entries, range(2, 9), strict=True)
    )
    assert result.codebook_bytes - rest <= shared


def test_relative_indices_insert_fillers_for_long_gaps():
    gaps, real = relative_indices(np.array([0, 3, 40]), 3)
    # 0 zeros, 2 zeros, then 36 zeros: fillers of gap 7 (each 7 zeros + a +0.0 entry) x 4, gap 4
    assert gaps.tolist() == [0, 2, 7, 7, 7, 7, 4]
    assert real.tolist() == [0, 1, 6]
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    assert positions[real].tolist() == [0, 3, 40]


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bit_packing_round_trips(bits):
    symbols = np.random.default_rng(bits).integers(0, 1 << bits, 101).astype(np.uint8)
    data = pack_bits(symbols, bits)
    assert len(data) == -(-101 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(data, 101, bits), symbols)


@pytest.mark.parametrize("size", [0, 1, 7, 5000])
def test_huffman_round_trip_and_code_lengths(size):
    rng = np.random.default_rng(size)
    symbols = np.minimum(rng.geometric(0.2, size), 255).astype(np.uint8)
    data = huffman.encode(symbols)
    np.testing.assert_array_equal(huffman.decode(data), symbols)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=256))
    present = lengths[lengths > 0].astype(float)
    if present.size > 1:
        assert np.sum(2.0**-present) == pytest.approx(1.0)  # a complete prefix code
        counts = np.bincount(symbols, minlength=256)
        p = counts[counts > 0] / size
        mean = float(np.sum(p * lengths[counts > 0]))
        entropy = float(-np.sum(p * np.log2(p)))
        assert entropy <= mean < entropy + 1  # Huffman's bound


def test_huffman_lengths_are_limited():
    counts = np.zeros(256, np.int64)
    counts[:40] = (1.7 ** np.arange(40)).astype(np.int64) + 1  # Fibonacci-like: a deep tree
    assert huffman._lengths(counts).max() > huffman.MAX_BITS
    assert huffman.code_lengths(counts).max() <= huffman.MAX_BITS


def expect_error(match: str, call, *args) -> None:
    with pytest.raises(OnnxcompError, match=match) as error:
        call(*args)
    assert "\n" not in str(error.value)


def test_bad_archives_are_refused_and_nothing_is_written(tmp_path):
    source = edited(tmp_path, ("w2",), ("w1",))
    pack(source, tmp_path / "m.ocpk")
    data = (tmp_path / "m.ocpk").read_bytes()
    out = tmp_path / "out.onnx"
    _, start = read_header(tmp_path / "m.ocpk")
    cases = {
        "cut.ocpk": (data[:-9], "is truncated"),
        "head.ocpk": (data[: start - 4], "truncated .*inside its header"),
        "flip.ocpk": (data[:start + 2] + bytes([data[start + 2] ^ 1]) + data[start + 3 :],
                      "corrupted .*'graph'"),
        "v3.ocpk": (data[:4] + b"\x03\x00" + data[6:], "version 3, newer .*upgrade onnxcomp"),
    }  # fmt: skip
    for name, (blob, match) in cases.items():
        (tmp_path / name).write_bytes(blob)
        expect_error(match, unpack, tmp_path / name, out)
    expect_error("not an onnxcomp archive", unpack, source, out)
    (tmp_path / "empty.ocpk").write_bytes(b"")
    expect_error("not an onnxcomp archive", unpack, tmp_path / "empty.ocpk", out)
    assert not out.exists()


def test_cli_prints_the_stage_table(tmp_path, capsys):
    source = edited(tmp_path, ("w2",), ("w2",))
    assert main(["pack", str(source), "-o", str(tmp_path / "m.ocpk")]) == 0
    text = capsys.readouterr().out
    for stage in ("fp32 .onnx", "sparse encoding", "codebook", "entropy coding"):
        assert stage in text
    assert "sparse-codebook" in text
    result = pack(source, tmp_path / "again.ocpk")
    assert result.stages()[0][1] == source.stat().st_size
    assert f"{source.stat().st_size / result.packed_bytes:.1f}x" in text
