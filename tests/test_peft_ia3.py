"""(IA)³ layers: identity at init, output vs input scaling, merge/unmerge (with bias), quantized bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft import IA3Linear, apply_ia3, merge_and_unload


class FakeQuantLinear(nn.Module):
    """A QuantizedLinear stand-in (int8 per-row absmax), following hayai.quant's duck-typed contract."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qweight.float() * self.scale).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize_weight(x.dtype), self.bias)


def randomized(layer: IA3Linear, seed: int = 0) -> IA3Linear:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape, generator=generator))
    return layer


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(20, 12, bias=True)


@pytest.mark.parametrize("feedforward", [False, True])
def test_ones_leave_outputs_unchanged(base, feedforward):
    x = torch.randn(4, 20)
    layer = IA3Linear(base, feedforward=feedforward)
    assert layer.ia3_l.shape == ((1, 20) if feedforward else (12, 1))
    assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l))
    assert torch.equal(layer(x), base(x))


def test_output_scaling_for_attention_and_input_scaling_for_feedforward(base):
    x = torch.randn(4, 20)
    out_layer = randomized(IA3Linear(base, feedforward=False))
    torch.testing.assert_close(out_layer(x), (x @ base.weight.T + base.bias) * out_layer.ia3_l.flatten())
    in_layer = randomized(IA3Linear(base, feedforward=True))
    torch.testing.assert_close(in_layer(x), (x * in_layer.ia3_l.flatten()) @ base.weight.T + base.bias)


@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_matches_forward_including_bias_and_unmerge_restores(base, feedforward):
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = randomized(IA3Linear(base, feedforward=feedforward))
    x = torch.randn(6, 20)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    if not feedforward:  # output scaling scales the bias too
        torch.testing.assert_close(base.bias, bias * layer.ia3_l.flatten())
    else:
        assert torch.equal(base.bias, bias)
    layer.unmerge()
    # (W·ℓ)/ℓ in fp32: within a couple of ulps, not bit for bit
    torch.testing.assert_close(base.weight, weight, atol=0, rtol=3e-7)
    torch.testing.assert_close(base.bias, bias, atol=0, rtol=3e-7)


def test_unmerge_with_a_zero_entry_is_refused(base):
    layer = IA3Linear(base)
    with torch.no_grad():
        layer.ia3_l[3] = 0.0
    layer.merge()
    with pytest.raises(ConfigError, match="zero"):
        layer.unmerge()


def test_apply_ia3_feedforward_semantics_and_quantized_merge():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k_proj = nn.Linear(8, 8)
            self.up_proj = nn.Linear(8, 16)
            self.down_proj = FakeQuantLinear(nn.Linear(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(torch.relu(self.up_proj(self.k_proj(x))))

    model = nn.Sequential(Block())
    apply_ia3(model, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    block = model[0]
    assert not block.k_proj.is_feedforward and block.down_proj.is_feedforward
    assert isinstance(block.up_proj, nn.Linear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.k_proj.ia3_l", "0.down_proj.ia3_l",
    }
    for layer in (block.k_proj, block.down_proj):
        randomized(layer)
    x = torch.randn(3, 8)
    expected = model(x)
    merge_and_unload(model)
    assert type(block.down_proj) is nn.Linear and type(block.k_proj) is nn.Linear
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ConfigError, match="subset"):
        apply_ia3(nn.Sequential(nn.Linear(2, 2)), target_modules=["0"], feedforward_modules=["1"])
