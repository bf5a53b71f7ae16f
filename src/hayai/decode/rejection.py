"""Verifying drafted tokens against the target model: greedy prefix matching and speculative sampling.

Vocabulary (as in vLLM's rejection sampler): a verification step gets k **drafted** tokens x̃_1..x̃_k and the
target's distributions p_1..p_{k+1} at the k+1 positions they occupy (position i predicts the token after
x̃_{<i}). It returns the **accepted** prefix of the drafts plus one token the target chooses: a **recovered**
token where a draft was rejected, or a **bonus** token after the last draft when every draft was accepted. So
one target forward pass always yields between 1 and k+1 tokens.

Greedy (temperature 0): x̃_i is accepted while x̃_i = argmax p_i; the target's argmax follows. This is exactly
the output of plain greedy decoding, token for token.

Speculative sampling (Leviathan et al. 2023, arXiv 2211.17192, Algorithm 1; Chen et al. 2023, arXiv 2302.01318):
with q_i the draft distribution x̃_i was sampled from,

    accept x̃_i  with probability  min(1, p_i(x̃_i) / q_i(x̃_i)),        u_i ~ U[0, 1) in float64
    at the first rejection i:   sample from  norm(max(0, p_i − q_i))      (recovered token)
    if all k are accepted:      sample from  p_{k+1}                        (bonus token)

which makes every emitted token distributed exactly as the target's own sampling. p and q must be computed
from logits processed identically (same temperature, top-k, top-p: `hayai.decode.sampling.probabilities`).
A deterministic draft (prompt lookup, a greedy draft model) has a one-hot q: accept with probability
p_i(x̃_i), else sample from p_i with x̃_i removed and renormalised (the same formula with q = one-hot).
Uniforms are float64 because float32 `rand` can return exactly 0.0 (PyTorch issue #16706), and a draft token
with q = 0 or p = 0 is never accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    """The outcome of verifying one draft."""

    tokens: list[int]  # accepted drafts followed by the recovered or bonus token (1 .. k+1 tokens)
    accepted: int  # how many drafted tokens were kept


def greedy_verify(draft: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """draft [k] int64, target_logits [k+1, V] -> the target's argmax tokens up to and including the first
    position where it disagrees with the draft (or the bonus token after a fully accepted draft)."""
    k = draft.shape[0]
    target = target_logits.argmax(dim=-1)  # [k+1]
    matches = (draft == target[:k]).to(torch.int64).cumprod(dim=0)  # [k], 1 while every draft so far matched
    n = int(matches.sum())
    return Verdict(target[: n + 1].tolist(), n)


def _residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """norm(max(0, p − q)) [V]; with q=None (one-hot at `token`): p with `token` removed, renormalised."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    total = residual.sum()
    # max(0, p − q) sums to 0 only when p == q, where a rejection has probability 0; guard against rounding.
    return residual / total if total > 0 else p


def sample_verify(draft: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                  generator: torch.Generator | None = None) -> Verdict:
    """Speculative sampling (see the module docstring).

    Args:
        draft: [k] int64 drafted tokens.
        draft_probs: [k, V] the distributions the drafts were sampled from, or None for a deterministic
            (one-hot) draft.
        target_probs: [k+1, V] the target's distributions at the k+1 positions.
        generator: the sampling generator (a seeded one makes the whole decode reproducible).
    """
    k = draft.shape[0]
    target_probs = target_probs.double()
    if k:
        p_draft = target_probs[torch.arange(k), draft]  # [k] p_i(x̃_i)
        one_hot = draft_probs is None
        q_draft = torch.ones_like(p_draft) if one_hot else draft_probs.double()[torch.arange(k), draft]  # [k]
        u = torch.rand(k, dtype=torch.float64, generator=generator, device=draft.device)
        # u < p/q written without division; q = 0 (impossible for a sampled draft, but guarded) never accepts.
        accept = (u * q_draft < p_draft) & (q_draft > 0)  # [k]
        n = int(accept.to(torch.int64).cumprod(dim=0).sum())
    else:
        n = 0
    if n < k:
        q = None if draft_probs is None else draft_probs[n].double()
        dist = _residual(target_probs[n], q, int(draft[n]))  # recovered token
    else:
        dist = target_probs[k]  # bonus token
    token = int(torch.multinomial(dist.float(), 1, generator=generator))
    return Verdict([*draft[:n].tolist(), token], n)
