"""BlockedFlashAttention (pure-PyTorch FlashAttention-2) against SDPA and brute force, fwd and bwd."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hayai.attention import BlockedFlashAttention, SDPAttention
from hayai.attention.blocked import blocked_attention_forward
from hayai.attention.sdpa import causal_mask, repeat_kv
from hayai.errors import ConfigError

D = 16


def make_qkv(b, h, hkv, t, s, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, D, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, D, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, D, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def brute_force(q, k, v, causal, mask=None, scale=None):
    """softmax(q kᵀ · scale) v with explicit masks in fp64; rows with nothing visible are 0."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # [B, H, T, S]
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: 0
    return p @ v


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


LENGTHS = [(1, 1), (7, 7), (33, 33), (130, 130), (7, 33), (33, 130), (33, 7)]


@pytest.mark.parametrize("t,s", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [2, 6])
def test_matches_sdpa_forward_and_gradients(t, s, causal, hkv):
    q, k, v = make_qkv(2, 6, hkv, t, s)
    grad_out = torch.randn(2, 6, t, D, generator=torch.Generator().manual_seed(1))
    kernel = BlockedFlashAttention(block_q=16, block_k=12)  # neither divides the lengths
    out = kernel(q, k, v, causal=causal)
    # fp64 oracle: SDPA for everything it defines; T > S causal has rows that see nothing (SDPA gives 0 too)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = SDPAttention()(q64, k64, v64, causal=causal)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    want_grads = grads(ref, (q64, k64, v64), grad_out.double())
    for got, want in zip(grads(out, (q, k, v), grad_out), want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-5)


def test_fp64_is_exact_to_rounding_and_matches_brute_force():
    q, k, v = make_qkv(1, 6, 2, 33, 41, dtype=torch.float64)
    out = BlockedFlashAttention(block_q=8, block_k=7)(q, k, v, causal=True)
    torch.testing.assert_close(out, brute_force(q, k, v, causal=True), atol=1e-12, rtol=1e-12)


def test_bottom_right_causal_rows_that_see_nothing_are_zero_with_zero_grads():
    t, s = 9, 4  # query i sees keys j <= i - 5: rows 0..4 see nothing
    q, k, v = make_qkv(1, 6, 2, t, s)
    out = BlockedFlashAttention(block_q=4, block_k=3)(q, k, v, causal=True)
    assert torch.all(out[:, :, :5] == 0)
    assert torch.all(out[:, :, 5:].abs().sum(-1) > 0)
    out.square().sum().backward()
    assert torch.all(q.grad[:, :, :5] == 0)
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_bool_mask_with_fully_masked_row_and_per_head_mask():
    t, s = 11, 13
    q, k, v = make_qkv(2, 6, 2, t, s)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 6, t, s, generator=gen) > 0.4  # per batch and head
    mask[0, 1, 4] = False  # one fully masked row
    mask[1, :, 7] = False  # a fully masked row in every head
    grad_out = torch.randn(2, 6, t, D, generator=gen)
    out = BlockedFlashAttention(block_q=3, block_k=4)(q, k, v, causal=False, mask=mask)
    ref = brute_force(q, k, v, causal=False, mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.all(out[0, 1, 4] == 0) and torch.all(out[1, :, 7] == 0)
    got = grads(out, (q, k, v), grad_out)
    want = grads(ref, (q, k, v), grad_out.double())
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    assert torch.all(got[0][0, 1, 4] == 0) and torch.all(got[0][1, :, 7] == 0)


def test_broadcast_padding_mask_combined_with_causal_matches_sdpa():
    t = 10
    q, k, v = make_qkv(2, 6, 3, t, t)
    keep = torch.ones(2, t, dtype=torch.bool)
    keep[1, 7:] = False  # right padding in the second sequence
    pad = keep[:, None, None, :]  # [B, 1, 1, S]
    out = BlockedFlashAttention(block_q=4, block_k=4)(q, k, v, causal=True, mask=pad)
    full = pad & causal_mask(t, t, q.device)
    ref = SDPAttention()(q, k, v, causal=False, mask=full)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_gradcheck_fp64():
    q, k, v = make_qkv(1, 4, 2, 5, 7, dtype=torch.float64)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2, :3] = False
    kernel = BlockedFlashAttention(block_q=2, block_k=3)
    assert torch.autograd.gradcheck(lambda q, k, v: kernel(q, k, v, causal=True, mask=mask), (q, k, v))


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v = make_qkv(1, 6, 2, 64, 64, dtype=torch.bfloat16)
    out = BlockedFlashAttention(block_q=16, block_k=16)(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    ref = brute_force(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_custom_scale_and_non_contiguous_inputs():
    q, k, v = make_qkv(1, 6, 2, 12, 12)
    # a [B, T, H, D] projection viewed as [B, H, T, D], as attention layers produce it
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out = BlockedFlashAttention(block_q=5, block_k=5)(qt, kt, vt, causal=True, scale=0.3)
    ref = brute_force(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.shapes.append(tuple(x.shape))
        return out


def test_memory_stays_linear_no_t_by_s_tensor_and_no_repeated_kv():
    b, h, hkv, t, s = 1, 6, 2, 128, 256
    q, k, v = make_qkv(b, h, hkv, t, s)
    kernel = BlockedFlashAttention(block_q=32, block_k=32)
    with _LargestTensor() as probe:
        out = kernel(q, k, v, causal=True)
        out.sum().backward()
    largest = max(torch.Size(shape).numel() for shape in probe.shapes)
    assert largest < t * s  # nothing T x S, not even for one head
    assert (b, h, s, D) not in probe.shapes  # K/V never repeated to H heads


def test_lse_is_logsumexp_of_scores():
    q, k, v = make_qkv(1, 6, 3, 9, 9, dtype=torch.float64)
    _, lse = blocked_attention_forward(
        q, k, v, causal=True, mask=None, scale=0.25, block_q=4, block_k=2
    )
    scores = q @ repeat_kv(k, 2).transpose(-1, -2) * 0.25
    scores = scores.masked_fill(~causal_mask(9, 9, q.device), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))


def test_bad_inputs_raise_config_error():
    q, k, v = make_qkv(1, 6, 4, 4, 4)
    with pytest.raises(ConfigError, match="multiple of key/value heads"):
        BlockedFlashAttention()(q, k, v, causal=True)
    q, k, v = make_qkv(1, 4, 2, 4, 4)
    with pytest.raises(ConfigError, match="bool"):
        BlockedFlashAttention()(q, k, v, causal=False, mask=torch.zeros(4, 4))
    with pytest.raises(ConfigError, match="does not broadcast"):
        BlockedFlashAttention()(q, k, v, causal=False, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="block_q"):
        BlockedFlashAttention(block_q=0)
