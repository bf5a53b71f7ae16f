"""Attention kernels: tensors in, tensors out; no model knowledge.

Every kernel has the signature of `AttentionKernel.__call__` in `hayai.attention.sdpa`.
"""

from hayai.attention.sdpa import AttentionKernel, SDPAttention

__all__ = ["AttentionKernel", "SDPAttention"]
