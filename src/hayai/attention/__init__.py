"""Attention kernels: tensors in, tensors out; no model knowledge.

Every kernel has the signature of `AttentionKernel.__call__` in `hayai.attention.sdpa`:

    SDPAttention            PyTorch's fused scaled_dot_product_attention (the default)
    BlockedFlashAttention   FlashAttention-2 forward and backward as tiled PyTorch ops (the reference)
    TritonFlashAttention    FlashAttention-2 in Triton (CUDA; imports triton on first use)
    ShiftedSparseAttention  LongLoRA's S²-Attn for long-context training

`select_kernel` picks one by name and `set_attention_kernel` swaps it into a model.
"""

from __future__ import annotations

from hayai.attention.blocked import BlockedFlashAttention
from hayai.attention.dispatch import KERNEL_NAMES, select_kernel, set_attention_kernel
from hayai.attention.sdpa import AttentionKernel, SDPAttention
from hayai.attention.shifted_sparse import ShiftedSparseAttention
from hayai.attention.triton_flash import TritonFlashAttention

__all__ = [
    "KERNEL_NAMES",
    "AttentionKernel",
    "BlockedFlashAttention",
    "SDPAttention",
    "ShiftedSparseAttention",
    "TritonFlashAttention",
    "select_kernel",
    "set_attention_kernel",
]

