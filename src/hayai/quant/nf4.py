"""NF4 (4-bit NormalFloat) weights for QLoRA (Dettmers et al. 2023, arXiv:2305.14314, §3).

NF4 is a 16-entry code book whose values are quantiles of N(0, 1), normalised to [−1, 1], with an exact 0
(7 negative values, 0, 8 positive; bitsandbytes ``create_normal_map(offset=0.9677083, use_extra_value=True)``).
A weight is flattened (row-major) and cut into blocks of 64; per block

    absmax = max |w|,   c = nearest NF4 index of w / absmax,   ŵ = NF4[c] · absmax   (fp32, then cast)

Two codes go in one byte, the first element of each pair in the high nibble; a ragged last block gets its
own absmax. This reproduces bitsandbytes' ``quantize_4bit(quant_type="nf4")`` codes and absmax bit for bit
(its tests: mean |err| ≈ 0.0728 and mean relative error ≈ 0.2033 on ``randn(1024, 1024)``, block 64). The
absmax values can be double-quantized (`hayai.quant.double_quant`), which takes storage from 4.5 to about
4.127 bits per parameter (`nf4_bits_per_parameter`).

`NF4Linear` keeps the frozen base weight in this format and, in forward, dequantizes it to the compute dtype
and calls ``F.linear``, in pure PyTorch (CPU and GPU alike). Its backward (shared with the other formats,
`hayai.quant.base`) re-dequantizes the weight to compute ``∂L/∂x`` instead of keeping a dense copy alive
between forward and backward, so a LoRA adapter on top trains with only the 4-bit weight resident.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hayai.errors import ConfigError
from hayai.quant.base import QuantizedLinear, copy_bias, dtype_name, float_dtype_of, weight_for_quantization
from hayai.quant.blockwise import dequantize_blockwise, nearest_code, num_blocks, quantize_blockwise
from hayai.quant.double_quant import NESTED_BLOCKSIZE, double_dequantize, double_quantize
from hayai.quant.kernels import pack_nibbles, unpack_nibbles

# bitsandbytes functional.py get_4bit_type("nf4"), the exact fp32 constants (index = 4-bit code).
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
DEFAULT_BLOCKSIZE = 64


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 code book as fp32 ``[16]``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def check_blocksize(blocksize: int) -> int:
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ConfigError(f"nf4 blocksize must be a positive even integer (bitsandbytes: 32..4096), got {blocksize!r}")
    return blocksize


def quantize_nf4(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-shape float tensor -> (packed ``uint8 [⌈n/2⌉]``, absmax ``fp32 [⌈n/blocksize⌉]``)."""
    code = nf4_code(weight.device)
    codes, absmax = quantize_blockwise(weight, code, check_blocksize(blocksize))
    if codes.numel() % 2:  # the odd last element pairs with the code of 0.0 (as in bitsandbytes)
        codes = F.pad(codes, (0, 1), value=int(nearest_code(torch.zeros(1, device=code.device), code)))
    return pack_nibbles(codes), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32, blocksize: int = DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """Inverse of `quantize_nf4`: ``NF4[c] · absmax`` in fp32, cast to ``dtype``, reshaped to ``shape``."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed.reshape(-1))[:n]
    return dequantize_blockwise(codes, absmax, nf4_code(packed.device), blocksize, n, dtype).view(shape)


def nf4_bits_per_parameter(blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                           nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Asymptotic storage per weight: 4 + 32/B, or with double quantization 4 + 8/B + 32/(B · B₂)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)


class NF4Linear(QuantizedLinear):
    """A linear layer with a frozen NF4 weight (QLoRA's base layer); see the module docstring.

    ``compute_dtype`` (e.g. bf16) forces the matmul dtype: inputs are cast to it and outputs cast back; by
    default the input's dtype is used. ``dtype`` is the original weight's dtype: the bias's dtype and the
    default of `dequantize_weight`.
    """

    kind = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.dtype = dtype
        n = in_features * out_features
        blocks = num_blocks(n, blocksize)
        self.register_buffer("qweight", torch.full(((n + 1) // 2,), 0x77, dtype=torch.uint8, device=device))
        if double_quant:  # bitsandbytes QuantState names: absmax (8-bit codes), nested_absmax, nested_offset
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(num_blocks(blocks, NESTED_BLOCKSIZE),
                                                              dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype,
                    dtype=float_dtype_of(linear.weight), device="meta")
        packed, absmax = quantize_nf4(weight_for_quantization(linear), blocksize)
        layer.qweight = packed
        if double_quant:
            dq = double_quantize(absmax)
            layer.absmax, layer.nested_absmax, layer.nested_offset = dq.codes, dq.nested_absmax, dq.offset
        else:
            layer.absmax = absmax
        layer.bias = copy_bias(linear)
        return layer

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "compute_dtype": None if self.compute_dtype is None else dtype_name(self.compute_dtype),
                "dtype": dtype_name(self.dtype)}

    def block_absmax(self) -> torch.Tensor:
        """The per-block absmax as fp32 (reconstructed from its 8-bit codes under double quantization)."""
        if self.double_quant:
            return double_dequantize(self.absmax, self.nested_absmax, self.nested_offset)
        return self.absmax

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.qweight, self.block_absmax(), (self.out_features, self.in_features),
                              dtype or self.dtype, self.blocksize)  # [out, in]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x2d.dtype
        y = F.linear(x2d.to(dtype), self.dequantize_weight(dtype))  # [M, out]
        return y.to(x2d.dtype)
