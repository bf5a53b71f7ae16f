"""int4 weight-only quantization, group-wise asymmetric (the layout of the "tinygemm" int4 kernels).

Each output row of ``W [N, K]`` is split into groups of ``G`` consecutive input columns (G = 32, 64 or 128
typically). For group ``g`` of row ``n`` with minimum ``lo`` and maximum ``hi``:

    scale = (hi − lo) / 15,    zero = lo + 8 · scale,
    q = clamp(round((W − zero) / scale) + 8, 0, 15),     Ŵ = (q − 8) · scale + zero

so ``lo`` maps to code 0, ``hi`` to code 15, and ``|W − Ŵ| ≤ scale / 2``. ``zero`` is a float offset (the
value of the mid code 8), not an integer zero point: this is the convention of the PyTorch int4 kernels
(gpt-fast ``get_group_qparams``; torchao "zero point domain float"). A constant group stores ``scale = 1,
zero = value, q = 8`` and is reconstructed exactly. ``scale`` and ``zero`` are kept in the weight's dtype, as
``scales_and_zeros [K/G, N, 2]``, and the codes are rounded against the stored values. Storage per weight:
4 bits + 2 · 16 / G bits for bf16 statistics (4.5 bits at G = 64).

Codes are stored portably as ``uint8 [N, ⌈K/G⌉·G / 2]``, two per byte, the first in the high nibble. When
``K`` is not a multiple of ``G`` the last group is ragged: it is padded with a copy of its first element
(which leaves its min/max unchanged), and inputs are padded with zeros, so padded columns contribute nothing.

Forward converts the codes once to the kernel layout of the device (`hayai.quant.kernels`) and runs
``_weight_int4pack_mm(_for_cpu)`` where that kernel is correct and fast for the activation dtype (bf16 on CPU
and CUDA; G ∈ {32, 64, 128, 256}); rows are padded to a multiple of 16 for it. Everything else takes the
reference path ``F.linear(x, Ŵ)``. While the kernel layout is in use the portable codes are not kept (one copy
of the weight in memory); ``state_dict()``, ``dequantize_weight()`` and ``.to()`` recover them exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hayai.errors import ConfigError
from hayai.quant import kernels
from hayai.quant.base import QuantizedLinear, copy_bias, dtype_name, float_dtype_of, weight_for_quantization

# Groups of 32 (as llama.cpp's Q4_0/Q4_1 blocks): on SmolLM2-135M perplexity rises 8% over bf16, against 58%
# with groups of 64, and the CPU kernel runs at the same speed.
DEFAULT_GROUP_SIZE = 32
MID = 8  # the code whose value is `zero`
QMAX = 15


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(f"int4 group_size must be a positive even integer, got {group_size!r}")
    return group_size


def quantize_int4_groups(weight: torch.Tensor, group_size: int,
                         scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K]`` -> (codes ``uint8 [N, Kp/2]``, scales_and_zeros ``[Kp/G, N, 2]``), ``Kp = ⌈K/G⌉·G``."""
    w = weight.float()
    n, k = w.shape
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    if pad:  # ragged last group: repeat its first element, so its min/max are unchanged
        first = w[:, (groups - 1) * group_size].unsqueeze(1)  # [N, 1]
        w = torch.cat([w, first.expand(n, pad)], dim=1)  # [N, Kp]
    g = w.view(n, groups, group_size)  # [N, K/G, G]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, K/G]
    span = hi - lo
    scale = torch.where(span > 0, span / QMAX, torch.ones_like(span)).to(scale_dtype)
    zero = torch.where(span > 0, lo + MID * scale.float(), lo).to(scale_dtype)
    q = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)) + MID
    codes = kernels.pack_nibbles(q.clamp_(0, QMAX).view(n, groups * group_size))  # [N, Kp/2]
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return codes, scales_and_zeros


def dequantize_int4_groups(codes: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int4_groups`: ``(q − 8) · scale + zero`` in fp32 -> ``[N, in_features]`` in dtype."""
    groups, n, _ = scales_and_zeros.shape
    q = kernels.unpack_nibbles(codes, torch.float32).view(n, groups, -1)  # [N, K/G, G]
    scale = scales_and_zeros[..., 0].t().float().unsqueeze(-1)  # [N, K/G, 1]
    zero = scales_and_zeros[..., 1].t().float().unsqueeze(-1)
    w = ((q - MID) * scale + zero).view(n, -1)  # [N, Kp]
    return w[:, :in_features].to(dtype)


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is int4, group-wise asymmetric; see the module docstring."""

    kind = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = DEFAULT_GROUP_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        self.group_size = check_group_size(group_size)
        self.padded_in_features = math.ceil(in_features / group_size) * group_size
        groups = self.padded_in_features // group_size
        self.register_buffer("qweight", torch.full((out_features, self.padded_in_features // 2), MID * 0x11,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(groups, out_features, 2, dtype=dtype, device=device))
        self.kernel_rows: int | None = None  # set while the kernel layout is in use (out_features padded to 16)

    @classmethod
    def unsupported_reason(cls, linear: nn.Linear, *, group_size: int = DEFAULT_GROUP_SIZE,
                           **options: Any) -> str | None:
        if linear.in_features < group_size:
            return (f"in_features {linear.in_features} < group_size {group_size}: padding would store more "
                    "than it saves; choose a smaller group_size")
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        dtype = float_dtype_of(linear.weight)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                    dtype=dtype, device="meta")
        layer.qweight, layer.scales_and_zeros = quantize_int4_groups(weight_for_quantization(linear),
                                                                     group_size, dtype)
        layer.bias = copy_bias(linear)
        return layer

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "group_size": self.group_size, "dtype": dtype_name(self.scales_and_zeros.dtype)}

    # -- codes in either layout --------------------------------------------------------------------------
    @property
    def uses_kernel_layout(self) -> bool:
        """True while the codes live in the kernel layout (``packed_weight``) instead of ``qweight``."""
        return self.kernel_rows is not None

    def portable_codes(self) -> torch.Tensor:
        """The codes as ``uint8 [out, padded_in / 2]`` (recovered from the kernel layout when that is in use)."""
        if self.kernel_rows is None:
            return self.qweight
        codes = kernels.unpack_int4(self.packed_weight, self.kernel_rows, self.padded_in_features)
        return codes[: self.out_features]

    def _use_portable_layout(self) -> None:
        if self.kernel_rows is not None:
            self.qweight = self.portable_codes()
            del self.packed_weight, self.kernel_scales_and_zeros
            self.kernel_rows = None

    def _use_kernel_layout(self, dtype: torch.dtype) -> None:
        """Convert the codes for the kernel (once) and the statistics to ``dtype``; both are non-persistent
        buffers, so they count as the module's memory but never reach a state dict."""
        if self.kernel_rows is None:
            rows = -(-self.out_features // kernels.INT4_ROW_MULTIPLE) * kernels.INT4_ROW_MULTIPLE
            codes = self.qweight
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if called under inference
                if rows != self.out_features:  # zero rows: code 8 and (scale, zero) = 0 give Ŵ = 0
                    codes = torch.cat([codes, codes.new_full((rows - self.out_features, codes.shape[1]), 0x88)])
                self.register_buffer("packed_weight", kernels.int4_pack(codes, self.padded_in_features),
                                     persistent=False)
            self.register_buffer("kernel_scales_and_zeros", None, persistent=False)
            self.kernel_rows = rows
            self.qweight = None  # one copy of the weight: the kernel layout
        sz = self.kernel_scales_and_zeros
        if sz is None or sz.dtype != dtype:
            sz = self.scales_and_zeros.to(dtype)  # [K/G, N, 2]; the same tensor when the dtype already matches
            if self.kernel_rows != self.out_features:
                sz = F.pad(sz, (0, 0, 0, self.kernel_rows - self.out_features))
            self.kernel_scales_and_zeros = sz.contiguous()

    def uses_kernel(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether forward on this device/activation dtype runs the fused int4 kernel."""
        if self.group_size not in kernels.INT4_KERNEL_GROUP_SIZES:
            return False
        if device.type == "cuda" and self.padded_in_features % 32:
            return False
        return kernels.int4_kernel_usable(device.type, dtype)

    # -- the QuantizedLinear contract ----------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int4_groups(self.portable_codes(), self.scales_and_zeros, self.in_features,
                                      dtype or self.scales_and_zeros.dtype)  # [N, K]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # see QuantizedLinear.forward
        sz = buffers.get("kernel_scales_and_zeros")
        if sz is None or sz.dtype != x2d.dtype:
            if not self.uses_kernel(x2d.device, x2d.dtype):
                return F.linear(x2d, self.dequantize_weight(x2d.dtype))
            self._use_kernel_layout(x2d.dtype)
            sz = buffers["kernel_scales_and_zeros"]
        if self.padded_in_features != self.in_features:
            x2d = F.pad(x2d, (0, self.padded_in_features - self.in_features))  # [M, Kp]
        y = kernels.int4_mm(x2d, buffers["packed_weight"], self.group_size, sz)  # [M, rows]
        return y[:, : self.out_features] if self.kernel_rows != self.out_features else y

    # -- keep the kernel layout out of checkpoints and device moves ------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> Int4Linear:
        self._use_portable_layout()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_rows is not None:
            destination[prefix + "qweight"] = self.portable_codes()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.kernel_rows is not None:  # the incoming codes are portable; drop the kernel layout first
            self.qweight = torch.empty(self.out_features, self.padded_in_features // 2, dtype=torch.uint8,
                                       device=self.scales_and_zeros.device)
            del self.packed_weight, self.kernel_scales_and_zeros
            self.kernel_rows = None
        super()._load_from_state_dict(state_dict, prefix, *args)
