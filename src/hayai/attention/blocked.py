"""Blocked FlashAttention-2 in pure PyTorch: the readable reference for the fused kernels.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691
(Algorithms 1 and 2); Dao et al., "FlashAttention", arXiv 2205.14135.

Forward, for each query block Q_i (outer loop) and each key/value block K_j, V_j (inner loop), in fp32
(fp64 inputs stay fp64):

    S_ij  = Q_i K_jᵀ · scale                      (masked entries = -inf)
    m_new = max(m, rowmax(S_ij))
    P_ij  = exp(S_ij - m_new)
    l     = exp(m - m_new) · l + rowsum(P_ij)
    acc   = exp(m - m_new) · acc + P_ij V_j         (un-normalised)
    m     = m_new
    O_i   = acc / l,   LSE_i = m + log(l)           (normalised once, only LSE kept for the backward)

Backward, for each key/value block (outer) and query block (inner), recomputing P from the LSE:

    D_i   = rowsum(dO_i ∘ O_i)
    P_ij  = exp(S_ij - LSE_i)
    dV_j += P_ijᵀ dO_i
    dP_ij = dO_i V_jᵀ
    dS_ij = P_ij ∘ (dP_ij - D_i)
    dQ_i += dS_ij K_j · scale,   dK_j += dS_ijᵀ Q_i · scale

Nothing of size T x S is ever materialised: the largest temporaries are one [block_q, block_k] score tile
per (batch, kv head, query-head group), so memory is linear in the sequence length.

Grouped-query attention without repeating K/V: the G = H / H_kv query heads that share a kv head are
stacked along the row axis of the tile ([B, H_kv, G·block_q, D]), so one matmul against the shared K_j
serves them all and the backward's Pᵀ dO sums their contributions to dK_j, dV_j for free.

Masking follows `hayai.attention.sdpa`: causal is bottom-right aligned (query i sees key j iff
j <= i + S - T), an optional bool `mask` (True = may attend) is sliced per tile; both may be combined.
Tiles entirely above the causal diagonal are skipped. A row with no visible key outputs 0, has LSE = -inf
and gets zero gradients (no NaN).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from hayai.attention.sdpa import AttentionKernel
from hayai.errors import ConfigError

_NEG_INF = float("-inf")


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, kernel: str
) -> None:
    """Raise `ConfigError` naming the kernel and the offending argument for shapes the kernels cannot run."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(f"{kernel}: q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ConfigError(f"{kernel}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B, H_kv, S, D] "
                          f"matching q {tuple(q.shape)}")
    if k.shape[1] == 0 or h % k.shape[1] != 0:
        raise ConfigError(f"{kernel}: query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ConfigError(f"{kernel}: mask must be a bool tensor (True = may attend), got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, (b, h, q.shape[2], k.shape[2]))
        except RuntimeError:
            raise ConfigError(f"{kernel}: mask of shape {tuple(mask.shape)} does not broadcast to "
                              f"[B, H, T, S] = {[b, h, q.shape[2], k.shape[2]]}") from None


def _tile_allowed(
    mask5: torch.Tensor | None,  # [B, H_kv, G, T, S] bool view (broadcast strides) or None
    causal: bool,
    offset: int,  # S - T: the bottom-right causal shift
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Bool tile of visible (query, key) pairs, broadcastable to [B, H_kv, G, bq, bk]; None = all visible."""
    allowed = None
    if causal and j1 - 1 > i0 + offset:  # the tile crosses the diagonal
        rows = torch.arange(i0, i1, device=device)[:, None]
        cols = torch.arange(j0, j1, device=device)[None, :]
        allowed = cols <= rows + offset  # [bq, bk]
    if mask5 is not None:
        tile = mask5[:, :, :, i0:i1, j0:j1]
        allowed = tile if allowed is None else tile & allowed
    return allowed


def _first_visible_query(causal: bool, offset: int, j0: int) -> int:
    """Smallest query index that sees key j0 under the bottom-right causal mask (0 when not causal)."""
    return max(0, j0 - offset) if causal else 0


def _last_visible_key(causal: bool, offset: int, i1: int, s: int) -> int:
    """One past the largest key index any query < i1 may see."""
    return max(0, min(s, i1 + offset)) if causal else s


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Tiles are computed in fp32 (fp64 stays fp64, which lets gradcheck run on this reference)."""
    return torch.promote_types(dtype, torch.float32)


def _rows(x5: torch.Tensor, i0: int, i1: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H_kv, G, T, X] -> the query block stacked by head: [B, H_kv, G·(i1-i0), X] in `dtype`."""
    b, hkv, g, _, x = x5.shape
    return x5[:, :, :, i0:i1].to(dtype).reshape(b, hkv, g * (i1 - i0), x)


def blocked_attention_forward(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, H_kv, S, D]
    v: torch.Tensor,  # [B, H_kv, S, D]
    *,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward: (out [B, H, T, D] in q's dtype, lse [B, H, T] in fp32 or fp64)."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    offset = s - t
    cdt = _compute_dtype(q.dtype)
    q5 = q.unflatten(1, (hkv, g))  # [B, H_kv, G, T, D]
    mask5 = None if mask is None else mask.broadcast_to(b, h, t, s).unflatten(1, (hkv, g))
    out5 = torch.empty(b, hkv, g, t, d, dtype=q.dtype, device=q.device)
    lse5 = torch.empty(b, hkv, g, t, dtype=cdt, device=q.device)

    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        bq = i1 - i0
        qi = _rows(q5, i0, i1, cdt)  # [B, H_kv, G·bq, D]
        acc = torch.zeros(b, hkv, g * bq, d, dtype=cdt, device=q.device)
        m = torch.full((b, hkv, g * bq), _NEG_INF, dtype=cdt, device=q.device)
        l = torch.zeros(b, hkv, g * bq, dtype=cdt, device=q.device)
        for j0 in range(0, _last_visible_key(causal, offset, i1, s), block_k):
            j1 = min(j0 + block_k, s)
            kj, vj = k[:, :, j0:j1].to(cdt), v[:, :, j0:j1].to(cdt)  # [B, H_kv, bk, D]
            sij = torch.matmul(qi, kj.transpose(-1, -2)).mul_(scale)  # [B, H_kv, G·bq, bk]
            allowed = _tile_allowed(mask5, causal, offset, i0, i1, j0, j1, q.device)
            if allowed is not None:
                sij.view(b, hkv, g, bq, j1 - j0).masked_fill_(~allowed, _NEG_INF)
            m_new = torch.maximum(m, sij.amax(dim=-1))
            m_safe = torch.where(m_new == _NEG_INF, 0.0, m_new)  # a row with nothing visible yet
            p = torch.exp(sij - m_safe[..., None])  # masked entries -> exp(-inf) = 0
            alpha = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
            l = alpha * l + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vj)
            m = m_new
        empty = l == 0  # fully masked rows: output 0, LSE -inf
        out = acc / torch.where(empty, 1.0, l)[..., None]
        lse = torch.where(empty, _NEG_INF, m + torch.log(torch.where(empty, 1.0, l)))
        out5[:, :, :, i0:i1] = out.view(b, hkv, g, bq, d).to(q.dtype)
        lse5[:, :, :, i0:i1] = lse.view(b, hkv, g, bq)
    return out5.flatten(1, 2), lse5.flatten(1, 2)


def blocked_attention_backward(
    grad_out: torch.Tensor,  # [B, H, T, D]
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,  # [B, H, T]
    *,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: (dq, dk, dv) in the dtypes of q, k, v."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    offset = s - t
    cdt = _compute_dtype(q.dtype)
    q5, do5 = q.unflatten(1, (hkv, g)), grad_out.unflatten(1, (hkv, g))  # [B, H_kv, G, T, D]
    mask5 = None if mask is None else mask.broadcast_to(b, h, t, s).unflatten(1, (hkv, g))
    # D_i = rowsum(dO ∘ O), computed one query block at a time to stay linear in memory.
    delta5 = torch.empty(b, hkv, g, t, dtype=cdt, device=q.device)
    o5 = out.unflatten(1, (hkv, g))
    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        delta5[:, :, :, i0:i1] = (do5[:, :, :, i0:i1].to(cdt) * o5[:, :, :, i0:i1].to(cdt)).sum(-1)
    # Fully masked rows have LSE = -inf; +inf makes their recomputed P exactly 0 instead of exp(-inf + inf).
    lse5 = torch.where(lse == _NEG_INF, float("inf"), lse).unflatten(1, (hkv, g))  # [B, H_kv, G, T]
    dq5 = torch.zeros(b, hkv, g, t, d, dtype=cdt, device=q.device)
    dk = torch.zeros(b, hkv, s, d, dtype=cdt, device=q.device)
    dv = torch.zeros(b, hkv, s, d, dtype=cdt, device=q.device)

    for j0 in range(0, s, block_k):
        j1 = min(j0 + block_k, s)
        kj, vj = k[:, :, j0:j1].to(cdt), v[:, :, j0:j1].to(cdt)  # [B, H_kv, bk, D]
        start = _first_visible_query(causal, offset, j0) // block_q * block_q
        for i0 in range(start, t, block_q):
            i1 = min(i0 + block_q, t)
            bq = i1 - i0
            qi, doi = _rows(q5, i0, i1, cdt), _rows(do5, i0, i1, cdt)  # [B, H_kv, G·bq, D]
            lse_i = lse5[:, :, :, i0:i1].reshape(b, hkv, g * bq, 1)
            delta_i = delta5[:, :, :, i0:i1].reshape(b, hkv, g * bq, 1)
            sij = torch.matmul(qi, kj.transpose(-1, -2)).mul_(scale)  # [B, H_kv, G·bq, bk]
            allowed = _tile_allowed(mask5, causal, offset, i0, i1, j0, j1, q.device)
            if allowed is not None:
                sij.view(b, hkv, g, bq, j1 - j0).masked_fill_(~allowed, _NEG_INF)
            p = torch.exp(sij - lse_i)  # [B, H_kv, G·bq, bk]
            dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), doi)  # sums the G heads
            dp = torch.matmul(doi, vj.transpose(-1, -2))  # [B, H_kv, G·bq, bk]
            ds = p * (dp - delta_i)
            dq5[:, :, :, i0:i1] += torch.matmul(ds, kj).mul_(scale).view(b, hkv, g, bq, d)
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qi).mul_(scale)
    return dq5.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockedFlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        scale: float,
        block_q: int,
        block_k: int,
    ) -> torch.Tensor:
        out, lse = blocked_attention_forward(
            q, k, v, causal=causal, mask=mask, scale=scale, block_q=block_q, block_k=block_k
        )
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.block_q, ctx.block_k = causal, scale, block_q, block_k
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = blocked_attention_backward(
            grad_out, q, k, v, out, lse,
            causal=ctx.causal, mask=mask, scale=ctx.scale, block_q=ctx.block_q, block_k=ctx.block_k,
        )
        return dq, dk, dv, None, None, None, None, None


class BlockedFlashAttention(AttentionKernel):
    """FlashAttention-2 as tiled PyTorch ops: exact attention in memory linear in the sequence length.

    Args:
        block_q: query rows per tile (per query head).
        block_k: key/value columns per tile.
    Any positive sizes work; they need not divide the sequence lengths.
    """

    def __init__(self, block_q: int = 128, block_k: int = 128) -> None:
        super().__init__()
        if block_q < 1 or block_k < 1:
            raise ConfigError(
                f"BlockedFlashAttention: block_q and block_k must be >= 1, got {block_q}, {block_k}"
            )
        self.block_q, self.block_k = block_q, block_k

    def extra_repr(self) -> str:
        return f"block_q={self.block_q}, block_k={self.block_k}"

    def forward(self, q, k, v, *, causal, mask=None, scale=None):
        check_attention_inputs(q, k, v, mask, type(self).__name__)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return _BlockedFlashAttentionFn.apply(q, k, v, mask, causal, scale, self.block_q, self.block_k)
