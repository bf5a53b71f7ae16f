"""PyTorch's weight-only int8 / int4 matmul kernels: availability probes and weight layouts.

int8 (``torch._weight_int8pack_mm(x[M,K], q int8[N,K], s[N])``) computes ``y = (x · qᵀ) ⊙ s``. Its weight
layout is the plain row-major int8 matrix, so no conversion is needed.

int4 (the "tinygemm" kernels: ``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on
CUDA) computes ``y = x · Ŵᵀ`` with, for group ``g`` of row ``n``,

    Ŵ[n, k] = (q[n, k] − 8) · scale[g, n] + zero[g, n],    q ∈ [0, 15],  g = k // group_size,

where ``scales_and_zeros`` is ``[K / group_size, N, 2]`` (``[..., 0]`` scale, ``[..., 1]`` zero) in the
activation dtype. (Conventions as used by gpt-fast ``quantize.py`` and torchao ``Int4CPULayout`` /
``TensorCoreTiledLayout``, verified by this package's tests.) The weight must first be converted to an opaque
kernel layout: the CPU op takes int32 codes ``[N, K]`` and interleaves blocks of 32 or 64 rows depending on the
CPU's vector width; the CUDA op takes two codes per byte ``[N, K/2]`` (even column in the high nibble) and
tiles them for tensor cores. Neither layout is portable between machines, so hayai stores the portable
``[N, K/2]`` nibble matrix and converts on first use; `unpack_int4` recovers the portable codes from a kernel
layout (needed to save or move a layer) by probing the conversion op with index patterns.

Measured on torch 2.13 CPU (Xeon, AVX512-BF16): both kernels are fast only for bf16 activations; their fp32 and
fp16 paths are scalar and 5-20x slower than a dense fp32 ``F.linear``. The probes therefore report a kernel as
usable for a (device, dtype) pair only where it is both correct and fast: bf16 on CPU; every dtype the op
accepts on CUDA for int8, bf16 for int4. Other pairs take the dequantize-then-``F.linear`` reference path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # the CPU op needs N % 16 == 0 (CUDA: N % 8); layers are padded with zero rows
_FAST_CPU_DTYPES = (torch.bfloat16,)
_ROW_CHUNK = 64  # unpack_int4 probes the layout on chunks of this many rows


# ---------------------------------------------------------------------------------------------------------
# nibble packing (the portable int4 layout, shared with NF4): element 2i in the high nibble of byte i
# ---------------------------------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2m]`` integer codes in [0, 15] -> ``[..., m]`` uint8, first element in the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of `pack_nibbles`: ``[..., m]`` uint8 -> ``[..., 2m]`` codes in ``dtype``."""
    codes = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=dtype, device=packed.device)
    codes[..., 0::2] = packed >> 4
    codes[..., 1::2] = packed & 0x0F
    return codes


# ---------------------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------------------
_DECIDED: dict[tuple[str, str, torch.dtype], bool] = {}  # (kernel, device type, dtype) -> usable


def _decided(kernel: str, device_type: str, dtype: torch.dtype, probe: Callable[[str, torch.dtype], bool]) -> bool:
    """Probe once per (device, dtype), then answer from a plain dict: torch.compile reads that as a constant,
    where a probe traced inside a compiled graph would break the graph at every quantized layer."""
    key = (kernel, device_type, dtype)
    if key not in _DECIDED:
        _DECIDED[key] = probe(device_type, dtype)
    return _DECIDED[key]


def int8_kernel_usable(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._weight_int8pack_mm`` exists, is correct and fast for activations of this dtype/device."""
    return _decided("int8", device_type, dtype, _int8_probe)


def int4_kernel_usable(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the int4 tinygemm kernel exists, is correct and fast for activations of this dtype/device."""
    return _decided("int4", device_type, dtype, _int4_probe)


@functools.cache
def _int8_probe(device_type: str, dtype: torch.dtype) -> bool:
    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is None or dtype not in (torch.float32, torch.bfloat16, torch.float16) or device_type == "meta":
        return False
    if device_type == "cpu" and dtype not in _FAST_CPU_DTYPES:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 64, generator=gen).to(device_type, dtype)
        q = torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8).to(device_type)
        s = (torch.rand(32, generator=gen) / 64 + 1e-3).to(device_type, dtype)
        y = op(x, q, s).float()
        ref = (x.float() @ q.float().t()) * s.float()
        return bool(torch.allclose(y, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item()))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@functools.cache
def _int4_probe(device_type: str, dtype: torch.dtype) -> bool:
    if device_type not in ("cpu", "cuda"):
        return False
    if dtype not in (_FAST_CPU_DTYPES if device_type == "cpu" else (torch.bfloat16,)):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        n, k, group = 32, 128, 64
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        sz = torch.stack([torch.rand(k // group, n, generator=gen) / 16 + 1e-3,
                          torch.randn(k // group, n, generator=gen) / 16], dim=-1)  # [G, N, 2]
        x = torch.randn(3, k, generator=gen)
        device = torch.device(device_type)
        packed = int4_pack(pack_nibbles(codes).to(device), k)
        y = int4_mm(x.to(device, dtype), packed, group, sz.to(device, dtype)).float().cpu()
        w = (codes.float().view(n, k // group, group) - 8) * sz[..., 0].t().unsqueeze(-1) \
            + sz[..., 1].t().unsqueeze(-1)  # [N, K/G, G]
        ref = x.to(dtype).float() @ w.reshape(n, k).to(dtype).float().t()
        return bool(torch.allclose(y, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item()))
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------------------
def int8_mm(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[M, K] x int8 [N, K] -> [M, N]``, ``y = (x · qᵀ) ⊙ s`` (scales cast to x's dtype)."""
    return torch._weight_int8pack_mm(x2d, qweight, scales if scales.dtype == x2d.dtype else scales.to(x2d.dtype))


# ---------------------------------------------------------------------------------------------------------
# int4
# ---------------------------------------------------------------------------------------------------------
def cuda_inner_k_tiles(k: int) -> int:
    """The largest tiling factor the CUDA layout allows for this K (K % (16 · tiles) == 0)."""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"int4 CUDA layout needs K divisible by 32, got {k}")


def int4_pack(portable: torch.Tensor, k: int) -> torch.Tensor:
    """Portable ``uint8 [N, K/2]`` codes (on the target device) -> the kernel layout of that device."""
    if portable.is_cpu:
        codes = unpack_nibbles(portable, torch.int32)  # [N, K]
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return torch.ops.aten._convert_weight_to_int4pack(portable.contiguous(), cuda_inner_k_tiles(k))


def int4_mm(x2d: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``[M, K] x int4 [N, K] -> [M, N]`` with the tinygemm kernel of x's device."""
    if x2d.is_cpu:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x2d.contiguous(), packed, group_size, scales_and_zeros)


def _packed_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every nibble of a kernel-layout tensor in memory order (high nibble of each byte first), as uint8."""
    return unpack_nibbles(packed.contiguous().view(torch.uint8).reshape(-1))


def _nibble_sources(n: int, k: int, device: torch.device) -> torch.Tensor:
    """For each nibble of ``int4_pack`` of an ``[n, k]`` matrix: the flat index ``row·k + col`` it came from.

    Found by packing index patterns: pass ``s`` packs bits ``4s..4s+3`` of every element's own flat index.
    """
    index = torch.arange(n * k, device=device)
    sources = torch.zeros(n * k, dtype=torch.int64, device=device)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        plane = ((index >> shift) & 0xF).view(n, k)  # [n, k], values in [0, 15]
        sources |= _packed_nibbles(int4_pack(pack_nibbles(plane), k)).long() << shift
    return sources


def _gather_rows(packed_nibbles: torch.Tensor, sources: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """Place nibbles of consecutive independent row chunks back at their sources: -> codes ``[chunks·rows, k]``."""
    chunks = packed_nibbles.view(-1, rows * k)  # [chunks, rows·k]
    codes = torch.empty_like(chunks)
    codes[:, sources] = chunks
    return codes.view(-1, k)


@functools.lru_cache(maxsize=32)
def _chunk_sources(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Nibble sources of one 64-row chunk (and of the ragged tail), if the layout of ``[n, k]`` is chunk-wise.

    The layouts interleave rows only inside fixed blocks (32/64 rows on CPU, 8 on CUDA); this checks that on
    probes of 128 rows (and 64 + tail rows) rather than assuming it. None when it does not hold.
    """
    chunk, tail = _ROW_CHUNK, n % _ROW_CHUNK
    src = _nibble_sources(chunk, k, device)
    if not torch.equal(_nibble_sources(2 * chunk, k, device), torch.cat([src, src + chunk * k])):
        return None
    if not tail:
        return src, None
    src_tail = _nibble_sources(tail, k, device)
    if not torch.equal(_nibble_sources(chunk + tail, k, device), torch.cat([src, src_tail + chunk * k])):
        return None
    return src, src_tail


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Kernel-layout int4 weight of an ``[n, k]`` matrix -> portable ``uint8 [n, k/2]`` codes.

    The index probe runs on one 64-row chunk (and the ragged tail) and is applied to every chunk; where the
    layout is not chunk-wise it runs on the full shape instead.
    """
    nibbles = _packed_nibbles(packed)  # uint8 [n·k]
    plan = _chunk_sources(n, k, packed.device) if n > 2 * _ROW_CHUNK else None
    if plan is None:
        return pack_nibbles(_gather_rows(nibbles, _nibble_sources(n, k, packed.device), n, k))
    src, src_tail = plan
    full = (n // _ROW_CHUNK) * _ROW_CHUNK
    parts = [_gather_rows(nibbles[: full * k], src, _ROW_CHUNK, k)]
    if src_tail is not None:
        parts.append(_gather_rows(nibbles[full * k:], src_tail, n - full, k))
    return pack_nibbles(torch.cat(parts))  # [n, k/2]


def preferred_activation_dtype(method: str, device_type: str) -> torch.dtype | None:
    """The activation dtype `method`'s packed kernel is fast in on this device: bf16 for int8/int4 where the probe
    passes (their other CPU paths are 5-20x slower, see above). None where the format has no preference."""
    probe = {"int8": int8_kernel_usable, "int4": int4_kernel_usable}.get(method)
    return torch.bfloat16 if probe is not None and probe(device_type, torch.bfloat16) else None
