"""Choosing the compute dtype for training: bf16 autocast where it pays, fp32 elsewhere.

bf16 (Kalamkar et al. 2019, arXiv:1905.12322) halves the bytes of activations and frozen weights; where the
hardware multiplies bf16 natively (GPUs, CPUs with AMX or AVX512-BF16) it is also faster. "Native" is not a
promise of speed, though: on some virtual machines that report AVX512-BF16, oneDNN's bf16 GEMM runs at about
0.6x its fp32 speed. So on CPU, `auto` measures instead of trusting the flag: a few matmuls of a transformer-
sized shape in both dtypes (about 50 ms), and bf16 is chosen only when it is at least `min_ratio` times as fast
as fp32. Trainable parameters (adapters) stay fp32 either way; the loss is computed in fp32.
"""

from __future__ import annotations

import time
from functools import cache

import torch
import torch.nn.functional as F

from hayai.errors import ConfigError
from hayai.runtime import cpu_has_fast_bf16

CHOICES = ("auto", "bf16", "none")


@cache
def bf16_speedup(m: int = 256, k: int = 576, n: int = 1536, rounds: int = 7) -> float:
    """How many times faster a bf16 [m, k] x [k, n] linear runs than an fp32 one on this CPU: the two are timed
    alternately `rounds` times and the fastest of each is compared (robust to interference from other
    processes). Cached for the process."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    xb, wb = x.bfloat16(), w.bfloat16()
    best = {"fp32": float("inf"), "bf16": float("inf")}
    F.linear(x, w), F.linear(xb, wb)  # warm-up (oneDNN primitive creation)
    for _ in range(rounds):
        for name, (a, b) in (("fp32", (x, w)), ("bf16", (xb, wb))):
            start = time.perf_counter()
            F.linear(a, b)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["fp32"] / best["bf16"]


def resolve_autocast(choice: str, device: torch.device, min_ratio: float = 0.95) -> torch.dtype | None:
    """The autocast dtype for `choice`: "bf16", "none", or "auto" (bf16 on GPUs that support it; on CPUs with
    native bf16 when a measured bf16 matmul is at least `min_ratio` times as fast as fp32)."""
    if choice not in CHOICES:
        raise ConfigError(f"autocast must be one of {', '.join(CHOICES)}, got {choice!r} (fp16 needs loss "
                          "scaling, which hayai does not implement)")
    if choice == "none":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_fast_bf16() and bf16_speedup() >= min_ratio:
        return torch.bfloat16
    return None
