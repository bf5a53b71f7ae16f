"""select_kernel and set_attention_kernel: choosing kernels by name and swapping them into a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.attention import (
    AttentionKernel,
    BlockedFlashAttention,
    SDPAttention,
    ShiftedSparseAttention,
    TritonFlashAttention,
    select_kernel,
    set_attention_kernel,
    triton_flash,
)
from hayai.errors import ConfigError


class ToyAttention(nn.Module):
    """The shape of the native attention layer: projections around a child module named `kernel`."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.kernel: AttentionKernel = SDPAttention()

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.kernel(q, k, v, causal=True)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class ToyModel(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": ToyAttention()}) for _ in range(layers))
        self.kernel = nn.Linear(32, 32)  # named `kernel` but not an attention kernel: must be left alone

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["self_attn"](x)
        return x


def test_select_kernel_by_name():
    assert isinstance(select_kernel("sdpa"), SDPAttention)
    assert isinstance(select_kernel("blocked", "cpu", torch.float32), BlockedFlashAttention)
    assert isinstance(select_kernel("auto", "cpu", torch.float32), SDPAttention)
    assert isinstance(select_kernel("auto", "cpu", torch.bfloat16), SDPAttention)


def test_unknown_name_raises():
    with pytest.raises(ConfigError, match=r"unknown attention kernel 'flash3'.*auto, sdpa, blocked, triton"):
        select_kernel("flash3")


def test_triton_without_triton_installed_raises(monkeypatch):
    monkeypatch.setattr(triton_flash, "triton_installed", lambda: False)
    with pytest.raises(ConfigError, match="triton package is not installed"):
        select_kernel("triton", "cuda", torch.float16)
    assert isinstance(select_kernel("auto", "cuda", torch.float16), SDPAttention)  # auto falls back


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_flash, "triton_installed", lambda: True)
    monkeypatch.setattr(triton_flash, "triton_interpreting", lambda: False)
    with pytest.raises(ConfigError, match=r"cannot run on cpu.*interpreter"):
        select_kernel("triton", "cpu", torch.float32)


def test_triton_unsupported_dtype_raises():
    with pytest.raises(ConfigError, match="float64"):
        select_kernel("triton", "cuda", torch.float64)


def test_auto_picks_triton_for_half_precision_on_cuda_and_sdpa_for_fp32(monkeypatch):
    monkeypatch.setattr(triton_flash, "triton_usable", lambda device, dtype: None)
    assert isinstance(select_kernel("auto", "cuda", torch.bfloat16), TritonFlashAttention)
    assert isinstance(select_kernel("auto", "cuda", torch.float32), SDPAttention)


def test_set_attention_kernel_replaces_every_slot_and_keeps_outputs():
    torch.manual_seed(0)
    model = ToyModel()
    x = torch.randn(2, 10, 32)
    before = model(x)
    n = set_attention_kernel(model, BlockedFlashAttention(block_q=4, block_k=3))
    assert n == 3
    kernels = [layer["self_attn"].kernel for layer in model.layers]
    assert all(isinstance(k, BlockedFlashAttention) and k.block_q == 4 for k in kernels)
    assert len({id(k) for k in kernels}) == 3  # one copy per layer
    assert isinstance(model.kernel, nn.Linear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_set_attention_kernel_by_name_and_train_mode_follows_the_model():
    model = ToyModel().eval()
    set_attention_kernel(model, ShiftedSparseAttention(group_size=4).train())
    assert all(not layer["self_attn"].kernel.training for layer in model.layers)
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        s2_eval = model(x)  # eval: full attention, same as SDPA
        set_attention_kernel(model, "sdpa")
        torch.testing.assert_close(model(x), s2_eval)
    assert all(isinstance(layer["self_attn"].kernel, SDPAttention) for layer in model.layers)


def test_set_attention_kernel_on_a_model_without_slots_raises():
    with pytest.raises(ConfigError, match="no attention kernel modules"):
        set_attention_kernel(nn.Sequential(nn.Linear(2, 2)), SDPAttention())
    with pytest.raises(ConfigError, match="expected an AttentionKernel"):
        set_attention_kernel(ToyModel(), nn.Identity())  # type: ignore[arg-type]
