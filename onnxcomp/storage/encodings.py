"""Per-tensor encodings of the Deep Compression archive (Han et al.: relative-index sparse
storage, codebook indices) and the 1-bit signs of a binarized model.

Every encoding works on the tensor's bit patterns (float32 as uint32), so -0.0, NaN and every
value come back exactly. A tensor becomes a few *streams*, each a section of the archive:

- ``symbols`` (uint8 array, ``bits`` wide: bit-packed, most significant bit first, at that width),
- ``float32`` (little-endian float32 values).

Encodings (``kind`` in the section header), chosen per tensor by the smallest bit-packed size:

1. ``dense`` (raw float): the tensor stays in the graph section as it was.
2. ``codebook``: ``codebook`` (float32, K <= 256 values) + ``index`` (symbols at ceil(log2 K)
   bits): element i is ``codebook[index[i]]``.
3. ``sparse``: relative indices. ``gap`` (symbols at b bits, b in 2..8): entry j sits
   ``gap[j]`` zeros after entry j-1 (the first after position -1); a gap longer than 2^b - 1
   is split by filler entries of value +0.0 with gap 2^b - 1. Values ``values`` (float32, one
   per entry) or, ``sparse-codebook``, ``codebook`` + ``index`` over the entries. Positions
   after the last entry are +0.0.
4. ``signs``: an int8 tensor of -1/+1 (a binarized weight) as ``bits`` (symbols at 1 bit:
   1 = +1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Encoded:
    """One tensor's encoding: its kind, the streams, and the bit-packed size of each stage."""

    kind: str
    streams: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)  # name -> (data, bits)
    sparse_bytes: int = 0  # the size after sparse encoding alone (values as float32)

    @property
    def packed_bytes(self) -> int:
        return sum(packed_size(data.size, bits) for data, bits in self.streams.values())


def packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def pack_bits(symbols: np.ndarray, bits: int) -> bytes:
    """``symbols`` (uint8) at ``bits`` bits each, most significant first; 32 = float32 bytes."""
    if bits == 32:
        return symbols.astype("<u4").tobytes()
    planes = np.unpackbits(symbols.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(planes.ravel()).tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    if bits == 32:
        return np.frombuffer(data, "<u4", count).astype(np.uint32)
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits).reshape(count, bits)
    return np.packbits(np.pad(planes, ((0, 0), (8 - bits, 0))), axis=1).ravel()


def _width(k: int) -> int:
    return max(1, int(k - 1).bit_length())


def relative_indices(nonzero: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps (uint8) of the entries for sorted ``nonzero`` positions and which entries are real."""
    limit = (1 << bits) - 1
    gaps = np.diff(nonzero, prepend=-1) - 1
    fillers = gaps // (limit + 1)
    real = np.cumsum(fillers + 1) - 1
    out = np.full(int(real[-1]) + 1 if real.size else 0, limit, np.int64)
    out[real] = gaps % (limit + 1)
    return out.astype(np.uint8), real


def _codebook(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    book, index = np.unique(values, return_inverse=True)
    return (book, index.astype(np.uint8)) if book.size <= 256 else None


def _with_values(kind: str, values: np.ndarray, streams: dict) -> Encoded:
    """``values`` as float32 or, when smaller, as a codebook and indices."""
    plain = Encoded(kind, {**streams, "values": (values, 32)})
    plain.sparse_bytes = plain.packed_bytes
    found = _codebook(values)
    if found is None:
        return plain
    book, index = found
    shared = Encoded(
        f"{kind}-codebook" if kind != "dense" else "codebook",
        {**streams, "codebook": (book, 32), "index": (index, _width(book.size))},
        plain.sparse_bytes,
    )
    return shared if shared.packed_bytes < plain.packed_bytes else plain


def encode_float(bits: np.ndarray) -> Encoded:
    """The smallest encoding of a float32 tensor given as its uint32 bit patterns."""
    best = _with_values("dense", bits, {})
    nonzero = np.flatnonzero(bits)
    if nonzero.size < bits.size:
        for width in range(2, 9):
            gaps, real = relative_indices(nonzero, width)
            values = np.zeros(gaps.size, np.uint32)
            values[real] = bits[nonzero]
            candidate = _with_values("sparse", values, {"gap": (gaps, width)})
            if candidate.packed_bytes < best.packed_bytes:
                best = candidate
    if best.kind == "dense":  # stays raw: values as float32 in the graph
        best.streams = {}
    best.sparse_bytes = best.sparse_bytes if best.kind.startswith("sparse") else 4 * bits.size
    return best


def decode_float(kind: str, streams: dict[str, np.ndarray], count: int) -> np.ndarray:
    """The uint32 bit patterns of a tensor of ``count`` elements from its decoded streams."""
    book = streams.get("codebook")
    values = streams["values"] if book is None else book[streams["index"]]
    if kind in ("codebook", "dense"):
        return values.astype(np.uint32)
    out = np.zeros(count, np.uint32)
    positions = np.cumsum(streams["gap"].astype(np.int64) + 1) - 1
    out[positions] = values
    return out
