"""What an adapter may wrap: "linear-like" and embedding base modules, recognised by duck typing.

A base module is *linear-like* when it computes y = x Wᵀ + b for some W of shape [out, in]: either an
`nn.Linear`, or any module exposing `in_features`, `out_features`, `bias` and `dequantize_weight(dtype=None)
-> Tensor[out, in]` (the contract of `hayai.quant.base.QuantizedLinear`, e.g. the NF4 base of QLoRA). Adapters
never import the quant package: the attributes are the interface.

Only a plain `nn.Linear` (or `nn.Embedding`) can have an adapter merged *in place*; a quantized base is merged
by dequantizing, adding the delta and building a new dense `nn.Linear` (see `dense_linear`).
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized_linear(module: nn.Module) -> bool:
    """A duck-typed quantized linear: in/out features and `dequantize_weight`, but not an `nn.Linear`."""
    return (
        not isinstance(module, nn.Linear)
        and callable(getattr(module, "dequantize_weight", None))
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


def is_linear_like(module: nn.Module) -> bool:
    """True for `nn.Linear` and for modules following the `QuantizedLinear` contract."""
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def module_device(module: nn.Module) -> torch.device:
    """The device of the first parameter or buffer of `module` (CPU for a module holding no tensors)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a linear-like module as a dense tensor (dequantized for a quantized base)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.dequantize_weight()


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new plain `nn.Linear` holding `weight` [out, in] and `bias` [out] (copied, not shared)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(weight.dtype))
    return layer


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of `module` (the base of an adapter is never trained)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
