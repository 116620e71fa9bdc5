"""The onnxcomp archive (``.ocpk``): the shipping and storage form of a compressed model, in
the manner of Deep Compression (Han et al.: sparse storage with relative indices, codebook
indices, entropy coding), plus 1-bit signs for a binarized model (ONNX has no 1-bit type).

Meant for shipping and storage (downloads, app bundles, model registries), not for running:
``unpack`` rebuilds the runnable ONNX, bit-exact, before it is loaded.

Layout (what a decoder reads; all integers little-endian)::

    b"OCPK" | format version (uint16) | header length (uint32) | header (JSON, UTF-8)
    | sha256 of the header (32 bytes) | sections, back to back

Header keys: ``format_version``, ``source_sha256`` and ``source_bytes`` (the packed file),
``rebuilt_sha256`` (the serialization ``unpack`` must produce), ``sections`` (in file order:
``name``, ``offset`` from the first section, ``length``, ``sha256`` of the stored bytes, and
``coder``: ``none`` or ``zstd`` (a Zstandard frame)), ``tensors`` (``name`` of the initializer,
``kind``, ``count`` of elements, ``streams``: stream name -> [section name, bits, layout]).

Section ``graph`` is the ModelProto with the raw data of every encoded initializer emptied (the
rest as it was). A stream section, once decoded by its coder, holds ``count`` symbols: layout
``packed`` = bit-packed at ``bits`` bits, most significant bit first; layout ``bytes`` = one
uint8 per symbol, or one little-endian uint32 (float32 bit pattern) when ``bits`` is 32. The
count of a stream is that of the tensor for ``index``/``bits`` of a dense tensor, the number of
entries for ``gap``/``values``/``index`` of a sparse one and K for a ``codebook``; the
encodings and how a tensor is rebuilt from its streams are in :mod:`onnxcomp.storage.encodings`.
Each stream is stored in the smallest of: bit-packed, zstd of bit-packed, zstd of one byte per
symbol (zstd's literal Huffman coding sees whole symbols). Rules:

1. Encoded: float32 initializers in ``raw_data`` for which a sparse or codebook encoding is
   smaller than the raw floats (detected from the values; the ``onnxcomp.sparsity`` and
   ``onnxcomp.shared`` metadata are not needed), and int8 -1/+1 initializers (signs). Other
   tensors (int8/int4 weights, shapes, small biases) stay in the graph section as they are; a
   model with nothing to encode is still packed (its graph section zstd-coded).
2. ``unpack`` checks every section's checksum, then the rebuilt model's, so a truncated,
   edited or spliced file is refused, never turned into a wrong model; version 1 files (the
   1-bit form, sections ``bits:<name>``) are still read.
3. The rebuilt ModelProto is the packed one field for field, so the rebuilt file is
   byte-identical to the source when protobuf's serializer wrote it (onnx.save, convert).
4. ONNX ``sparse_initializer`` tensors (``convert --sparse-initializers``) are densified before
   packing (``core.proto.densify``): the archive's relative-index encoding is smaller than
   ONNX's int64 indices. ``unpack`` then gives the dense model: the same weights bit for bit,
   not the same bytes (reported as re-serialized).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import zstandard

from onnxcomp.core.proto import densify
from onnxcomp.errors import OnnxcompError
from onnxcomp.storage.encodings import Encoded, decode_float, encode_float, pack_bits, unpack_bits

MAGIC = b"OCPK"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<4sHI")
_DIGEST = 32
_MIN_SAVING = 64  # bytes: smaller savings are not worth a section's header entry
_ZSTD_LEVEL = 19


@dataclass(frozen=True)
class PackResult:
    """Sizes of one pack (or unpack): each stage as in Han et al.'s table.

    ``sparse_bytes``: the graph with sparse tensors as relative indices + float32 values;
    ``codebook_bytes``: then shared values as codebook indices (and signs at 1 bit), all
    bit-packed; ``packed_bytes``: the archive file, entropy coded.
    """

    packed_bytes: int
    onnx_bytes: int
    fp32_bytes: int  # the ONNX file with every packed sign as float32 (its float original)
    packed_tensors: int
    packed_values: int
    identical: bool  # the rebuilt (or packed) ONNX bytes equal the source file's
    sparse_bytes: int = 0
    codebook_bytes: int = 0
    kinds: tuple[tuple[str, str], ...] = ()  # (initializer, encoding) for each encoded tensor

    @property
    def ratio_vs_fp32(self) -> float:
        return self.fp32_bytes / self.packed_bytes

    @property
    def ratio_vs_onnx(self) -> float:
        return self.onnx_bytes / self.packed_bytes

    def stages(self) -> list[tuple[str, int]]:
        """(stage, bytes) rows of the paper's table, the fp32 .onnx first."""
        return [
            ("fp32 .onnx", self.fp32_bytes),
            ("sparse encoding (relative indices)", self.sparse_bytes),
            ("+ codebook indices (bit-packed)", self.codebook_bytes),
            ("+ entropy coding (zstd): archive", self.packed_bytes),
        ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(tensor: onnx.TensorProto) -> Encoded | None:
    """Rule 1: the encoding of an initializer, or None to leave it in the graph."""
    if not tensor.raw_data or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if tensor.data_type == onnx.TensorProto.INT8:
        values = np.frombuffer(tensor.raw_data, np.int8)
        if values.size == 0 or not np.all((values == 1) | (values == -1)):
            return None
        signs = Encoded("signs", {"bits": ((values > 0).astype(np.uint8), 1)})
        signs.sparse_bytes = signs.packed_bytes
        return signs
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    encoded = encode_float(np.frombuffer(tensor.raw_data, "<u4"))
    if encoded.kind == "dense" or encoded.packed_bytes + _MIN_SAVING > len(tensor.raw_data):
        return None
    return encoded


def _store(symbols: np.ndarray, bits: int) -> tuple[bytes, str, str]:
    """Rule: the smallest of bit-packed, zstd of bit-packed, zstd of one byte per symbol."""
    packed = pack_bits(symbols, bits)
    whole = symbols.astype("<u4").tobytes() if bits == 32 else symbols.astype(np.uint8).tobytes()
    coder = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    options = [(packed, "none", "packed"), (coder.compress(packed), "zstd", "packed")]
    options.append((coder.compress(whole), "zstd", "bytes"))
    return min(options, key=lambda o: len(o[0]))


def pack(model_path: Path, output: Path) -> PackResult:
    """Write the archive of ``model_path`` to ``output`` (rules 1 and 2)."""
    source = _read(model_path)
    model = _load(model_path, source)
    rebuilt_sha = _sha(model.SerializeToString())
    sections: list[tuple[dict, bytes]] = []
    tensors, kinds, signs, sparse, codebook = [], [], 0, 0, 0
    for tensor in model.graph.initializer:
        encoded = _encode(tensor)
        if encoded is None:
            continue
        count = len(tensor.raw_data) // (1 if encoded.kind == "signs" else 4)
        streams = {}
        for stream, (symbols, bits) in encoded.streams.items():
            data, coder, layout = _store(symbols, bits)
            name = f"{tensor.name}:{stream}"
            sections.append(({"name": name, "coder": coder}, data))
            streams[stream] = [name, bits, layout, int(symbols.size)]
        tensors.append(
            {"name": tensor.name, "kind": encoded.kind, "count": count, "streams": streams}
        )
        kinds.append((tensor.name, encoded.kind))
        signs += count if encoded.kind == "signs" else 0
        sparse, codebook = sparse + encoded.sparse_bytes, codebook + encoded.packed_bytes
        tensor.raw_data = b""
    graph = model.SerializeToString()
    stored = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(graph)
    coded = ("zstd", stored) if len(stored) < len(graph) else ("none", graph)
    sections.insert(0, ({"name": "graph", "coder": coded[0]}, coded[1]))
    _write(output, source, rebuilt_sha, sections, tensors)
    return PackResult(
        output.stat().st_size, len(source), len(source) + 3 * signs, len(tensors),
        sum(t["count"] for t in tensors), _sha(source) == rebuilt_sha,
        len(graph) + sparse, len(graph) + codebook, tuple(kinds),
    )  # fmt: skip


def _load(path: Path, source: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_from_string(source)
    except Exception as exc:
        raise OnnxcompError(
            f"{path}: not an ONNX model ({' '.join(str(exc).split())[:120]})"
        ) from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise OnnxcompError(
            f"{path}: its weights are in external data files; pack reads models whose "
            "weights are inside the .onnx file"
        )
    try:
        densify(model)  # rule 4
    except OnnxcompError as exc:
        raise OnnxcompError(f"{path}: {exc}") from exc
    return model


def _write(output: Path, source: bytes, rebuilt_sha: str, sections: list, tensors: list) -> None:
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
            "tensors": tensors,
        },
        separators=(",", ":"),
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
    """The checked header of an archive and where its sections start."""
    data = _read(path) if data is None else data
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise OnnxcompError(
            f"{path} is not an onnxcomp archive (it does not start with {MAGIC.decode()}): "
            "give a file written by 'onnxcomp pack'"
        )
    _, version, length = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise OnnxcompError(
            f"{path}: archive format version {version}, newer than this onnxcomp reads "
            f"(up to {FORMAT_VERSION}): upgrade onnxcomp (pip install -U onnxcomp)"
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
    header = _upgrade(json.loads(header_bytes), version)
    end = start + sum(s["length"] for s in header["sections"])
    if len(data) != end:
        what = "truncated" if len(data) < end else "longer than its header says"
        raise OnnxcompError(
            f"{path} is {what} ({len(data)} bytes, its header describes {end}): copy it again"
        )
    return header, start


def _upgrade(header: dict, version: int) -> dict:
    """A version 1 header (1-bit signs only) in version 2 terms."""
    if version >= 2:
        return header
    tensors = []
    for section in header["sections"]:
        section["coder"] = "none"
        if section["name"].startswith("bits:"):
            name, count = section["name"][5:], section["count"]
            bits = [section["name"], 1, "packed", count]
            tensors.append(
                {"name": name, "kind": "signs", "count": count, "streams": {"bits": bits}}
            )
    return dict(header, tensors=tensors)


def unpack(path: Path, output: Path, expect_source: Path | None = None) -> PackResult:
    """Rebuild the runnable ONNX of an archive (rules 2 and 3) into ``output``.

    ``expect_source``: an ONNX file the archive must have been made from. Nothing is written
    unless every check passes.
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
        blobs[entry["name"]] = _decompress(path, entry, blob)
    model = onnx.load_from_string(blobs.pop("graph"))
    signs = _fill(path, model, header["tensors"], blobs)
    rebuilt = model.SerializeToString()
    if _sha(rebuilt) != header["rebuilt_sha256"]:
        raise OnnxcompError(
            f"{path}: the rebuilt model differs from the one packed (sha256 mismatch): its "
            "sections come from different models; pack the model again"
        )
    output.write_bytes(rebuilt)
    count = sum(t["count"] for t in header["tensors"])
    return PackResult(
        len(data), len(rebuilt), len(rebuilt) + 3 * signs, len(header["tensors"]), count,
        identical=_sha(rebuilt) == header["source_sha256"],
    )  # fmt: skip


def _decompress(path: Path, entry: dict, blob: bytes) -> bytes:
    if entry.get("coder", "none") == "none":
        return blob
    if entry["coder"] != "zstd":
        raise OnnxcompError(
            f"{path}: section '{entry['name']}' uses coder '{entry['coder']}', unknown to this "
            "onnxcomp: upgrade onnxcomp (pip install -U onnxcomp)"
        )
    return zstandard.ZstdDecompressor().decompress(blob)


def _stream(blob: bytes, bits: int, layout: str, count: int) -> np.ndarray:
    if layout == "packed":
        return unpack_bits(blob, count, bits)
    return np.frombuffer(blob, "<u4" if bits == 32 else np.uint8, count)


def _fill(path: Path, model: onnx.ModelProto, tensors: list, blobs: dict) -> int:
    """Put the decoded tensors back into the graph; the number of signs restored."""
    by_name = {t.name: t for t in model.graph.initializer}
    signs = 0
    for spec in tensors:
        tensor = by_name.get(spec["name"])
        size = None if tensor is None else int(np.prod(tensor.dims, dtype=np.int64))
        if size != spec["count"]:
            raise OnnxcompError(
                f"{path}: tensor '{spec['name']}' of its header does not match its graph: "
                "its sections come from different models; pack the model again"
            )
        streams = {
            stream: _stream(blobs.pop(name), bits, layout, n)
            for stream, (name, bits, layout, n) in spec["streams"].items()
        }
        if spec["kind"] == "signs":
            tensor.raw_data = (streams["bits"].astype(np.int8) * 2 - 1).astype(np.int8).tobytes()
            signs += size
        else:
            tensor.raw_data = decode_float(spec["kind"], streams, size).astype("<u4").tobytes()
    if blobs:
        raise OnnxcompError(
            f"{path}: section(s) {', '.join(sorted(blobs))} match no tensor of its graph: its "
            "sections come from different models"
        )
    return signs
