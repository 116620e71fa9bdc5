"""Canonical Huffman coding of byte symbols in numpy (Han et al.'s last stage).

Stream layout (what a decoder reads)::

    symbol count (uint32 LE) | 256 code lengths (uint8 each, 0 = symbol absent)
    | the codes, most significant bit first, packed into bytes (zero padded)

Codes are canonical: symbols sorted by (length, symbol value) get consecutive codes, each one
shifted left when the length grows; so the lengths alone define the code. Lengths are at most
``MAX_BITS``: when Huffman's tree is deeper, counts are halved (kept >= 1) until it fits.
Encoding and decoding are vectorized: the decoder reads a ``MAX_BITS``-wide window at every bit
offset through one table, then finds where each symbol starts by pointer doubling.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

MAX_BITS = 16
_COUNT = struct.Struct("<I")


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (uint8, 256) for symbol counts, at most ``MAX_BITS`` long."""
    counts = counts.astype(np.int64)
    while True:
        lengths = _lengths(counts)
        if lengths.max(initial=0) <= MAX_BITS:
            return lengths
        counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)


def _lengths(counts: np.ndarray) -> np.ndarray:
    lengths = np.zeros(256, np.uint8)
    present = np.flatnonzero(counts)
    if present.size == 1:
        lengths[present] = 1
        return lengths
    heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, k1, s1 = heapq.heappop(heap)
        c2, k2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, min(k1, k2), s1 + s2))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (uint32, 256) of each symbol from its length."""
    codes = np.zeros(256, np.uint32)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code, previous = code + 1, int(lengths[symbol])
    return codes


def encode(symbols: np.ndarray) -> bytes:
    """Huffman-code a uint8 array (see the module docstring for the layout)."""
    symbols = np.ascontiguousarray(symbols, np.uint8).ravel()
    lengths = code_lengths(np.bincount(symbols, minlength=256))
    codes = canonical_codes(lengths)
    lens = lengths[symbols].astype(np.int64)
    total = int(lens.sum())
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    shift = np.repeat(lens, lens) - 1 - (np.arange(total) - starts)
    bits = (np.repeat(codes[symbols], lens) >> shift.astype(np.uint32)) & 1
    return _COUNT.pack(symbols.size) + lengths.tobytes() + np.packbits(bits).tobytes()


def decode(data: bytes) -> np.ndarray:
    """The uint8 symbols of a stream written by :func:`encode`."""
    (n,) = _COUNT.unpack_from(data)
    lengths = np.frombuffer(data, np.uint8, 256, _COUNT.size)
    if n == 0:
        return np.zeros(0, np.uint8)
    codes = canonical_codes(lengths)
    present = np.flatnonzero(lengths)
    symbol_of = np.zeros(1 << MAX_BITS, np.uint8)
    length_of = np.zeros(1 << MAX_BITS, np.int64)
    for s in present:  # every window starting with the code of s
        low = int(codes[s]) << (MAX_BITS - int(lengths[s]))
        high = low + (1 << (MAX_BITS - int(lengths[s])))
        symbol_of[low:high], length_of[low:high] = s, int(lengths[s])
    bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=_COUNT.size + 256))
    bits = np.concatenate([bits, np.zeros(MAX_BITS, np.uint8)]).astype(np.int64)
    size = bits.size - MAX_BITS
    window = np.zeros(size, np.int64)
    for k in range(MAX_BITS):
        window = (window << 1) | bits[k : k + size]
    # next symbol start from each bit offset; offset ``size`` is a sink
    jump = np.append(np.minimum(np.arange(size) + length_of[window], size), size)
    index = np.arange(n)
    starts = np.zeros(n, np.int64)
    for k in range(max(1, int(n - 1).bit_length())):
        take = (index >> k) & 1 == 1
        starts[take] = jump[starts[take]]
        jump = jump[jump]
    if starts[-1] >= size:
        raise ValueError("Huffman stream shorter than its symbol count")
    return symbol_of[window[starts]]
