"""Next-token cross-entropy without the full-vocabulary logits of the whole batch.

For N trained positions with final hidden states h [N, H], output weight W [V, H] and targets y [N]:

    L = Σᵢ ( logsumexp(zᵢ) − z_{i,yᵢ} ),      zᵢ = W hᵢ                     (summed, not averaged)
    ∂L/∂zᵢ = softmax(zᵢ) − onehot(yᵢ),  ∂L/∂hᵢ = Wᵀ ∂L/∂zᵢ,  ∂L/∂W = Σᵢ ∂L/∂zᵢ hᵢᵀ

The logits of a 256-token × 4 batch over SmolLM2's 49,152-entry vocabulary take 200 MB in fp32 (and as much
again for their gradient); the hidden states take 2.4 MB. `ChunkedCrossEntropy` only ever holds the logits of
`chunk_size` positions: for a plain `nn.Linear` head it computes the loss *and both gradients* chunk by chunk
during the forward pass (the loss is the last operation, so its incoming gradient is a scalar that backward
merely multiplies in; the approach of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024,
arXiv:2410.10989, and torchtune's chunked CE), which avoids computing the logits twice. For any other head
module (a LoRA-wrapped or quantized head) it evaluates each chunk under activation checkpointing, so the chunk's
logits are recomputed in backward instead of stored. Positions whose label is ignored (-100: prompt tokens,
padding) are dropped before the head is applied at all.

`FullCrossEntropy` is the plain computation (all logits at once), kept as the reference and for benchmarks.
Both return the *sum* of token losses; the trainer divides by the number of loss tokens of the whole
accumulated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hayai.train.data import IGNORE_INDEX

DEFAULT_CHUNK_BYTES = 64 * 2**20  # fp32 logits held at once


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def autocast_dtype_for(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for `t`'s device, or None when autocast is off."""
    device = _device_type(t)
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of `hidden @ weightᵀ` against `targets`, gradients computed chunk by chunk in
    forward (see the module docstring). Matmuls run in `compute_dtype`; softmax and the loss in fp32."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_size: int, compute_dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(_device_type(hidden), enabled=False):
            w = weight.to(compute_dtype)  # [V, H]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start: start + chunk_size].to(compute_dtype)  # [n, H]
                t = targets[start: start + chunk_size]  # [n]
                logits = (h @ w.T).float()  # [n, V]
                lse = torch.logsumexp(logits, dim=-1)  # [n]
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: [n, V]
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # ∂L/∂z
                g = probs.to(compute_dtype)
                del logits, probs
                if need_h:
                    grad_h[start: start + chunk_size] = (g @ w).to(hidden.dtype)  # [n, H]
                if need_w:
                    grad_w += g.T @ h  # [V, H], accumulated in fp32 across chunks
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def _valid_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, H], labels [B, T] -> hidden [N, H] and targets [N] of the positions that are trained."""
    keep = labels != IGNORE_INDEX  # [B, T]
    return hidden[keep], labels[keep]


class CausalLMLoss(nn.Module):
    """Strategy interface: `loss(head, hidden [B, T, H], labels [B, T]) -> summed token loss (fp32 scalar)`."""

    def forward(self, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FullCrossEntropy(CausalLMLoss):
    """All logits at once, then `F.cross_entropy(..., reduction="sum")` in fp32 (the reference)."""

    def forward(self, head, hidden, labels):
        h, targets = _valid_positions(hidden, labels)
        logits = head(h).float()  # [N, V]
        return F.cross_entropy(logits, targets, reduction="sum")


class ChunkedCrossEntropy(CausalLMLoss):
    """The same value and gradients as `FullCrossEntropy`, holding the logits of `chunk_size` positions at a
    time (default: as many as fit in `DEFAULT_CHUNK_BYTES` of fp32 logits)."""

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def _chunk(self, vocab: int) -> int:
        return self.chunk_size or max(1, DEFAULT_CHUNK_BYTES // (4 * vocab))

    def forward(self, head, hidden, labels):
        h, targets = _valid_positions(hidden, labels)  # [N, H], [N]
        if h.shape[0] == 0:
            return h.sum() * 0.0
        if type(head) is nn.Linear and head.bias is None:
            compute = autocast_dtype_for(h) or head.weight.dtype
            chunk = self._chunk(head.out_features)
            return _FusedLinearCrossEntropy.apply(h, head.weight, targets, chunk, compute)
        return self._checkpointed(head, h, targets)

    def _checkpointed(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        vocab = getattr(head, "out_features", None) or head(h[:1]).shape[-1]
        chunk = self._chunk(vocab)

        def chunk_loss(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(h_chunk).float(), t_chunk, reduction="sum")

        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            h_chunk, t_chunk = h[start: start + chunk], targets[start: start + chunk]
            if torch.is_grad_enabled():
                total = total + checkpoint(chunk_loss, h_chunk, t_chunk, use_reentrant=False)
            else:
                total = total + chunk_loss(h_chunk, t_chunk)
        return total
