"""The packed 1-bit form: round trip to the same bytes and the same ONNX Runtime outputs, the
size ratio, and every bad file refused in one line (truncated, foreign, corrupted, spliced)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from int8_models import small_cnn

from onnxcomp.cli import main
from onnxcomp.converter.binarize import BinarizeConfig, BinarizePass
from onnxcomp.errors import OnnxcompError
from onnxcomp.storage import pack, read_header, unpack


def binarized(tmp_path: Path, seed: int = 0, name: str = "model.onnx") -> Path:
    model = ir.from_proto(small_cnn(seed))
    BinarizePass(BinarizeConfig(first_last=True))(model)
    path = tmp_path / name
    onnx.save(ir.to_proto(model), path)
    return path


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_round_trip_is_byte_identical_and_runs_the_same(tmp_path):
    source = binarized(tmp_path)
    result = pack(source, tmp_path / "m.ocpk")
    signs = 8 * 3 * 9 + 8 * 8 * 9 + 10 * 8
    assert result.packed_tensors == 3 and result.packed_values == signs
    assert result.identical
    back = unpack(tmp_path / "m.ocpk", tmp_path / "back.onnx")
    assert back.identical
    assert (tmp_path / "back.onnx").read_bytes() == source.read_bytes()
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(outputs(tmp_path / "back.onnx", x), outputs(source, x))


def test_size_ratio_counts_one_bit_per_sign(tmp_path):
    source = binarized(tmp_path)
    result = pack(source, tmp_path / "m.ocpk")
    size = source.stat().st_size
    assert result.onnx_bytes == size
    assert result.fp32_bytes == size + 3 * result.packed_values
    packed = (tmp_path / "m.ocpk").stat().st_size
    assert result.packed_bytes == packed
    bits = sum(-(-n // 8) for n in (8 * 3 * 9, 8 * 8 * 9, 10 * 8))
    # the graph without the sign bytes (and each emptied field's tag and length), uncoded
    graph = result.codebook_bytes - bits
    saved = size - graph
    assert result.packed_values < saved <= result.packed_values + 4 * result.packed_tensors
    assert result.sparse_bytes == result.codebook_bytes  # signs: no sparse or codebook stage
    header, start = read_header(tmp_path / "m.ocpk")
    assert packed == start + sum(s["length"] for s in header["sections"])
    assert packed < result.codebook_bytes + start  # zstd shrinks the graph section
    assert result.ratio_vs_fp32 == pytest.approx(result.fp32_bytes / packed)


def expect_error(match: str, call, *args, **kwargs) -> None:
    with pytest.raises(OnnxcompError, match=match) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)


def test_truncated_foreign_corrupted_and_spliced_files_are_refused(tmp_path):
    source = binarized(tmp_path)
    packed = tmp_path / "m.ocpk"
    pack(source, packed)
    data = packed.read_bytes()
    out = tmp_path / "out.onnx"
    (tmp_path / "short.ocpk").write_bytes(data[:-5])
    expect_error("is truncated", unpack, tmp_path / "short.ocpk", out)
    (tmp_path / "tiny.ocpk").write_bytes(data[:40])
    expect_error("truncated", unpack, tmp_path / "tiny.ocpk", out)
    expect_error("not an onnxcomp archive", unpack, source, out)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "bad.ocpk").write_bytes(bytes(flipped))
    expect_error("corrupted .*:bits'", unpack, tmp_path / "bad.ocpk", out)
    version = bytearray(data)
    version[4] = 9
    (tmp_path / "v9.ocpk").write_bytes(bytes(version))
    expect_error("format version 9, newer .* upgrade onnxcomp", unpack, tmp_path / "v9.ocpk", out)
    other = binarized(tmp_path, seed=5, name="other.onnx")
    expect_error("packed from another model", unpack, packed, out, expect_source=other)
    assert not out.exists()


def test_sections_spliced_from_another_model_are_refused(tmp_path):
    pack(binarized(tmp_path), tmp_path / "a.ocpk")
    pack(binarized(tmp_path, seed=5, name="other.onnx"), tmp_path / "b.ocpk")
    a, start_a = read_header(tmp_path / "a.ocpk")
    b, start_b = read_header(tmp_path / "b.ocpk")
    a_data, b_data = (tmp_path / "a.ocpk").read_bytes(), (tmp_path / "b.ocpk").read_bytes()
    # a's header and graph with b's bit sections (same sizes, so the header's lengths hold)
    graph_end = start_a + a["sections"][0]["length"]
    bits_b = b_data[start_b + b["sections"][0]["length"] :]
    sections, offset = [a["sections"][0]], a["sections"][0]["length"]
    for entry in b["sections"][1:]:
        sections.append(dict(entry, offset=offset))
        offset += entry["length"]
    spliced = dict(a, sections=sections)
    header = json.dumps(spliced).encode()
    prefix = struct.pack("<4sHI", b"OCPK", 2, len(header))
    body = a_data[start_a:graph_end] + bits_b
    (tmp_path / "s.ocpk").write_bytes(prefix + header + hashlib.sha256(header).digest() + body)
    expect_error("rebuilt model differs", unpack, tmp_path / "s.ocpk", tmp_path / "o.onnx")


def test_a_dense_float_model_packs_as_its_coded_graph(tmp_path):
    path = tmp_path / "float.onnx"
    onnx.save(small_cnn(), path)
    result = pack(path, tmp_path / "f.ocpk")
    assert result.packed_tensors == 0 and result.kinds == ()
    unpack(tmp_path / "f.ocpk", tmp_path / "back.onnx")
    assert (tmp_path / "back.onnx").read_bytes() == path.read_bytes()
    expect_error("no such file", pack, tmp_path / "missing.onnx", tmp_path / "f.ocpk")


def test_cli_pack_and_unpack(tmp_path, capsys):
    source = binarized(tmp_path)
    assert main(["pack", str(source), "-o", str(tmp_path / "m.ocpk")]) == 0
    assert "smaller than fp32" in capsys.readouterr().out
    assert main(["unpack", str(tmp_path / "m.ocpk"), "-o", str(tmp_path / "r.onnx")]) == 0
    assert "byte-identical" in capsys.readouterr().out
    assert (tmp_path / "r.onnx").read_bytes() == source.read_bytes()
    (tmp_path / "cut.ocpk").write_bytes((tmp_path / "m.ocpk").read_bytes()[:100])
    assert main(["unpack", str(tmp_path / "cut.ocpk")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "truncated" in err and len(err.splitlines()) == 1
