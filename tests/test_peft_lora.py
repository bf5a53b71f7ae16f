"""LoRA layers: identity at init, the formula, merge/unmerge, dtypes, disabling, quantized and embedding bases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft import (
    LoRAEmbedding,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    merge_and_unload,
    trainable_parameters_summary,
    unload,
)


class FakeQuantLinear(nn.Module):
    """A QuantizedLinear stand-in: int8 per-row absmax weights, following hayai.quant's duck-typed contract."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qweight.float() * self.scale).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize_weight(x.dtype), self.bias)


def randomized(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator))
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
    return layer


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(24, 16, bias=True)


def test_fresh_adapter_is_identity_and_initialised_like_peft(base):
    x = torch.randn(3, 5, 24)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=8)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(24)  # kaiming_uniform(a=√5): sqrt(6 / ((1 + 5) · fan_in))
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound and a.std() > 0.2 * bound


def test_forward_is_base_plus_scaled_low_rank_update(base):
    x = torch.randn(7, 24)
    for use_rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
        layer = randomized(LoRALinear(base, r=4, alpha=16, use_rslora=use_rslora))
        assert layer.scaling == scale
        a, b = layer.lora_A.weight, layer.lora_B.weight
        expected = x @ base.weight.T + base.bias + scale * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_matches_forward_and_unmerge_restores_weights(base):
    original_w, original_b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = randomized(LoRALinear(base, r=4, alpha=8))
    x = torch.randn(6, 24)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight, original_w + layer.delta_weight(), atol=0, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    # fp32 rounding: (W + Δ) − Δ is W up to about one ulp of |W| + |Δ|, not bit for bit
    limit = 2 * torch.finfo(torch.float32).eps * (original_w.abs() + layer.delta_weight().abs()).max()
    assert (base.weight - original_w).abs().max() <= limit
    assert torch.equal(base.bias, original_b)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(1)
    reference = nn.Linear(32, 32)
    base = nn.Linear(32, 32).to(torch.bfloat16)
    base.load_state_dict(reference.state_dict())
    layer = randomized(LoRALinear(base, r=8, alpha=8))
    assert layer.lora_A.weight.dtype == torch.float32 and base.weight.dtype == torch.bfloat16
    x = torch.randn(4, 32)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    exact = reference(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
    torch.testing.assert_close(out.float(), exact, atol=0.25, rtol=0.02)
    layer.merge()
    torch.testing.assert_close(layer(x.to(torch.bfloat16)).float(), exact, atol=0.5, rtol=0.03)
    bf16_layer = LoRALinear(nn.Linear(8, 8), r=2, dtype=torch.bfloat16)
    assert bf16_layer.lora_B.weight.dtype == torch.bfloat16


def test_dropout_acts_on_the_adapter_input_only(base):
    layer = LoRALinear(base, r=4, dropout=0.9).train()  # B = 0: the adapter path contributes nothing
    x = torch.randn(8, 24)
    assert torch.equal(layer(x), base(x))
    randomized(layer)
    assert not torch.allclose(layer(x), layer(x))  # dropout is live in training mode
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_disabled_runs_the_base_alone_in_both_states(base):
    layer = randomized(LoRALinear(base, r=4))
    x = torch.randn(5, 24)
    plain, adapted = base(x), layer(x)
    with layer.disabled():
        assert torch.equal(layer(x), plain)
    torch.testing.assert_close(layer(x), adapted)
    layer.merge()
    with layer.disabled():
        assert not layer.merged
        torch.testing.assert_close(layer(x), plain, atol=1e-5, rtol=1e-5)
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapter_parameters_get_gradients(base):
    model = nn.Sequential(base, nn.ReLU(), nn.Linear(16, 4))
    apply_lora(model, r=2, init_lora_weights=False)
    model(torch.randn(3, 24)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == ("lora_" in name), name
    summary = trainable_parameters_summary(model)
    assert summary.trainable == 2 * (24 + 16) + 2 * (16 + 4)
    assert summary.total == summary.trainable + 24 * 16 + 16 + 16 * 4 + 4
    assert "trainable%" in str(summary)


def test_embedding_lora_follows_peft_conventions():
    torch.manual_seed(0)
    base = nn.Embedding(50, 12, padding_idx=0)
    ids = torch.randint(0, 50, (2, 9))
    expected = base(ids)
    layer = LoRAEmbedding(base, r=4, alpha=8)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0 and layer.lora_embedding_B.std() > 0.5
    assert torch.equal(layer(ids), expected)
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    a, b = layer.lora_embedding_A, layer.lora_embedding_B
    manual = base.weight[ids] + (a.T[ids] @ b.T) * 2.0
    torch.testing.assert_close(layer(ids), manual, atol=1e-5, rtol=1e-5)
    adapted = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), adapted, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight[ids], expected, atol=1e-5, rtol=1e-5)


def test_quantized_base_is_wrapped_and_merged_into_a_dense_linear():
    torch.manual_seed(0)
    model = nn.Sequential(FakeQuantLinear(nn.Linear(16, 16)), nn.GELU(), FakeQuantLinear(nn.Linear(16, 8)))
    apply_lora(model, r=4, init_lora_weights=False)  # "all-linear" recognises the duck-typed quantized linears
    assert all(isinstance(model[i], LoRALinear) for i in (0, 2))
    x = torch.randn(5, 16)
    adapted = model(x)
    with pytest.raises(ConfigError, match=r"FakeQuantLinear base; use merge_and_unload"):
        model[0].merge()
    summary = trainable_parameters_summary(model)
    assert summary.total == summary.trainable + 16 * 16 + 16 + 16 * 8 + 8  # logical, not packed, weights
    merge_and_unload(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_unload_restores_the_original_modules(base):
    model = nn.Sequential(base)
    apply_lora(model, r=2, init_lora_weights=False)
    model[0].merge()
    unload(model)
    assert model[0] is base
    with adapters_disabled(model):  # no adapters left: a no-op
        pass


def test_invalid_rank_is_rejected(base):
    with pytest.raises(ConfigError, match="rank"):
        LoRALinear(base, r=0)
    with pytest.raises(ConfigError, match="linear-like"):
        LoRALinear(nn.ReLU(), r=2)


def test_qlora_on_hayai_nf4_linear():
    nf4 = pytest.importorskip("hayai.quant.nf4")
    torch.manual_seed(0)
    model = nn.Sequential(nf4.NF4Linear.from_linear(nn.Linear(64, 32)), nn.ReLU())
    apply_lora(model, r=4, init_lora_weights=False)
    layer = model[0]
    x = torch.randn(3, 64, requires_grad=True)
    dequantized = layer.base_layer.dequantize_weight(torch.float32)  # [out, in]
    expected = x @ dequantized.T + layer.base_layer.bias + layer.scaling * (
        x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    )
    out = model[0](x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None
    merge_and_unload(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0](x), expected, atol=1e-4, rtol=1e-4)
