"""SDPAttention: bottom-right causal alignment, GQA, and causal combined with a bool mask, against brute force."""

from __future__ import annotations

import pytest
import torch

from hayai.attention import SDPAttention
from hayai.attention.sdpa import causal_mask, repeat_kv


def brute_force(q, k, v, allowed):
    groups = q.shape[1] // k.shape[1]
    scores = q @ repeat_kv(k, groups).transpose(-1, -2) * q.shape[-1] ** -0.5
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ repeat_kv(v, groups)


@pytest.mark.parametrize("t,s", [(5, 5), (3, 8)])
def test_causal_and_mask_together_are_intersected(t, s):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, length, 8, generator=gen, dtype=torch.float64)
               for n, length in ((6, t), (2, s), (2, s)))
    mask = torch.rand(2, 1, t, s, generator=gen) > 0.3
    mask[..., 0] = True  # keep every row non-empty under both masks
    out = SDPAttention()(q, k, v, causal=True, mask=mask)
    torch.testing.assert_close(out, brute_force(q, k, v, mask & causal_mask(t, s, q.device)))


def test_bottom_right_causal_when_queries_continue_a_prefix():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 4, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    out = SDPAttention()(q, k, v, causal=True)
    torch.testing.assert_close(out, brute_force(q, k, v, causal_mask(3, 7, q.device)))
    assert causal_mask(3, 7, q.device)[0].tolist() == [True] * 5 + [False] * 2
