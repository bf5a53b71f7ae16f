"""Attention through `torch.nn.functional.scaled_dot_product_attention` (the default kernel).

    out = softmax(q kᵀ · scale + bias) v

Grouped-query attention: q has H heads, k and v have H_kv heads with H % H_kv == 0; query head h reads
key/value head h // (H / H_kv).

Masking semantics shared by every kernel:
- `causal=True`: query i (of T) may see key j (of S) iff j <= i + (S - T), i.e. the causal mask is aligned to
  the bottom-right corner, so a query block that continues a cached prefix sees the whole prefix.
- `mask` (bool, broadcastable to [B, 1 or H, T, S]): True where attention is allowed. Used for ragged batches,
  speculative verification and packed sequences. Usually `causal` is then False (the mask says everything);
  if both are given, a key must be allowed by both (every hayai kernel intersects them).
- A query row that may see no key at all outputs zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# `enable_gqa` arrived in torch 2.5; older versions get repeated k/v.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D], each kv head repeated for its group of query heads."""
    if groups == 1:
        return x
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, groups, s, d).reshape(b, h_kv * groups, s, d)


class AttentionKernel(nn.Module):
    """Strategy interface: an attention kernel is a parameter-free module the attention layer calls.

    Replacing `layer.self_attn.kernel` with another `AttentionKernel` (blocked FlashAttention, Triton,
    S²-Attn) changes how attention is computed without touching the model.
    """

    def forward(
        self,
        q: torch.Tensor,  # [B, H, T, D]
        k: torch.Tensor,  # [B, H_kv, S, D]
        v: torch.Tensor,  # [B, H_kv, S, D]
        *,
        causal: bool,
        mask: torch.Tensor | None = None,  # bool, broadcastable to [B, H, T, S]
        scale: float | None = None,
    ) -> torch.Tensor:  # [B, H, T, D]
        raise NotImplementedError


class SDPAttention(AttentionKernel):
    """PyTorch's fused attention (flash / memory-efficient / math backends chosen by PyTorch)."""

    def forward(self, q, k, v, *, causal, mask=None, scale=None):
        t, s = q.shape[-2], k.shape[-2]
        groups = q.shape[1] // k.shape[1]
        if causal and (t != s or mask is not None):
            # SDPA's is_causal is top-left aligned and excludes attn_mask: build the bottom-right mask explicitly.
            bottom_right = causal_mask(t, s, q.device)
            mask = bottom_right if mask is None else mask & bottom_right
            causal = False
        if _SDPA_HAS_GQA and groups > 1:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
            )
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, is_causal=causal, scale=scale
        )


def causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask [T, S]: query i sees key j iff j <= i + s - t."""
    rows = torch.arange(t, device=device)[:, None]
    cols = torch.arange(s, device=device)[None, :]
    return cols <= rows + (s - t)
