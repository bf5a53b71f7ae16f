"""Choosing an attention kernel, and swapping it into a model by module replacement.

    select_kernel("auto" | "sdpa" | "blocked" | "triton", device, dtype) -> AttentionKernel
    set_attention_kernel(model, kernel) -> number of attention layers changed

"auto" picks PyTorch's SDPA on CPU (its fused CPU kernel is already linear in memory and faster than
anything written in Python) and for fp32 on CUDA, and the Triton FlashAttention-2 kernel for fp16/bf16 on
CUDA when triton is importable. `benchmarks/attention.py` is where that choice is measured; revisit it
there.

An attention layer holds its kernel as a child module named `kernel` (`layer.self_attn.kernel`), so
swapping kernels is replacing those modules; the model's forward never sees a flag.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hayai.attention.blocked import BlockedFlashAttention
from hayai.attention.sdpa import AttentionKernel, SDPAttention
from hayai.errors import ConfigError

KERNEL_NAMES = ("auto", "sdpa", "blocked", "triton")


def select_kernel(
    name: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> AttentionKernel:
    """The kernel called `name` for tensors on `device` of `dtype`; `ConfigError` if it cannot run there."""
    device = torch.device(device)
    if name == "sdpa":
        return SDPAttention()
    if name == "blocked":
        return BlockedFlashAttention()
    if name == "triton":
        from hayai.attention.triton_flash import TritonFlashAttention, triton_usable

        reason = triton_usable(device, dtype)
        if reason is not None:
            raise ConfigError(f"attention kernel 'triton' cannot run on {device} with {dtype}: {reason}")
        return TritonFlashAttention()
    if name == "auto":
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            from hayai.attention.triton_flash import TritonFlashAttention, triton_usable

            if triton_usable(device, dtype) is None:
                return TritonFlashAttention()
        return SDPAttention()
    raise ConfigError(f"unknown attention kernel {name!r}; choose one of {', '.join(KERNEL_NAMES)}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def set_attention_kernel(model: nn.Module, kernel: AttentionKernel | str) -> int:
    """Replace every `AttentionKernel` child named `kernel` in `model` with a copy of `kernel`.

    A name is resolved with `select_kernel` for the device and dtype of the model's first floating parameter.
    Each slot gets its own copy, in the train/eval mode of the module it replaces (S²-Attn behaves differently
    in eval mode). Returns the number of modules replaced; raises `ConfigError` when there are none.
    """
    if isinstance(kernel, str):
        kernel = select_kernel(kernel, *_model_device_dtype(model))
    if not isinstance(kernel, AttentionKernel):
        raise ConfigError(
            f"set_attention_kernel: expected an AttentionKernel or a kernel name, got {type(kernel)}"
        )
    slots = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if child_name == "kernel" and isinstance(child, AttentionKernel)
    ]
    if not slots:
        raise ConfigError(f"set_attention_kernel: {type(model).__name__} has no attention kernel modules "
                          "(children named 'kernel' that are AttentionKernel)")
    for parent, child_name, old in slots:
        new = copy.deepcopy(kernel)
        new.train(old.training)
        setattr(parent, child_name, new)
    return len(slots)
