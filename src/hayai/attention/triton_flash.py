"""FlashAttention-2 as Triton kernels: forward and backward, causal or not, GQA, bool masks, fp16/bf16/fp32.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691.

Same algorithm, masking rules and results as the pure-PyTorch reference `hayai.attention.blocked` (which
states the formulas); the Triton programs live in `hayai.attention.triton_flash_kernels`, imported on
first use so that hayai works without triton installed.

    forward:  grid (⌈T / BLOCK_M⌉, B·H);   each program streams the key/value blocks of one query block
    backward: D = rowsum(dO ∘ O) in PyTorch, then
              grid (⌈S / BLOCK_N⌉, B·H_kv) for dK, dV  and  grid (⌈T / BLOCK_M⌉, B·H) for dQ

Runs on CUDA, and on CPU under Triton's interpreter (`TRITON_INTERPRET=1` set before triton is first
imported), which is how the tests check it without a GPU. The interpreter cannot multiply bf16 tiles
(triton-lang/triton#11584), so bf16 is refused there; fp16 and fp32 interpret correctly.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from types import ModuleType

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from hayai.attention.blocked import check_attention_inputs
from hayai.attention.sdpa import AttentionKernel
from hayai.errors import ConfigError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def triton_installed() -> bool:
    """True when the `triton` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> ModuleType:
    """Import the Triton programs (and triton itself) on first use."""
    if not triton_installed():
        raise ConfigError("attention kernel 'triton': the triton package is not installed "
                          "(pip install 'hayai[triton]')")
    from hayai.attention import triton_flash_kernels

    return triton_flash_kernels


def _triton() -> ModuleType:
    _kernels()
    import triton

    return triton


def triton_interpreting() -> bool:
    """True when the Triton programs were built for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels().flash_fwd_kernel, InterpretedFunction)


def triton_usable(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when the Triton kernel can run on (device, dtype), else the reason it cannot."""
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported (use float16, bfloat16 or float32)"
    if not triton_installed():
        return "the triton package is not installed (pip install 'hayai[triton]')"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"device {device} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
    if not triton_interpreting():
        return "Triton runs on CPU only under its interpreter (TRITON_INTERPRET=1 before its kernels load)"
    if dtype == torch.bfloat16:
        return "the Triton interpreter cannot multiply bfloat16 tiles (triton-lang/triton#11584)"
    return None


def _strides(x: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if x is None else tuple(x.stride())  # type: ignore[return-value]


def _launch_options(block_d: int, dtype: torch.dtype, interpreting: bool) -> dict:
    """Constexprs and launch settings. fp32 dots are IEEE (no silent TF32); half types use the default.

    num_stages=1 (as in the FlashAttention repository's Triton kernel) keeps shared memory small enough for
    fp32 tiles at head_dim 128; these settings are not tuned (no autotuning yet).
    """
    opts = {"BLOCK_D": block_d, "DOT_PRECISION": "ieee" if dtype == torch.float32 else None}
    if not interpreting:
        opts["num_warps"] = 4 if block_d <= 64 else 8
        opts["num_stages"] = 1
    return opts


def triton_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    *, causal: bool, scale: float, block_m: int, block_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, T, D] in q's dtype, lse [B, H, T] fp32)."""
    kern, triton = _kernels(), _triton()
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(t, block_m), b * h)
    kern.flash_fwd_kernel[grid](
        q, k, v, out, lse, q if mask is None else mask,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_strides(mask),
        h, t, s, d, h // hkv, scale,
        CAUSAL=causal, HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        **_launch_options(block_d, q.dtype, triton_interpreting()),
    )
    return out, lse


def triton_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask: torch.Tensor | None,
    *, causal: bool, scale: float, block_m: int, block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v."""
    kern, triton = _kernels(), _triton()
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if t == 0 or s == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (grad_out.float() * out.float()).sum(-1)  # [B, H, T] fp32: D_i = rowsum(dO ∘ O)
    block_d = max(16, triton.next_power_of_2(d))
    opts = _launch_options(block_d, q.dtype, triton_interpreting())
    m = q if mask is None else mask
    common = dict(CAUSAL=causal, HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, **opts)
    kern.flash_bwd_dkdv_kernel[(triton.cdiv(s, block_n), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, m,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *_strides(mask),
        h, hkv, t, s, d, h // hkv, scale, **common,
    )
    kern.flash_bwd_dq_kernel[(triton.cdiv(t, block_m), b * h)](
        q, k, v, grad_out, lse, delta, dq, m,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *_strides(mask),
        h, t, s, d, h // hkv, scale, **common,
    )
    return dq, dk, dv


class _TritonFlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        scale: float,
        block_m: int,
        block_n: int,
    ) -> torch.Tensor:
        out, lse = triton_attention_forward(
            q, k, v, mask, causal=causal, scale=scale, block_m=block_m, block_n=block_n
        )
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.block_m, ctx.block_n = causal, scale, block_m, block_n
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = triton_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, mask,
            causal=ctx.causal, scale=ctx.scale, block_m=ctx.block_m, block_n=ctx.block_n,
        )
        return dq, dk, dv, None, None, None, None, None


def _mask_for_kernel(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """Bool mask -> uint8 [B, H, T, S] view, zero strides where it broadcasts (broadcast dims not copied)."""
    if mask is None:
        return None
    return mask.broadcast_to(shape).view(torch.uint8)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class TritonFlashAttention(AttentionKernel):
    """FlashAttention-2 in Triton. `block_m` x `block_n` is the tile (powers of two; >= 16 on GPUs)."""

    def __init__(self, block_m: int = 64, block_n: int = 64) -> None:
        super().__init__()
        if not (_is_power_of_two(block_m) and _is_power_of_two(block_n)):
            raise ConfigError(f"TritonFlashAttention: block_m and block_n must be powers of two, "
                              f"got {block_m}, {block_n}")
        self.block_m, self.block_n = block_m, block_n

    def extra_repr(self) -> str:
        return f"block_m={self.block_m}, block_n={self.block_n}"

    def forward(self, q, k, v, *, causal, mask=None, scale=None):
        name = type(self).__name__
        check_attention_inputs(q, k, v, mask, name)
        if not (q.dtype == k.dtype == v.dtype):
            raise ConfigError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        reason = triton_usable(q.device, q.dtype)
        if reason is not None:
            raise ConfigError(f"{name}: {reason}")
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ConfigError(f"{name}: head_dim {q.shape[-1]} exceeds {MAX_HEAD_DIM}")
        if q.device.type == "cuda" and min(self.block_m, self.block_n) < 16:
            raise ConfigError(
                f"{name}: block sizes must be >= 16 on GPUs, got {self.block_m}, {self.block_n}"
            )
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        b, h, t, d = q.shape
        kmask = _mask_for_kernel(mask, (b, h, t, k.shape[2]))
        block_m, block_n = self.block_m, self.block_n
        if q.device.type == "cuda" and q.dtype == torch.float32 and d > 64:
            # fp32 tiles at head_dim 128 need ~160 KB of shared memory at 64 x 64; 32 x 32 fits every GPU
            block_m, block_n = min(block_m, 32), min(block_n, 32)
        return _TritonFlashAttentionFn.apply(q, k, v, kmask, causal, scale, block_m, block_n)
