"""Blockwise absmax quantization to a code book: the shared core of NF4 and of the 8-bit double quantization.

A flat tensor ``x [n]`` is cut into blocks of ``B`` consecutive elements (the last block may be shorter and
gets its own statistic). Per block ``b``:

    absmax[b] = max |x_block|,     c_i = nearest code index of x_i / absmax[b],     x̂_i = code[c_i] · absmax[b]

This is the scheme of bitsandbytes' blockwise quantization (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv:2110.02861) used by QLoRA for NF4. To reproduce bitsandbytes' codes bit for
bit, the details follow its reference backend (``backends/default/ops.py::quantize_4bit``, v0.50) exactly:
full blocks are normalised by multiplying with the fp32 reciprocal ``x · (1 / absmax)``, the ragged last block
by dividing ``x / absmax``; the nearest code is found with ``bucketize`` against the fp32 midpoints
``(code[j] + code[j+1]) / 2``, so a value exactly on a midpoint takes the lower code (the CUDA kernels'
``x > midpoint`` rule). A block of zeros gets ``absmax = 0`` and the code of 0. Everything runs in fp32, in
chunks of whole blocks to bound temporary memory.
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMENTS = 1 << 22  # elements per processing chunk (rounded down to whole blocks)


def num_blocks(n: int, blocksize: int) -> int:
    return math.ceil(n / blocksize)


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted fp32 ``code`` for each element of ``x`` (ties: lower), uint8."""
    midpoints = (code[:-1] + code[1:]) / 2  # [C-1]
    return torch.bucketize(x, midpoints, right=False).to(torch.uint8)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``[n]`` -> ``[⌈n/B⌉, B]`` padded with zeros (zeros change no absmax)."""
    pad = num_blocks(flat.numel(), blocksize) * blocksize - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape) -> (codes ``uint8 [n]``, absmax ``fp32 [⌈n/B⌉]``)."""
    flat = x.reshape(-1)
    n = flat.numel()
    code = code.to(device=flat.device, dtype=torch.float32)
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=flat.device)
    step = max(blocksize, _CHUNK_ELEMENTS // blocksize * blocksize)
    for start in range(0, n, step):
        part = flat[start: start + step].float()
        blocks = _blocks(part, blocksize)  # [b, B]
        amax = blocks.abs().amax(dim=1)  # [b]
        safe = torch.where(amax > 0, amax, torch.ones_like(amax)).unsqueeze(1)
        scaled = blocks * (1 / safe)
        if start + step >= n and n % blocksize:  # the ragged last block divides (bitsandbytes does)
            scaled[-1] = blocks[-1] / safe[-1]
        scaled = torch.where(amax.unsqueeze(1) > 0, scaled.clamp(-1, 1), torch.zeros_like(scaled))
        codes[start: start + part.numel()] = nearest_code(scaled.reshape(-1)[: part.numel()], code)
        absmax[start // blocksize: start // blocksize + amax.numel()] = amax
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: ``code[c] · absmax[block]`` in fp32, then cast -> ``[n]``."""
    code = code.to(device=codes.device, dtype=torch.float32)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    step = max(blocksize, _CHUNK_ELEMENTS // blocksize * blocksize)
    for start in range(0, n, step):
        stop = min(n, start + step)
        values = _blocks(code[codes[start:stop].long()], blocksize)  # [b, B]
        scaled = values * absmax[start // blocksize: start // blocksize + values.shape[0]].unsqueeze(1)
        out[start:stop] = scaled.reshape(-1)[: stop - start]
    return out
