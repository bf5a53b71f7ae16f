"""Huffman coding and the sparse relative layout: optimal lengths, exact round trips, sizes without encoding."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from hayai.compress.huffman import (
    MAX_CODE_LENGTH,
    HuffmanCode,
    HuffmanStream,
    canonical_codes,
    choose_layout,
    encode_codes,
    from_relative_sparse,
    huffman_bytes,
    huffman_code_lengths,
    relative_sparse_counts,
    to_relative_sparse,
)
from hayai.errors import CorruptFileError


def optimal_cost(counts) -> int:
    """Σ count·length of an optimal prefix code = the sum of all merge weights (independent of the tree)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def is_prefix_free(lengths, codes) -> bool:
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True) if n > 0]
    return not any(a != b and b.startswith(a) for a in words for b in words)


@pytest.mark.parametrize("seed", range(6))
def test_lengths_are_optimal_and_prefix_free(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, size=rng.integers(2, 40))
    counts[rng.integers(0, len(counts))] = 5  # at least two present symbols
    counts[0] = max(counts[0], 1)
    lengths = huffman_code_lengths(counts)
    assert int((counts * lengths.astype(np.int64)).sum()) == optimal_cost(counts)
    assert np.all((lengths > 0) == (counts > 0))
    assert sum(2.0 ** -int(n) for n in lengths if n) <= 1.0
    assert is_prefix_free(lengths, canonical_codes(lengths))


def test_canonical_codes_follow_length_then_symbol_order():
    lengths = np.array([2, 1, 3, 3], dtype=np.uint8)  # B=0, A=10, C=110, D=111
    assert [format(int(c), f"0{n}b") for c, n in zip(canonical_codes(lengths), lengths, strict=True)] == \
        ["10", "0", "110", "111"]


def test_length_limit_keeps_a_valid_code():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)
    assert huffman_code_lengths(counts, max_length=64).max() > MAX_CODE_LENGTH  # the limit must bind
    lengths = huffman_code_lengths(counts)
    assert lengths.max() == MAX_CODE_LENGTH
    assert sum(2.0 ** -int(n) for n in lengths) <= 1.0
    symbols = np.repeat(np.arange(40), np.minimum(counts, 50))
    np.random.default_rng(0).shuffle(symbols)
    stream = HuffmanStream.encode(symbols, 40)
    assert stream.code.lengths.max() <= MAX_CODE_LENGTH
    np.testing.assert_array_equal(stream.decode(), symbols)


@pytest.mark.parametrize("num_symbols", [1, 2, 7, 32, 300])
def test_stream_round_trip(num_symbols):
    rng = np.random.default_rng(num_symbols)
    symbols = rng.zipf(1.3, size=20_000) % num_symbols
    stream = HuffmanStream.encode(symbols, num_symbols)
    np.testing.assert_array_equal(stream.decode(), symbols)
    counts = np.bincount(symbols, minlength=num_symbols)
    assert stream.num_bits == stream.code.encoded_bits(counts)
    assert len(stream.data) == (stream.num_bits + 7) // 8
    assert stream.nbytes == huffman_bytes(counts)


def test_round_trip_across_decoder_chunks(monkeypatch):
    import hayai.compress.huffman as huffman

    monkeypatch.setattr(huffman, "_DECODE_CHUNK", 61)  # symbols straddle chunk boundaries
    monkeypatch.setattr(huffman, "_ENCODE_CHUNK", 17)
    symbols = np.random.default_rng(1).integers(0, 11, size=3000)
    np.testing.assert_array_equal(HuffmanStream.encode(symbols, 11).decode(), symbols)


def test_empty_and_single_symbol_streams():
    empty = HuffmanStream.encode(np.zeros(0, dtype=np.int64), 4)
    assert empty.decode().size == 0 and empty.num_bits == 0
    ones = HuffmanStream.encode(np.full(10, 3), 4)
    assert ones.num_bits == 10
    np.testing.assert_array_equal(ones.decode(), np.full(10, 3))


def test_truncated_stream_is_reported():
    stream = HuffmanStream.encode(np.random.default_rng(0).integers(0, 8, 1000), 8)
    with pytest.raises(CorruptFileError):
        stream.code.decode(stream.data[: len(stream.data) // 2], stream.num_bits, stream.count)


def test_relative_sparse_layout_by_hand():
    # index_bits = 2: a gap is at most 3; a run of 5 zeros needs one filler (gap 3, zero code) then gap 1.
    codes = np.array([0, 0, 0, 0, 0, 5, 0, 1, 0, 0])
    gaps, values = to_relative_sparse(codes, zero_code=0, index_bits=2)
    assert gaps.tolist() == [3, 1, 1]
    assert values.tolist() == [0, 5, 1]
    np.testing.assert_array_equal(from_relative_sparse(gaps, values, codes.size, 0), codes)


@pytest.mark.parametrize("index_bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 1.0])
def test_relative_sparse_round_trip_and_counts(index_bits, density):
    rng = np.random.default_rng(index_bits)
    codes = rng.integers(1, 16, size=5000)
    codes[rng.random(5000) >= density] = 0
    codes[:3] = 0  # leading zeros
    gaps, values = to_relative_sparse(codes, 0, index_bits)
    assert gaps.max(initial=0) < 1 << index_bits
    np.testing.assert_array_equal(from_relative_sparse(gaps, values, codes.size, 0), codes)
    entries, gap_counts, value_counts = relative_sparse_counts(codes, 0, index_bits, 16)
    assert entries == len(gaps)
    np.testing.assert_array_equal(gap_counts, np.bincount(gaps, minlength=1 << index_bits))
    np.testing.assert_array_equal(value_counts, np.bincount(values, minlength=16))


@pytest.mark.parametrize("zero_code", [None, 0])
def test_encoded_layer_round_trip_and_predicted_size(zero_code):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, size=(64, 80))
    if zero_code is not None:
        codes[rng.random(codes.shape) < 0.85] = zero_code
    bits, predicted = choose_layout(codes, 16, zero_code)
    encoded = encode_codes(codes, 16, zero_code)
    assert encoded.index_bits == bits
    assert encoded.nbytes == predicted
    assert (encoded.gaps is None) == (bits == 0)
    np.testing.assert_array_equal(encoded.decode(), codes)
    if zero_code is not None:  # 85% zeros: the sparse layout must win over dense codes
        assert bits > 0
        assert encoded.nbytes < codes.size * 4 / 8
    for forced in (1, 4, 8):
        if zero_code is not None:
            np.testing.assert_array_equal(encode_codes(codes, 16, zero_code, forced).decode(), codes)


def test_code_rejects_symbols_it_cannot_represent():
    code = HuffmanCode.from_counts(np.array([3, 0, 1]))
    with pytest.raises(ValueError):
        code.encode(np.array([1]))
    with pytest.raises(ValueError):
        encode_codes(np.array([0, 5]), 4)
