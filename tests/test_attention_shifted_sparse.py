"""ShiftedSparseAttention (LongLoRA S²-Attn): the implied attention pattern, probed, against the expected groups.

The oracle is the definition: query i of head h may attend key j iff both lie in the same segment, where the
segments of the unshifted heads (h < H // 2) are [0, G), [G, 2G), … and those of the shifted heads are
[0, G/2), [G/2, 3G/2), …, [T-G/2, T) (no wrap-around), and j <= i.
"""

from __future__ import annotations

import pytest
import torch

from hayai.attention import BlockedFlashAttention, SDPAttention, ShiftedSparseAttention
from hayai.attention.sdpa import causal_mask, repeat_kv
from hayai.errors import ConfigError


def expected_mask(h: int, t: int, g: int) -> torch.Tensor:
    """[H, T, T] bool: the S²-Attn pattern with causal masking inside segments."""
    pos = torch.arange(t)
    plain = pos // g
    shifted = (pos + g // 2) // g
    seg = torch.stack([plain if head < h // 2 else shifted for head in range(h)])  # [H, T]
    same = seg[:, :, None] == seg[:, None, :]
    return same & causal_mask(t, t, pos.device)


def make_qkv(b, h, hkv, t, d, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=gen, dtype=dtype).requires_grad_() for n in (h, hkv, hkv)]


def s2(**kwargs) -> ShiftedSparseAttention:
    return ShiftedSparseAttention(**kwargs).train()


@pytest.mark.parametrize("h,hkv", [(9, 3), (6, 2), (4, 4)])
def test_one_hot_values_reveal_exactly_the_shifted_group_pattern(h, hkv):
    t, g = 16, 4
    q, k, _ = make_qkv(1, h, hkv, t, t)
    v = torch.eye(t, dtype=torch.float64).expand(1, hkv, t, t)  # value j = e_j, so out[h, i] = P[h, i, :]
    probs = s2(group_size=g)(q, k, v, causal=True)[0]  # [H, T, T]
    attended = probs > 0
    assert torch.equal(attended, expected_mask(h, t, g))
    torch.testing.assert_close(probs.sum(-1), torch.ones(h, t, dtype=torch.float64))


def test_no_token_attends_across_the_sequence_ends():
    h, t, g = 4, 32, 8
    q, k, _ = make_qkv(1, h, h, t, t)
    v = torch.eye(t, dtype=torch.float64).expand(1, h, t, t)
    probs = s2(group_size=g)(q, k, v, causal=True)[0]
    shifted = probs[h // 2 :]  # [H/2, T, T]
    # the roll(-G/2) version puts the first half-group with the last one; here they are separate segments
    assert torch.all(shifted[:, : g // 2, t - g // 2 :] == 0)
    assert torch.all(shifted[:, t - g // 2 :, : g // 2] == 0)
    # the last half-group attends only among itself
    last = shifted[:, t - g // 2 :, :]
    assert torch.all(last[:, :, : t - g // 2] == 0)


def test_jacobian_wrt_values_has_the_same_pattern():
    """The backward sees the same structure: d out[h, i] / d v[j] is non-zero iff (i, j) is allowed."""
    h, hkv, t, g, d = 6, 2, 8, 4, 3
    q, k, v = make_qkv(1, h, hkv, t, d)
    kernel = s2(group_size=g)
    jac = torch.autograd.functional.jacobian(lambda v: kernel(q, k, v, causal=True), v)  # [1,H,T,D, 1,Hkv,S,D]
    jac = jac[0, :, :, :, 0]  # [H, T, D, Hkv, S, D]
    own_kv = jac[torch.arange(h), :, :, torch.arange(h) // (h // hkv)]  # [H, T, D, S, D]
    touched = own_kv.abs().sum(dim=(2, 4)) > 0  # [H, T, S]
    assert torch.equal(touched, expected_mask(h, t, g))


@pytest.mark.parametrize("h,hkv", [(9, 3), (6, 6)])
def test_values_and_gradients_match_dense_attention_with_the_pattern(h, hkv):
    t, g, d = 24, 8, 8
    q, k, v = make_qkv(2, h, hkv, t, d)
    grad_out = torch.randn(2, h, t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = s2(group_size=g)(q, k, v, causal=True)
    ref = SDPAttention()(q, repeat_kv(k, h // hkv), repeat_kv(v, h // hkv), causal=False,
                         mask=expected_mask(h, t, g))
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_default_ratio_is_a_quarter_of_the_sequence():
    h, t = 4, 32
    q, k, _ = make_qkv(1, h, 2, t, t)
    v = torch.eye(t, dtype=torch.float64).expand(1, 2, t, t)
    probs = s2()(q, k, v, causal=True)[0]
    assert torch.equal(probs > 0, expected_mask(h, t, t // 4))


def test_one_group_equals_full_causal_attention_with_gradients():
    h, hkv, t, d = 6, 2, 12, 8
    q, k, v = make_qkv(1, h, hkv, t, d)
    grad_out = torch.randn(1, h, t, d, dtype=torch.float64)
    out = s2(group_size=t)(q, k, v, causal=True)
    ref = SDPAttention()(q, k, v, causal=True)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_eval_mode_is_full_attention_and_accepts_a_kv_cache():
    h, hkv, t, d = 6, 2, 16, 8
    q, k, v = make_qkv(1, h, hkv, t, d)
    kernel = ShiftedSparseAttention(group_size=4).eval()
    torch.testing.assert_close(kernel(q, k, v, causal=True), SDPAttention()(q, k, v, causal=True))
    q1 = q[:, :, -3:]  # decoding 3 tokens after a 13-token prefix: T != S is fine at inference
    torch.testing.assert_close(kernel(q1, k, v, causal=True), SDPAttention()(q1, k, v, causal=True))


def test_padding_mask_is_intersected_with_the_groups():
    h, t, g, d = 4, 16, 4, 8
    q, k, v = make_qkv(2, h, 2, t, d)
    keep = torch.ones(2, t, dtype=torch.bool)
    keep[1, 11:] = False  # right padding in the second sequence
    mask = keep[:, None, None, :] & causal_mask(t, t, q.device)  # [B, 1, T, T]
    out = s2(group_size=g)(q, k, v, causal=False, mask=mask)
    full = mask & expected_mask(h, t, g)  # [B, H, T, T]
    ref = SDPAttention()(q, repeat_kv(k, 2), repeat_kv(v, 2), causal=False, mask=full)
    torch.testing.assert_close(out, ref)


def test_blocked_inner_kernel_gives_the_same_result():
    h, hkv, t, g, d = 6, 2, 32, 8, 8
    q, k, v = make_qkv(1, h, hkv, t, d, dtype=torch.float32)
    a = s2(group_size=g)(q, k, v, causal=True)
    b = s2(group_size=g, inner=BlockedFlashAttention(block_q=3, block_k=5))(q, k, v, causal=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_configurations_raise_clear_errors():
    q, k, v = make_qkv(1, 4, 2, 10, 8)
    with pytest.raises(ConfigError, match="multiple of the group size 4"):
        s2(group_size=4)(q, k, v, causal=True)
    with pytest.raises(ConfigError, match="even"):
        s2(group_size=5)(q, k, v, causal=True)
    with pytest.raises(ConfigError, match="T == S"):
        s2(group_size=2)(q[:, :, :4], k, v, causal=True)
    with pytest.raises(ConfigError, match="group_size_ratio"):
        ShiftedSparseAttention(group_size_ratio=0.0)
    with pytest.raises(ConfigError, match="group_size must be"):
        ShiftedSparseAttention(group_size=0)
