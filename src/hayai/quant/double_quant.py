"""Double quantization of NF4 block statistics (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, §3).

NF4 stores one fp32 ``absmax`` per block of 64 weights: 32/64 = 0.5 bits per parameter. Double quantization
quantizes those statistics again, exactly as bitsandbytes' ``quantize_4bit(compress_statistics=True)`` does:

    offset = mean(absmax)                                  (one fp32 scalar)
    c, a₂  = quantize_blockwise(absmax − offset, code=D, blocksize=256)
    absmax ≈ D[c] · a₂[block] + offset

where ``D`` is bitsandbytes' signed 8-bit *dynamic* map (``create_dynamic_map(signed=True,
max_exponent_bits=7, total_bits=8)``, Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
Learning", arXiv:1511.04561), not a linear int8 grid (torchao's NF4 uses linear int8 here instead). The
overhead falls to 8/64 + 32/(64·256) ≈ 0.127 bits per parameter.

The dynamic map: for ``i = 0..6`` take ``2^i + 1`` points ``linspace(0.1, 1, ·)`` in fp32, their ``2^i``
midpoints, scaled (in fp32) by ``10^(i−6)``, with both signs; add 0 and 1; sort: 256 values in [−0.993, 1].
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from hayai.quant.blockwise import dequantize_blockwise, quantize_blockwise

NESTED_BLOCKSIZE = 256


@functools.lru_cache(maxsize=4)
def _dynamic_map_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple[float, ...]:
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # values when all exponent bits are zero
    values: list[float] = []

    def add(count: int, exponent: int) -> None:
        bounds = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # fp32
        scale = 10 ** (-(max_exponent_bits - 1) + exponent)
        values.extend((scale * means).tolist())  # scaled in fp32, as bitsandbytes does
        if signed:
            values.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):
        add(2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)), i)
    if extra > 0:
        add(extra, max_exponent_bits - 1)
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return tuple(sorted(values))


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic quantization map: ``2**total_bits`` sorted fp32 values."""
    return torch.tensor(_dynamic_map_values(signed, max_exponent_bits, total_bits), dtype=torch.float32)


@dataclasses.dataclass
class DoubleQuantized:
    """Block statistics quantized to 8 bits: ``absmax ≈ dynamic_map()[codes] · nested_absmax[block] + offset``."""

    codes: torch.Tensor  # uint8 [num_blocks]
    nested_absmax: torch.Tensor  # fp32 [⌈num_blocks / 256⌉]
    offset: torch.Tensor  # fp32 scalar


def double_quantize(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> DoubleQuantized:
    """Quantize fp32 block statistics as bitsandbytes does (mean subtracted, dynamic 8-bit, blocks of 256)."""
    absmax = absmax.float()
    offset = absmax.mean()
    codes, nested = quantize_blockwise(absmax - offset, dynamic_map(), blocksize)
    return DoubleQuantized(codes=codes, nested_absmax=nested, offset=offset)


def double_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of `double_quantize` -> fp32 ``[num_blocks]``."""
    values = dequantize_blockwise(codes, nested_absmax, dynamic_map(), blocksize, codes.numel())
    return values + offset.float()
