"""(IA)³: infused adapter by inhibiting and amplifying inner activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS
2022 (arXiv:2205.05638), the T-Few recipe. A learned vector ℓ, initialised to ones, rescales activations
element-wise:

    attention k/v projections (scale the OUTPUT, ℓ: [out]):    y = (W x + b) ⊙ ℓ
    feed-forward down projection (scale the INPUT, ℓ: [in]):   y = W (x ⊙ ℓ) + b

Scaling the input of `down_proj` is scaling the FFN intermediate activation, the paper's ℓ_ff, in an
architecture-neutral way (PEFT's semantics). Merging is a row scale (output: W ← diag(ℓ) W, b ← ℓ ⊙ b) or a
column scale (input: W ← W diag(ℓ)) of the weight. Unmerging divides by ℓ, so it is exact only up to fp
rounding and is impossible when some ℓ_i = 0.

The parameter is stored as PEFT stores it: `ia3_l` of shape [out, 1] (output scaling) or [1, in] (input
scaling).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft.base_layers import dense_linear, dense_weight, freeze, is_linear_like, module_device


class IA3Linear(nn.Module):
    """A frozen linear-like base whose output (default) or input (`feedforward=True`) is scaled by `ia3_l`."""

    def __init__(
        self,
        base: nn.Module,
        feedforward: bool = False,
        *,
        init_ia3_weights: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise ConfigError(f"IA3Linear needs a linear-like base module, got {type(base).__name__}")
        self.base_layer = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        factory = {"device": module_device(base), "dtype": dtype or torch.float32}
        self.ia3_l = nn.Parameter(torch.randn(shape, **factory))
        if init_ia3_weights:
            nn.init.ones_(self.ia3_l)
        self.merged = False
        self.active = True
        freeze(base)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()  # [in] or [out]
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # [..., in] -> [..., out]
        result = self.base_layer(x)  # [..., out]
        return (result * scale).to(result.dtype)

    def _scaled(self, weight: torch.Tensor, bias: torch.Tensor | None, inverse: bool) -> tuple:
        """(W, b) scaled by ℓ (or by 1/ℓ), computed in fp32 and returned in the original dtypes."""
        scale = self.ia3_l.detach().float().to(weight.device)  # [out, 1] or [1, in]
        if inverse:
            if bool((scale == 0).any()):
                raise ConfigError("cannot unmerge an (IA)³ vector that has zero entries")
            scale = 1.0 / scale
        new_weight = (weight.float() * scale).to(weight.dtype)
        if bias is not None and not self.is_feedforward:
            bias = (bias.float() * scale.flatten()).to(bias.dtype)
        return new_weight, bias

    def merge(self) -> None:
        """Scale the base weight (and bias, for output scaling) by ℓ in place; needs an nn.Linear base."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise ConfigError(
                f"cannot merge (IA)³ in place into a {type(self.base_layer).__name__} base; use "
                "merge_and_unload(model), which dequantizes and returns a plain nn.Linear"
            )
        self._rescale(inverse=False)
        self.merged = True

    def unmerge(self) -> None:
        """Divide the merged scale back out (exact up to rounding; impossible if some ℓ_i = 0)."""
        if not self.merged:
            return
        self._rescale(inverse=True)
        self.merged = False

    def _rescale(self, inverse: bool) -> None:
        base = self.base_layer
        with torch.no_grad():
            weight, bias = self._scaled(base.weight, base.bias, inverse)
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base layer alone inside the block (unmerging first, and merging again after, if merged)."""
        was_merged, was_active = self.merged, self.active
        self.unmerge()
        self.active = False
        try:
            yield
        finally:
            self.active = was_active
            if was_merged:
                self.merge()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def merged_module(self) -> nn.Linear:
        """A new dense nn.Linear equal to this layer (base dequantized if needed; self is unchanged)."""
        weight, bias = dense_weight(self.base_layer), self.base_layer.bias
        if not self.merged:
            weight, bias = self._scaled(weight, None if bias is None else bias.detach(), inverse=False)
        return dense_linear(weight, bias)

    def extra_repr(self) -> str:
        return f"scales={'input' if self.is_feedforward else 'output'}, merged={self.merged}"
