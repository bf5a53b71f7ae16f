"""Choosing the compute dtype for training: bf16 autocast where it pays, fp32 elsewhere.

bf16 (Kalamkar et al. 2019, arXiv:1905.12322) halves the bytes of activations and frozen weights; where the
hardware multiplies bf16 natively (GPUs, CPUs with AMX or AVX512-BF16) it is also faster. "Native" is not a
promise of speed, though: on some virtual machines that report AVX512-BF16, oneDNN's bf16 GEMM runs at about
0.6x its fp32 speed. So on CPU, `auto` measures instead of trusting the flag: a few matmuls of a transformer-
sized shape in both dtypes (about 50 ms), and bf16 is chosen only when it is at least `min_ratio` times as fast
as fp32. Trainable parameters (adapters) stay fp32 either way; the loss is computed in fp32.
"""

from __future__ import annotations

import torch

from hayai.errors import ConfigError
from hayai.runtime import cpu_bf16_pays

CHOICES = ("auto", "bf16", "none")


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
    if device.type == "cpu" and cpu_bf16_pays(m=256, min_ratio=min_ratio):
        return torch.bfloat16
    return None
