"""LoRA: low-rank adaptation of a frozen linear or embedding layer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv:2106.09685);
rsLoRA scaling from Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"
(arXiv:2312.03732).

Linear (A: [r, in], B: [out, r]):

    y = base(x) + s · B(A(dropout(x))),      s = α / r      (rsLoRA: s = α / √r)

A starts as kaiming_uniform(a=√5) (the `nn.Linear` default), B as zeros, so a fresh adapter is the identity.
Dropout acts on the adapter input only. Merging folds the update into the base weight, W ← W + s·B·A, and
unmerging subtracts the same delta. The delta is computed in fp32 and rounded once into the base dtype, so
merge followed by unmerge restores W to within one rounding step of the base dtype (not bit for bit:
floating-point addition has no inverse).

Embedding (PEFT's convention; A: [r, num_embeddings] zeros, B: [embedding_dim, r] ~ N(0, 1)):

    y = E[x] + s · (A[:, x])ᵀ Bᵀ,             merge: E ← E + s·(B·A)ᵀ

Parameter names and shapes follow PEFT (`lora_A.weight`, `lora_B.weight`, `lora_embedding_A`,
`lora_embedding_B`), so a wrapped module's state-dict keys are PEFT's saved keys. The base may be any
linear-like module, including a quantized one (QLoRA); such a base is never changed in place:
`merged_module()` dequantizes it and returns a dense `nn.Linear`. Re-quantizing that result rounds the merged
weights again (PEFT issue #2321).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hayai.errors import ConfigError
from hayai.peft.base_layers import dense_linear, dense_weight, freeze, is_linear_like, module_device


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The LoRA output scale: α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class _LoRALayer(nn.Module):
    """State shared by the LoRA wrappers: rank, scale, merged/active state and the frozen base."""

    def __init__(self, base: nn.Module, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.base_layer = base
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False
        self.active = True
        freeze(base)

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_mergeable(self, base_type: type) -> None:
        if not isinstance(self.base_layer, base_type):
            raise ConfigError(
                f"cannot merge LoRA in place into a {type(self.base_layer).__name__} base; use "
                "merge_and_unload(model) (or merged_module()), which dequantizes the base and returns "
                "a plain "
                "nn.Linear. Re-quantizing the merged weights rounds them again (PEFT issue #2321)."
            )

    def merge(self) -> None:
        """Fold the update into the base weight (W ← W + ΔW); forward then runs the base alone."""
        if self.merged:
            return
        self._check_mergeable(nn.Embedding if isinstance(self, LoRAEmbedding) else nn.Linear)
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update merged by `merge()` (exact up to one rounding of the base dtype)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

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
        """The trainable adapter tensors, by their PEFT key suffix."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("base_layer.")}

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code reading `.weight` of a projection keeps working)."""
        return self.base_layer.weight


class LoRALinear(_LoRALayer):
    """y = base(x) + s · B(A(dropout(x))) around a frozen linear-like `base` (nn.Linear or a quantized
    linear).

    `dtype` is the adapter dtype (default fp32), independent of the base dtype (e.g. a bf16 or NF4 base).
    `init_lora_weights`: True (A kaiming-uniform, B zeros), "gaussian" (A ~ N(0, 1/r), B zeros) or False (both
    keep nn.Linear's random init, so the adapter is not the identity; useful for tests).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        init_lora_weights: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not is_linear_like(base):
            raise ConfigError(f"LoRALinear needs a linear-like base module, got {type(base).__name__}")
        super().__init__(base, r, alpha, use_rslora)
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        factory = {"device": module_device(base), "dtype": dtype or torch.float32}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # weight [r, in]
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # weight [out, r]
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights is False:
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ConfigError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
            )
        nn.init.zeros_(self.lora_B.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in fp32, shape [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., out]
        if self.merged or not self.active:
            return result
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(x)) * self.scaling  # [..., r] -> [..., out]
        return (result + update).to(result.dtype)

    def merged_module(self) -> nn.Linear:
        """A new dense nn.Linear computing base + update (base dequantized if needed; self is unchanged)."""
        weight = dense_weight(self.base_layer)  # [out, in]
        if not self.merged:
            weight = (weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype)
        return dense_linear(weight, self.base_layer.bias)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoRAEmbedding(_LoRALayer):
    """y = E[x] + s · (A[:, x])ᵀ Bᵀ around a frozen nn.Embedding (PEFT init: A zeros, B ~ N(0, 1)).

    PEFT applies no dropout to embedding adapters, and neither does this layer.
    """

    def __init__(
        self,
        base: nn.Embedding,
        r: int = 8,
        alpha: float = 8.0,
        use_rslora: bool = False,
        *,
        init_lora_weights: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(base, nn.Embedding):
            raise ConfigError(f"LoRAEmbedding needs an nn.Embedding base, got {type(base).__name__}")
        super().__init__(base, r, alpha, use_rslora)
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        factory = {"device": base.weight.device, "dtype": dtype or torch.float32}
        self.lora_embedding_A = nn.Parameter(torch.randn(r, self.num_embeddings, **factory))  # [r, vocab]
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, r, **factory))  # [dim, r]
        if init_lora_weights is not False:
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔE = s·(B·A)ᵀ in fp32, shape [num_embeddings, embedding_dim]."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., dim]
        if self.merged or not self.active:
            return result
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.base_layer.padding_idx)  # [..., r]
        update = (after_a @ self.lora_embedding_B.T) * self.scaling  # [..., dim]
        return (result + update).to(result.dtype)

    def merged_module(self) -> nn.Embedding:
        """A new nn.Embedding holding E + ΔE (self is unchanged)."""
        base = self.base_layer
        weight = base.weight.detach()
        if not self.merged:
            weight = (weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype)
        merged = nn.Embedding(
            base.num_embeddings,
            base.embedding_dim,
            padding_idx=base.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            merged.weight.copy_(weight)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
