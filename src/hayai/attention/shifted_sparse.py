"""Shifted sparse attention (S²-Attn), LongLoRA's training-time attention for long contexts.

Chen et al., "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models", ICLR 2024, arXiv
2309.12307.

The sequence of length T is cut into groups of G tokens (G = T / 4 by default) and every token attends
only inside its group (causally), so attention costs T·G instead of T². Half of the query heads use groups
shifted by G/2, so information flows between neighbouring groups across layers. With segment ids

    unshifted heads h < H // 2:  seg(i) = floor(i / G)          segments [0, G), [G, 2G), ...
    shifted heads   h >= H // 2: seg(i) = floor((i + G/2) / G)  segments [0, G/2), [G/2, 3G/2), …, [T-G/2, T)

query i may attend key j iff seg(i) = seg(j) (and j <= i when causal). For the shifted heads the first
half-group [0, G/2) and the last half-group [T-G/2, T) are two short segments of their own, which is the
varlen segmentation of LongLoRA's flash-attention path: unlike the `roll(-G/2)` of its reference path, no
token attends across the sequence ends (LongLoRA issues #15, #90).

As in LongLoRA the shift acts on query heads after the kv heads have been repeated for GQA
([B, H_kv, T, D] -> [B, H, T, D]); gradients flow back through the repeat and sum into the kv heads.
Each group is computed by an inner kernel (SDPA unless given) on tensors reshaped so that groups become
extra heads; nothing T x T is formed.

Conventions:
- Training mode only. In eval mode (`module.eval()`) the kernel computes full attention through its inner
  kernel, because S²-Attn is a training-time approximation and inference uses full attention.
- In training mode it needs self-attention over the whole sequence (T == S, no KV cache) with T % G == 0
  and an even G; anything else raises `ConfigError`.
- With a single group (G == T) there is no neighbouring group to shift towards, so every head attends to
  the full sequence and the result equals full causal attention. (LongLoRA's flash path would still cut
  the shifted heads at G/2 in that case; its roll path would wrap.)
- A bool `mask` (e.g. padding) is intersected with the group structure, block by block.
"""

from __future__ import annotations

import torch

from hayai.attention.blocked import check_attention_inputs
from hayai.attention.sdpa import AttentionKernel, SDPAttention, repeat_kv
from hayai.errors import ConfigError


def _diagonal_blocks(mask: torch.Tensor, seg: int, heads: int) -> torch.Tensor:
    """[B, 1 or heads, L, L] bool -> its diagonal [seg, seg] blocks as heads: [B, heads·L/seg, seg, seg]."""
    b, _, length, _ = mask.shape
    n = length // seg
    blocks = mask.unflatten(-1, (n, seg)).unflatten(2, (n, seg))  # [B, Hm, n, seg, n, seg]
    diag = torch.diagonal(blocks, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # [B, Hm, n, seg, seg]
    return diag.expand(b, heads, n, seg, seg).reshape(b, heads * n, seg, seg)


class ShiftedSparseAttention(AttentionKernel):
    """S²-Attn: grouped causal attention with half of the heads shifted by half a group (no wrap-around).

    Args:
        group_size_ratio: G = int(T · ratio) when `group_size` is None (LongLoRA: 1/4).
        group_size: a fixed G in tokens, overriding the ratio.
        inner: kernel computing attention inside the groups (and full attention in eval mode); SDPA by
            default.
    """

    def __init__(
        self,
        group_size_ratio: float = 0.25,
        group_size: int | None = None,
        inner: AttentionKernel | None = None,
    ) -> None:
        super().__init__()
        if group_size is None and not 0.0 < group_size_ratio <= 1.0:
            raise ConfigError(
                f"ShiftedSparseAttention: group_size_ratio must be in (0, 1], got {group_size_ratio}"
            )
        if group_size is not None and group_size < 1:
            raise ConfigError(f"ShiftedSparseAttention: group_size must be >= 1, got {group_size}")
        self.group_size_ratio, self.group_size = group_size_ratio, group_size
        self.inner = inner if inner is not None else SDPAttention()

    def extra_repr(self) -> str:
        if self.group_size is not None:
            return f"group_size={self.group_size}"
        return f"group_size_ratio={self.group_size_ratio}"

    def group_size_for(self, t: int) -> int:
        """The group size G for a sequence of `t` tokens; `ConfigError` unless G divides t (and G is even)."""
        g = self.group_size if self.group_size is not None else int(t * self.group_size_ratio)
        if g < 1 or t % g != 0:
            raise ConfigError(
                f"ShiftedSparseAttention: sequence length {t} must be a multiple of the group size {g} "
                f"(group_size={self.group_size}, group_size_ratio={self.group_size_ratio}); "
                "pad or pack sequences to a multiple of the group size"
            )
        if g != t and g % 2 != 0:
            raise ConfigError(f"ShiftedSparseAttention: group size {g} must be even to shift by half a group")
        return g

    def forward(self, q, k, v, *, causal, mask=None, scale=None):
        if not self.training:  # inference: full attention
            return self.inner(q, k, v, causal=causal, mask=mask, scale=scale)
        name = type(self).__name__
        check_attention_inputs(q, k, v, mask, name)
        b, h, t, _ = q.shape
        if k.shape[2] != t:
            raise ConfigError(
                f"{name}: in training mode S²-Attn is self-attention over the whole sequence (T == S, "
                f"no KV cache); got T={t}, S={k.shape[2]}. Call module.eval() for inference."
            )
        g = self.group_size_for(t)
        if g == t:  # one group: nothing to shift towards, plain full attention
            return self.inner(q, k, v, causal=causal, mask=mask, scale=scale)
        k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])  # [B, H, T, D]
        mask4 = None if mask is None else mask[(None,) * (4 - mask.dim())].expand(b, -1, t, t)  # [B,1|H,T,T]
        h1 = h // 2  # heads [0, h1) keep the groups, [h1, H) are shifted (LongLoRA: num_heads // 2 onwards)

        m_plain = self._heads(mask4, 0, h1)
        out_plain = self._segments(q[:, :h1], k[:, :h1], v[:, :h1], m_plain, g, causal, scale)
        qs, ks, vs = q[:, h1:], k[:, h1:], v[:, h1:]  # [B, H - h1, T, D]
        ms = self._heads(mask4, h1, h)
        half = g // 2
        middle = slice(half, t - half)  # (T/G - 1) full groups
        out_mid = self._segments(qs[:, :, middle], ks[:, :, middle], vs[:, :, middle],
                                 None if ms is None else ms[:, :, middle, middle], g, causal, scale)
        ends = torch.cat([torch.arange(half), torch.arange(t - half, t)]).to(q.device)  # two half-groups
        ms_ends = None if ms is None else ms[:, :, ends][:, :, :, ends]  # [B, 1|h2, G, G]
        q_ends, k_ends, v_ends = qs[:, :, ends], ks[:, :, ends], vs[:, :, ends]  # [B, H - h1, G, D]
        out_ends = self._segments(q_ends, k_ends, v_ends, ms_ends, half, causal, scale)
        out_shift = torch.cat([out_ends[:, :, :half], out_mid, out_ends[:, :, half:]], dim=2)  # [B,H-h1,T,D]
        return torch.cat([out_plain, out_shift], dim=1)  # [B, H, T, D]

    @staticmethod
    def _heads(mask4: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
        if mask4 is None or mask4.shape[1] == 1:
            return mask4
        return mask4[:, lo:hi]

    def _segments(
        self,
        q: torch.Tensor,  # [B, h, L, D], L a multiple of seg
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,  # [B, 1 or h, L, L] bool
        seg: int,
        causal: bool,
        scale: float | None,
    ) -> torch.Tensor:  # [B, h, L, D]
        """Attention restricted to consecutive segments of `seg` tokens: segments become extra heads."""
        b, heads, length, d = q.shape
        n = length // seg

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, heads * n, seg, d)  # [B, h·n, seg, D]

        seg_mask = None if mask is None else _diagonal_blocks(mask, seg, heads)  # [B, h·n, seg, seg]
        out = self.inner(split(q), split(k), split(v), causal=causal, mask=seg_mask, scale=scale)
        return out.reshape(b, heads, length, d)
