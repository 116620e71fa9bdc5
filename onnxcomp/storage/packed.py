"""The packed 1-bit form of a binarized model (``.ocpk``): ONNX has no 1-bit type, so the
runnable model stores each sign as an int8; this form stores it as one bit.

Meant for shipping and storage (downloads, app bundles, model registries), not for running:
``unpack`` rebuilds the runnable ONNX before it is loaded. Layout::

    b"OCPK" | format version (uint16 LE) | header length (uint32 LE) | header (JSON, UTF-8)
    | sha256 of the header (32 bytes) | sections

The header lists the sections (offset from the first section, length, sha256): ``graph``,
the ModelProto with the raw data of every sign tensor emptied (the rest of the graph: float
alphas, the float layers, biases, as they were), then ``bits:<initializer>`` for each sign
tensor: ``numpy.packbits`` of (sign > 0), with the element count. Rules:

1. Packed: every int8 initializer holding only -1 and +1 in ``raw_data`` (onnxcomp's binarize
   pass writes them so; zero points and other int8 tensors stay in the graph as they are).
2. The header records the source file's sha256 and the sha256 of the rebuilt serialization;
   ``unpack`` checks every section's checksum, then the rebuilt model's, so a truncated,
   edited or spliced file is refused, never turned into a wrong model.
3. The rebuilt ModelProto is the packed one field for field (the placeholders sit where the
   tensors were), so the rebuilt file is byte-identical to the source when the source was
   written by protobuf's serializer (onnx.save, onnxcomp convert).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.errors import OnnxcompError

MAGIC = b"OCPK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_DIGEST = 32


@dataclass(frozen=True)
class PackResult:
    """Sizes of one pack (or unpack): the packed file, the ONNX file, its fp32 equivalent."""

    packed_bytes: int
    onnx_bytes: int
    fp32_bytes: int  # the ONNX file with every packed sign as float32 (its float original)
    packed_tensors: int
    packed_values: int
    identical: bool  # the rebuilt (or packed) ONNX bytes equal the source file's

    @property
    def ratio_vs_fp32(self) -> float:
        return self.fp32_bytes / self.packed_bytes

    @property
    def ratio_vs_onnx(self) -> float:
        return self.onnx_bytes / self.packed_bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_signs(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type != onnx.TensorProto.INT8 or not tensor.raw_data:
        return False
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    values = np.frombuffer(tensor.raw_data, np.int8)
    return values.size > 0 and bool(np.all((values == 1) | (values == -1)))


def pack(model_path: Path, output: Path) -> PackResult:
    """Write the packed form of ``model_path`` to ``output`` (rules 1 and 2)."""
    source = _read(model_path)
    try:
        model = onnx.load_from_string(source)
    except Exception as exc:
        raise OnnxcompError(
            f"{model_path}: not an ONNX model ({' '.join(str(exc).split())[:120]})"
        ) from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise OnnxcompError(
            f"{model_path}: its weights are in external data files; pack reads models whose "
            "weights are inside the .onnx file"
        )
    rebuilt_sha = _sha(model.SerializeToString())
    sections: list[tuple[dict, bytes]] = []
    count = 0
    for tensor in model.graph.initializer:
        if not _is_signs(tensor):
            continue
        values = np.frombuffer(tensor.raw_data, np.int8)
        bits = np.packbits(values > 0).tobytes()
        sections.append(({"name": f"bits:{tensor.name}", "count": int(values.size)}, bits))
        count += values.size
        tensor.raw_data = b""
    if not sections:
        raise OnnxcompError(
            f"{model_path}: no binarized weights (int8 tensors of -1/+1) to pack; "
            "binarize it first with onnxcomp convert --binarize weights"
        )
    sections.insert(0, ({"name": "graph"}, model.SerializeToString()))
    _write(output, source, rebuilt_sha, sections)
    packed = output.stat().st_size
    return PackResult(
        packed, len(source), len(source) + 3 * count, len(sections) - 1, count,
        identical=_sha(source) == rebuilt_sha,
    )  # fmt: skip


def _write(output: Path, source: bytes, rebuilt_sha: str, sections: list) -> None:
    entries, offset = [], 0
    for entry, data in sections:
        entries.append({**entry, "offset": offset, "length": len(data), "sha256": _sha(data)})
        offset += len(data)
    header = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "source_sha256": _sha(source),
            "source_bytes": len(source),
            "rebuilt_sha256": rebuilt_sha,
            "sections": entries,
        }
    ).encode()
    with open(output, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
        f.write(header)
        f.write(hashlib.sha256(header).digest())
        for _, data in sections:
            f.write(data)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise OnnxcompError(f"{path}: no such file") from None
    except OSError as exc:
        raise OnnxcompError(f"{path}: cannot be read ({exc.strerror})") from exc


def read_header(path: Path, data: bytes | None = None) -> tuple[dict, int]:
    """The checked header of a packed file and where its sections start."""
    data = _read(path) if data is None else data
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise OnnxcompError(
            f"{path} is not an onnxcomp packed model (it does not start with {MAGIC.decode()}): "
            "give a file written by 'onnxcomp pack'"
        )
    _, version, length = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise OnnxcompError(
            f"{path}: packed format version {version}; this onnxcomp reads version "
            f"{FORMAT_VERSION}: use the onnxcomp version that wrote it"
        )
    start = _PREFIX.size + length + _DIGEST
    if len(data) < start:
        raise OnnxcompError(
            f"{path} is truncated ({len(data)} bytes, inside its header): copy it again"
        )
    header_bytes = data[_PREFIX.size : _PREFIX.size + length]
    if hashlib.sha256(header_bytes).digest() != data[start - _DIGEST : start]:
        raise OnnxcompError(
            f"{path} is corrupted (its header fails its sha256 check): copy it again"
        )
    header = json.loads(header_bytes)
    end = start + sum(s["length"] for s in header["sections"])
    if len(data) != end:
        what = "truncated" if len(data) < end else "longer than its header says"
        raise OnnxcompError(
            f"{path} is {what} ({len(data)} bytes, its header describes {end}): copy it again"
        )
    return header, start


def unpack(path: Path, output: Path, expect_source: Path | None = None) -> PackResult:
    """Rebuild the runnable ONNX of a packed file (rules 2 and 3) into ``output``.

    ``expect_source``: an ONNX file the packed one must have been made from.
    """
    data = _read(path)
    header, start = read_header(path, data)
    if expect_source is not None:
        expected = _sha(_read(expect_source))
        if expected != header["source_sha256"]:
            raise OnnxcompError(
                f"{path} was packed from another model (source sha256 "
                f"{header['source_sha256'][:12]}..., {expect_source} has {expected[:12]}...)"
            )
    blobs = {}
    for entry in header["sections"]:
        blob = data[start + entry["offset"] : start + entry["offset"] + entry["length"]]
        if _sha(blob) != entry["sha256"]:
            raise OnnxcompError(
                f"{path} is corrupted (section '{entry['name']}' fails its sha256 check): "
                "copy it again"
            )
        blobs[entry["name"]] = (entry, blob)
    model = onnx.load_from_string(blobs.pop("graph")[1])
    count = _fill_signs(path, model, blobs)
    rebuilt = model.SerializeToString()
    if _sha(rebuilt) != header["rebuilt_sha256"]:
        raise OnnxcompError(
            f"{path}: the rebuilt model differs from the one packed (sha256 mismatch): its "
            "sections come from different models; pack the model again"
        )
    output.write_bytes(rebuilt)
    return PackResult(
        len(data), len(rebuilt), len(rebuilt) + 3 * count, len(header["sections"]) - 1, count,
        identical=_sha(rebuilt) == header["source_sha256"],
    )  # fmt: skip


def _fill_signs(path: Path, model: onnx.ModelProto, blobs: dict) -> int:
    count = 0
    for tensor in model.graph.initializer:
        found = blobs.pop(f"bits:{tensor.name}", None)
        if found is None:
            continue
        entry, blob = found
        n = entry["count"]
        if n != int(np.prod(tensor.dims, dtype=np.int64)):
            raise OnnxcompError(
                f"{path}: section 'bits:{tensor.name}' holds {n} signs, the tensor has "
                f"{int(np.prod(tensor.dims))}: its sections come from different models"
            )
        bits = np.unpackbits(np.frombuffer(blob, np.uint8), count=n)
        tensor.raw_data = (bits.astype(np.int8) * 2 - 1).astype(np.int8).tobytes()
        count += n
    if blobs:
        raise OnnxcompError(
            f"{path}: section(s) {', '.join(sorted(blobs))} match no tensor of its graph: its "
            "sections come from different models"
        )
    return count
