"""The interface every quantized linear layer implements, and the backward pass they share.

A weight-only quantized linear computes ``y = x · Ŵᵀ + b`` where ``Ŵ = dequant(codes, statistics)`` is the
reconstructed weight; only the weight is quantized, activations stay in the compute dtype. Each format
(``Int8Linear``, ``Int4Linear``, ``NF4Linear``) subclasses `QuantizedLinear` and provides two methods:

- ``_matmul(x2d)``: ``[M, in] -> [M, out]`` in ``x2d``'s dtype, through a fused kernel where one exists;
- ``dequantize_weight(dtype)``: ``Ŵ`` as a dense ``[out, in]`` tensor.

The base class handles the rest: flattening ``[..., in]`` inputs, bias, autocast, and the backward pass. The
quantized weight is frozen, so backward only needs ``∂L/∂x = ∂L/∂y · Ŵ``; `_FrozenWeightMatmul` recomputes
``Ŵ`` in backward instead of saving it, so no dense copy of the weight stays alive between forward and
backward (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, §3: "we dequantize the storage data type to the
computation data type to perform the forward and backward pass").

Other layers rely on this interface (LoRA wraps these modules): ``in_features``, ``out_features``, ``bias``
(Parameter or None), ``forward``, ``dequantize_weight``. ``forward`` returns x's dtype, except that an fp32
input under ``torch.autocast`` is computed in the autocast dtype (as ``nn.Linear`` would be).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """JSON-friendly name of a floating dtype ('bfloat16')."""
    return DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of `dtype_name`; raises `hayai.errors.ConfigError` for unknown names."""
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        from hayai.errors import ConfigError

        raise ConfigError(f"quant config: unknown dtype {name!r}; expected one of {sorted(DTYPES_BY_NAME)}") from None


def float_dtype_of(tensor: torch.Tensor) -> torch.dtype:
    """The tensor's dtype if it is fp32/bf16/fp16, else fp32 (the dtype scales and biases are kept in)."""
    return tensor.dtype if tensor.dtype in DTYPE_NAMES else torch.float32


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (recursively), each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":
            total += tensor.numel() * tensor.element_size()
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


class _FrozenWeightMatmul(torch.autograd.Function):
    """``y = x · Ŵᵀ`` with ``∂L/∂x = ∂L/∂y · Ŵ``, re-dequantizing ``Ŵ`` in backward (nothing dense is saved)."""

    @staticmethod
    def forward(ctx: Any, x2d: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._matmul(x2d)  # [M, out]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        weight = ctx.layer.dequantize_weight(grad_out.dtype)  # [out, in], freed when backward returns
        return grad_out @ weight, None  # [M, in]


class QuantizedLinear(nn.Module):
    """Base class of weight-only quantized linear layers (see the module docstring for the contract).

    Subclasses set ``kind`` (the name used in quant configs), register their quantized buffers, and implement
    `_matmul`, `dequantize_weight`, `from_linear` and `config`. ``cls(in_features, out_features, bias,
    **config)`` must build an empty layer of the same format, so checkpoints load without re-quantizing.
    """

    kind: ClassVar[str] = ""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- what subclasses provide -------------------------------------------------------------------------
    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """``[M, in] -> [M, out]`` in ``x2d.dtype``, without bias."""
        raise NotImplementedError

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstructed weight ``Ŵ`` as a dense ``[out, in]`` tensor (default dtype: the original's)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild an empty layer of this format (with ``kind``)."""
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> QuantizedLinear:
        """Quantize a float ``nn.Linear``."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, in_features: int, out_features: int, bias: bool, config: dict[str, Any],
                    device: torch.device | str | None = None) -> QuantizedLinear:
        """An empty (all-zero) layer of this format, to be filled by ``load_state_dict``."""
        kwargs = {key: value for key, value in config.items() if key != "kind"}
        for key in ("dtype", "compute_dtype"):
            if kwargs.get(key) is not None:
                kwargs[key] = dtype_from_name(kwargs[key])
        return cls(in_features, out_features, bias, device=device, **kwargs)

    @classmethod
    def unsupported_reason(cls, linear: nn.Linear, **options: Any) -> str | None:
        """Why this format cannot (or should not) quantize ``linear``; None when it can."""
        return None

    # -- shared behaviour ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~200 times per token, so the common path (bf16 input, no grad) is kept lean; hot
        # tensors are read from _parameters/_buffers directly (nn.Module.__getattr__ costs ~1 µs per access).
        if x.dtype == torch.float32 and torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
            x = x.to(torch.get_autocast_dtype("cpu" if x.is_cpu else x.device.type))
        x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [M, in]
        if x2d.requires_grad and torch.is_grad_enabled():
            y = _FrozenWeightMatmul.apply(x2d, self)
        elif x2d.shape[0] == 0:
            y = x2d.new_zeros(0, self.out_features)
        else:
            y = self._matmul(x2d)  # [M, out]
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)  # [..., out]
        bias = self._parameters["bias"]
        if bias is not None:
            y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        return y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle: dequantize the whole weight in x's dtype, then ``F.linear``."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def quantized_bytes(self) -> int:
        """Bytes this layer holds (codes, statistics, bias)."""
        return module_bytes(self)

    def bits_per_weight(self) -> float:
        """Storage of the weight (codes and statistics, bias excluded) per weight element, in bits."""
        bias_bytes = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return 8.0 * (self.quantized_bytes() - bias_bytes) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "kind")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {options}")


def copy_bias(linear: nn.Module) -> nn.Parameter | None:
    """A detached copy of a layer's bias (keeping its ``requires_grad``), or None."""
    bias = getattr(linear, "bias", None)
    if bias is None:
        return None
    return nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


def weight_for_quantization(linear: nn.Module) -> torch.Tensor:
    """The float weight of a linear/embedding, detached, as fp32 (quantization math runs in fp32)."""
    weight = linear.weight
    if weight.device.type == "meta":
        from hayai.errors import ConfigError

        raise ConfigError(f"cannot quantize {type(linear).__name__}: its weight is on the meta device (no values)")
    return weight.detach().float()
