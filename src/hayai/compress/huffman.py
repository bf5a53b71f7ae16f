"""Huffman coding of weight-sharing indices and sparse relative offsets (Deep Compression, stage 3).

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and
Huffman Coding", ICLR 2016 (arXiv:1510.00149). After pruning and weight sharing a layer is a list of small
integers: for every stored weight the index of its shared value (``code``) and, for a sparse layer, the
distance to the previous stored weight. Both distributions are far from uniform, so a Huffman code (a prefix
code whose lengths ℓ_s minimise Σ_s count_s·ℓ_s) stores them in fewer bits than a fixed width.

Canonical code. Only the code lengths are stored (one byte per symbol); codes follow from them: sort the
symbols by (length, symbol) and count upwards, shifting left whenever the length grows. Lengths are limited
to `MAX_CODE_LENGTH` bits (as DEFLATE and JPEG do) so that decoding can use one table lookup per symbol; the
limit only binds on pathological histograms and costs a fraction of a bit there.

Sparse layout (CSR-style with relative indices, the paper's Figure 2). The layer is flattened row-major; each
stored entry holds ``gap`` = the number of zeros skipped since the previous entry (the first counts from
position −1) and its code. A gap must fit in ``index_bits`` bits, i.e. be at most G = 2^index_bits − 1; a
longer run of zeros is bridged by *filler* entries (gap = G, code = the zero code), each covering G + 1
positions. Decoding: position_i = Σ_{j≤i} (gap_j + 1) − 1; trailing zeros are implied by the shape.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from hayai.errors import CorruptFileError

MAX_CODE_LENGTH = 24  # a 24-bit window plus 7 bits of misalignment fits in the 32-bit reads of `decode`
_ENCODE_CHUNK = 1 << 20  # symbols per vectorised encoding step
_DECODE_CHUNK = 1 << 20  # bit positions per vectorised window step


# ---- code construction -----------------------------------------------------------------------------------------
def huffman_code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths for a histogram (0 for absent symbols), limited to `max_length` bits.

    counts: [S] non-negative integers. A histogram with a single present symbol gets a 1-bit code.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts > 0)
    if len(present) == 0:
        return lengths.astype(np.uint8)
    if len(present) == 1:
        lengths[present[0]] = 1
        return lengths.astype(np.uint8)
    # Heap of (weight, tie-breaker, members); merging two nodes deepens every member by one.
    heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        w1, _, m1 = heapq.heappop(heap)
        w2, _, m2 = heapq.heappop(heap)
        lengths[m1] += 1
        lengths[m2] += 1
        heapq.heappush(heap, (w1 + w2, tie, m1 + m2))
        tie += 1
    if lengths.max() > max_length:
        lengths = _limit_lengths(lengths, counts, max_length)
    return lengths.astype(np.uint8)


def _limit_lengths(lengths: np.ndarray, counts: np.ndarray, max_length: int) -> np.ndarray:
    """Clamp lengths to `max_length` and lengthen the rarest short codes until the Kraft sum is <= 1 again."""
    lengths = lengths.copy()
    present = np.flatnonzero(lengths > 0)
    lengths[present] = np.minimum(lengths[present], max_length)
    budget = 1 << max_length
    kraft = int(sum(1 << (max_length - int(lengths[s])) for s in present))
    by_rarity = sorted(present.tolist(), key=lambda s: (counts[s], -s))
    while kraft > budget:
        for s in by_rarity:  # lengthen the rarest symbol that can still grow
            if lengths[s] < max_length:
                kraft -= 1 << (max_length - int(lengths[s]) - 1)
                lengths[s] += 1
                break
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values for given lengths: symbols sorted by (length, symbol) get consecutive codes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, previous = 0, 0
    for s in sorted(np.flatnonzero(lengths > 0).tolist(), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - previous
        previous = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical Huffman code over symbols 0..S-1, fully described by its code lengths."""

    lengths: np.ndarray  # [S] uint8, 0 = symbol never occurs

    @classmethod
    def from_counts(cls, counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> HuffmanCode:
        return cls(huffman_code_lengths(counts, max_length))

    @classmethod
    def from_symbols(cls, symbols: np.ndarray, num_symbols: int) -> HuffmanCode:
        return cls.from_counts(np.bincount(np.asarray(symbols, dtype=np.int64), minlength=num_symbols))

    @property
    def num_symbols(self) -> int:
        return len(self.lengths)

    @property
    def table_bytes(self) -> int:
        """Bytes needed to store the code: one length byte per symbol."""
        return self.num_symbols

    def encoded_bits(self, counts: np.ndarray) -> int:
        """Bits `encode` produces for symbols with this histogram (no encoding needed)."""
        counts = np.asarray(counts, dtype=np.int64)
        if np.any((counts > 0) & (self.lengths[: len(counts)] == 0)):
            raise ValueError("histogram has symbols this code cannot represent")
        return int((counts * self.lengths[: len(counts)].astype(np.int64)).sum())

    def encode(self, symbols: np.ndarray) -> tuple[bytes, int]:
        """symbols [N] -> (packed big-endian bit string, number of bits)."""
        symbols = np.asarray(symbols, dtype=np.int64).ravel()
        if len(symbols) and (symbols.min() < 0 or symbols.max() >= self.num_symbols
                             or np.any(self.lengths[symbols] == 0)):
            raise ValueError("symbol outside the code")
        codes = canonical_codes(self.lengths)
        lengths = self.lengths.astype(np.int64)
        pieces: list[np.ndarray] = []
        carry = np.zeros(0, dtype=np.uint8)
        total = 0
        for start in range(0, len(symbols), _ENCODE_CHUNK):
            chunk = symbols[start:start + _ENCODE_CHUNK]
            n = lengths[chunk]  # [C] bits per symbol
            value = codes[chunk]  # [C]
            owner = np.repeat(np.arange(len(chunk)), n)  # [bits] which symbol each bit belongs to
            offset = np.arange(len(owner)) - np.repeat(np.cumsum(n) - n, n)  # bit index inside its code
            shift = (n[owner] - 1 - offset).astype(np.uint64)
            bits = ((value[owner] >> shift) & np.uint64(1)).astype(np.uint8)  # [bits] MSB first
            bits = np.concatenate([carry, bits])
            whole = len(bits) - len(bits) % 8
            pieces.append(np.packbits(bits[:whole]))
            carry = bits[whole:]
            total += len(owner)
        if len(carry):
            pieces.append(np.packbits(carry))
        return b"".join(p.tobytes() for p in pieces), total

    def decode(self, data: bytes, num_bits: int, count: int) -> np.ndarray:
        """Inverse of `encode`: the first `count` symbols of a bit string of `num_bits` bits -> [count] int64."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        present = self.lengths > 0
        if not present.any():
            raise CorruptFileError("Huffman stream: empty code table but symbols to decode")
        width = int(self.lengths.max())
        symbol_at, length_at = self._lookup_table(width)
        raw = np.frombuffer(data, dtype=np.uint8)
        if len(raw) * 8 < num_bits:
            raise CorruptFileError(f"Huffman stream: {len(raw)} bytes cannot hold {num_bits} bits")
        raw = np.concatenate([raw, np.zeros(4, dtype=np.uint8)]).astype(np.uint64)
        out = np.empty(count, dtype=np.int64)
        position, produced = 0, 0
        while produced < count:
            if position >= num_bits:
                raise CorruptFileError(f"Huffman stream: ended after {produced} of {count} symbols")
            stop = min(num_bits, position + _DECODE_CHUNK)
            window = self._windows(raw, position, stop, width)  # [stop - position] next `width` bits
            step = length_at[window]  # code length if a symbol started here (0: no code word starts so)
            starts = _follow(step.tolist(), position, stop, count - produced)
            local = np.asarray(starts, dtype=np.int64) - position
            if np.any(step[local] == 0):
                raise CorruptFileError("Huffman stream: bit pattern that is no code word")
            out[produced:produced + len(local)] = symbol_at[window[local]]
            produced += len(local)
            position = int(starts[-1] + step[local[-1]]) if len(starts) else stop
        return out

    def _lookup_table(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(symbol, length) for every `width`-bit window whose prefix is a code word."""
        codes = canonical_codes(self.lengths)
        symbol_at = np.zeros(1 << width, dtype=np.int64)
        length_at = np.zeros(1 << width, dtype=np.int64)
        for s in np.flatnonzero(self.lengths > 0):
            n = int(self.lengths[s])
            lo = int(codes[s]) << (width - n)
            hi = (int(codes[s]) + 1) << (width - n)
            symbol_at[lo:hi] = s
            length_at[lo:hi] = n
        return symbol_at, length_at

    @staticmethod
    def _windows(raw: np.ndarray, start: int, stop: int, width: int) -> np.ndarray:
        """The `width` bits starting at each bit position in [start, stop), as integers."""
        pos = np.arange(start, stop, dtype=np.int64)
        byte = pos >> 3
        word = (raw[byte] << np.uint64(24)) | (raw[byte + 1] << np.uint64(16)) | (raw[byte + 2] << np.uint64(8)) \
            | raw[byte + 3]  # 32 bits starting at the byte holding `pos`
        shift = (32 - width - (pos & 7)).astype(np.uint64)
        return ((word >> shift) & np.uint64((1 << width) - 1)).astype(np.int64)


def _follow(step: list[int], start: int, stop: int, limit: int) -> list[int]:
    """Symbol start positions in [start, stop): chase position += code length (the only sequential part)."""
    starts = []
    p = start
    while p < stop and len(starts) < limit:
        starts.append(p)
        n = step[p - start]
        if n == 0:
            break
        p += n
    return starts


# ---- sparse relative layout ------------------------------------------------------------------------------------
def to_relative_sparse(codes: np.ndarray, zero_code: int, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat codes [N] -> (gaps [E], values [E]) with filler entries where a run of zeros exceeds 2^bits − 1."""
    codes = np.asarray(codes).ravel()
    span = 1 << index_bits  # a filler covers `span` positions: span − 1 skipped zeros plus itself
    positions = np.flatnonzero(codes != zero_code)
    raw_gaps = np.diff(positions, prepend=-1) - 1  # zeros skipped before each stored weight
    fillers = raw_gaps // span
    entries = fillers + 1  # entries emitted for each stored weight
    last = np.cumsum(entries) - 1  # index of each weight's own entry
    total = int(entries.sum())
    gaps = np.full(total, span - 1, dtype=np.int64)
    values = np.full(total, zero_code, dtype=np.int64)
    gaps[last] = raw_gaps - fillers * span
    values[last] = codes[positions]
    return gaps, values


def from_relative_sparse(gaps: np.ndarray, values: np.ndarray, numel: int, zero_code: int) -> np.ndarray:
    """Inverse of `to_relative_sparse`: flat codes [numel]."""
    positions = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
    if len(positions) and positions[-1] >= numel:
        raise CorruptFileError(f"sparse layer: entry at position {int(positions[-1])} beyond its {numel} weights")
    out = np.full(numel, zero_code, dtype=np.int64)
    out[positions] = values
    return out


def relative_sparse_counts(codes: np.ndarray, zero_code: int, index_bits: int, num_codes: int
                           ) -> tuple[int, np.ndarray, np.ndarray]:
    """(entries, gap histogram [2^bits], value histogram [num_codes]) of the sparse layout, without building it."""
    codes = np.asarray(codes).ravel()
    span = 1 << index_bits
    positions = np.flatnonzero(codes != zero_code)
    raw_gaps = np.diff(positions, prepend=-1) - 1
    fillers = raw_gaps // span
    n_fillers = int(fillers.sum())
    gap_counts = np.bincount(raw_gaps - fillers * span, minlength=span)
    gap_counts[span - 1] += n_fillers
    value_counts = np.bincount(codes[positions].astype(np.int64), minlength=num_codes)
    value_counts[zero_code] += n_fillers
    return len(positions) + n_fillers, gap_counts, value_counts


# ---- streams and whole layers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HuffmanStream:
    """`count` symbols Huffman-coded into `data` (`num_bits` meaningful bits), with the code that reads them."""

    code: HuffmanCode
    data: bytes
    num_bits: int
    count: int

    @property
    def nbytes(self) -> int:
        """Stored bytes: the packed bits plus the code-length table."""
        return len(self.data) + self.code.table_bytes

    @classmethod
    def encode(cls, symbols: np.ndarray, num_symbols: int) -> HuffmanStream:
        symbols = np.asarray(symbols, dtype=np.int64).ravel()
        code = HuffmanCode.from_symbols(symbols, num_symbols)
        data, bits = code.encode(symbols)
        return cls(code, data, bits, len(symbols))

    def decode(self) -> np.ndarray:
        return self.code.decode(self.data, self.num_bits, self.count)


def huffman_bytes(counts: np.ndarray) -> int:
    """Bytes a `HuffmanStream` with this histogram takes (packed bits + length table), without encoding."""
    code = HuffmanCode.from_counts(counts)
    return (code.encoded_bits(counts) + 7) // 8 + code.table_bytes


@dataclass(frozen=True)
class EncodedCodes:
    """One layer's weight-sharing codes, Huffman coded, either dense or in the sparse relative layout.

    shape: the weight's shape; num_codes: the codebook size; zero_code: the code of the exact zero (sparse
    layers) or None; index_bits: bits of a relative offset (0 for the dense layout).
    """

    shape: tuple[int, ...]
    num_codes: int
    zero_code: int | None
    index_bits: int
    values: HuffmanStream
    gaps: HuffmanStream | None

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (self.gaps.nbytes if self.gaps is not None else 0)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def decode(self) -> np.ndarray:
        """The codes as an int64 array of `shape`, exactly as encoded."""
        values = self.values.decode()
        if self.gaps is None:
            return values.reshape(self.shape)
        assert self.zero_code is not None
        flat = from_relative_sparse(self.gaps.decode(), values, self.numel, self.zero_code)
        return flat.reshape(self.shape)


def choose_layout(codes: np.ndarray, num_codes: int, zero_code: int | None,
                  candidates: range = range(1, 9)) -> tuple[int, int]:
    """(index_bits, bytes) of the smallest Huffman-coded layout: 0 = dense, else the sparse index width."""
    codes = np.asarray(codes).ravel()
    best = (0, huffman_bytes(np.bincount(codes.astype(np.int64), minlength=num_codes)))
    if zero_code is None:
        return best
    for bits in candidates:
        _, gap_counts, value_counts = relative_sparse_counts(codes, zero_code, bits, num_codes)
        size = huffman_bytes(gap_counts) + huffman_bytes(value_counts)
        if size < best[1]:
            best = (bits, size)
    return best


def encode_codes(codes: np.ndarray, num_codes: int, zero_code: int | None = None,
                 index_bits: int | None = None) -> EncodedCodes:
    """Huffman-code a layer's codes [any shape]. With a `zero_code`, the sparse relative layout is used when
    smaller (or always, with an explicit `index_bits` > 0); `index_bits=None` picks the smallest width in 1..8."""
    codes = np.asarray(codes)
    shape = tuple(codes.shape)
    flat = codes.ravel().astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_codes):
        raise ValueError(f"codes must lie in [0, {num_codes})")
    if index_bits is None:
        index_bits, _ = choose_layout(flat, num_codes, zero_code)
    if index_bits == 0 or zero_code is None:
        return EncodedCodes(shape, num_codes, zero_code, 0, HuffmanStream.encode(flat, num_codes), None)
    gaps, values = to_relative_sparse(flat, zero_code, index_bits)
    return EncodedCodes(shape, num_codes, zero_code, index_bits, HuffmanStream.encode(values, num_codes),
                        HuffmanStream.encode(gaps, 1 << index_bits))
