"""int8 weight-only quantization, symmetric per output channel.

For each output row ``n`` of ``W [N, K]``:

    s[n] = max_k |W[n, k]| / 127,      q[n, k] = clamp(round(W[n, k] / s[n]), −127, 127),      Ŵ = q · s[n]

so ``|W − Ŵ| ≤ s[n] / 2`` element-wise. Rows that are all zero get ``s = 1`` (and ``q = 0``). This is the
"weight-only int8" of gpt-fast and torchao (``int8_weight_only``); activations stay in float. Storage is
8 bits per weight plus one scale per row. The scale is kept in the weight's original dtype and the codes are
rounded against that stored scale, so ``Ŵ`` is exactly what the kernel computes with.

Forward uses ``torch._weight_int8pack_mm`` where `hayai.quant.kernels.int8_kernel_usable` says it is correct
and fast for the activation dtype/device, else the reference path ``F.linear(x, Ŵ)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hayai.quant import kernels
from hayai.quant.base import QuantizedLinear, copy_bias, dtype_name, float_dtype_of, weight_for_quantization

QMAX = 127


def quantize_int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K]`` -> (codes int8 ``[N, K]``, scales ``[N]`` in ``scale_dtype``), symmetric per row."""
    w = weight.float()
    amax = w.abs().amax(dim=-1)  # [N]
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(scale_dtype)
    codes = torch.round(w / scales.float().unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)  # [N, K]
    return codes, scales


def dequantize_int8_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8_rows`: ``q · s`` computed in fp32, returned in ``dtype``."""
    return (codes.float() * scales.float().unsqueeze(-1)).to(dtype)


class Int8Linear(QuantizedLinear):
    """A linear layer whose weight is int8 per-output-channel (symmetric); see the module docstring."""

    kind = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> Int8Linear:
        if options:
            raise TypeError(f"Int8Linear.from_linear takes no options, got {sorted(options)}")
        dtype = float_dtype_of(linear.weight)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=dtype,
                    device="meta")
        codes, scales = quantize_int8_rows(weight_for_quantization(linear), dtype)
        layer.qweight, layer.scales = codes, scales
        layer.bias = copy_bias(linear)
        return layer

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": dtype_name(self.scales.dtype)}

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8_rows(self.qweight, self.scales, dtype or self.scales.dtype)  # [N, K]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if kernels.int8_kernel_usable("cpu" if x2d.is_cpu else x2d.device.type, x2d.dtype):
            buffers = self._buffers  # see QuantizedLinear.forward
            return kernels.int8_mm(x2d, buffers["qweight"], buffers["scales"])  # [M, N]
        return F.linear(x2d, self.dequantize_weight(x2d.dtype))
