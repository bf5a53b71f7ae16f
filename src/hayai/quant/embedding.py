"""Quantized input embeddings: an int8 or int4 row-quantized table, dequantized on lookup.

An embedding table ``E [V, D]`` is quantized row by row with the linear formats of this package:

- 8 bits: symmetric per row, ``Ê[v] = q[v] · s[v]`` (`hayai.quant.int8`), 8 bits + one scale per row;
- 4 bits: asymmetric in groups of ``G`` columns, ``Ê[v, k] = (q − 8) · scale + zero`` (`hayai.quant.int4`).

``forward(ids)`` gathers only the looked-up rows and dequantizes them, so the dense table never exists.

Tied embeddings (LM head sharing the input embedding's Parameter, as in SmolLM2): an LM head ``W [V, D]`` is
quantized per output row ``v``, which is exactly the per-row quantization of the embedding table. With int8
the embedding therefore reads the LM head's codes and scales directly (`QuantizedEmbedding.tied_to`): one copy.
An int4 LM head runs on a kernel layout that interleaves rows and cannot be gathered row by row, so the
embedding keeps its own portable copy of the same codes (`QuantizedEmbedding.from_int4_linear`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.quant import kernels
from hayai.quant.base import dtype_from_name, dtype_name, float_dtype_of, weight_for_quantization
from hayai.quant.int4 import (
    DEFAULT_GROUP_SIZE,
    MID,
    Int4Linear,
    check_group_size,
    dequantize_int4_groups,
    quantize_int4_groups,
)
from hayai.quant.int8 import Int8Linear, dequantize_int8_rows, quantize_int8_rows


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` replacement with an int8 or int4 row-quantized table (see the module docstring).

    The output dtype is the original weight's dtype (the dtype of the scales, which follows ``.to(dtype)``).
    """

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, bits: int = 8,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"QuantizedEmbedding bits must be 4 or 8, got {bits!r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.bits = bits
        self.group_size = check_group_size(group_size) if bits == 4 else group_size
        self._tied: tuple[Int8Linear] | None = None  # a plain tuple: not a submodule, so no duplicate state
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("scales", torch.ones(num_embeddings, dtype=dtype, device=device))
        else:
            padded = math.ceil(embedding_dim / group_size) * group_size
            self.register_buffer("qweight", torch.full((num_embeddings, padded // 2), MID * 0x11, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("scales_and_zeros", torch.zeros(padded // group_size, num_embeddings, 2,
                                                                 dtype=dtype, device=device))

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, bits: int = 8,
                       group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedEmbedding:
        """Quantize a float ``nn.Embedding`` row by row."""
        dtype = float_dtype_of(embedding.weight)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, bits=bits,
                    group_size=group_size, dtype=dtype, device="meta")
        weight = weight_for_quantization(embedding)
        if bits == 8:
            layer.qweight, layer.scales = quantize_int8_rows(weight, dtype)
        else:
            layer.qweight, layer.scales_and_zeros = quantize_int4_groups(weight, group_size, dtype)
        return layer

    @classmethod
    def tied_to(cls, head: Int8Linear, padding_idx: int | None = None) -> QuantizedEmbedding:
        """An embedding that reads its table from an int8 LM head (one shared copy of the codes)."""
        if not isinstance(head, Int8Linear):
            raise ConfigError(f"only an Int8Linear LM head can share its table, got {type(head).__name__}")
        layer = cls(head.out_features, head.in_features, padding_idx, bits=8, dtype=head.scales.dtype,
                    device="meta")
        del layer.qweight, layer.scales  # the table lives in the head
        layer._tied = (head,)
        return layer

    @classmethod
    def from_int4_linear(cls, head: Int4Linear, padding_idx: int | None = None) -> QuantizedEmbedding:
        """A copy of an int4 LM head's codes as an embedding table (same values, no re-quantization)."""
        layer = cls(head.out_features, head.in_features, padding_idx, bits=4, group_size=head.group_size,
                    dtype=head.scales_and_zeros.dtype, device="meta")
        layer.qweight = head.portable_codes().clone()
        layer.scales_and_zeros = head.scales_and_zeros.clone()
        return layer

    @property
    def tied_head(self) -> Int8Linear | None:
        """The LM head whose table this embedding reads, if tied."""
        return None if self._tied is None else self._tied[0]

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"kind": self.kind, "bits": self.bits, "dtype": dtype_name(self._scale_tensor().dtype)}
        if self.bits == 4:
            cfg["group_size"] = self.group_size
        return cfg

    @classmethod
    def from_config(cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, config: dict[str, Any],
                    device: torch.device | str | None = None) -> QuantizedEmbedding:
        return cls(num_embeddings, embedding_dim, padding_idx, bits=config["bits"],
                   group_size=config.get("group_size", 64), dtype=dtype_from_name(config["dtype"]), device=device)

    # -- lookup ---------------------------------------------------------------------------------------------
    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tied is not None:
            return self._tied[0].qweight, self._tied[0].scales
        return self.qweight, self._scale_tensor()

    def _scale_tensor(self) -> torch.Tensor:
        if self._tied is not None:
            return self._tied[0].scales
        return self.scales if self.bits == 8 else self.scales_and_zeros

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes, stats = self._table()
        if self.bits == 8:
            rows = codes[ids].float() * stats[ids].float().unsqueeze(-1)  # [..., D]
            return rows.to(stats.dtype)
        q = kernels.unpack_nibbles(codes[ids], torch.float32)  # [..., Dp]
        groups = stats.shape[0]
        sz = stats[:, ids].movedim(0, -2).float()  # [..., K/G, 2]
        rows = (q.unflatten(-1, (groups, -1)) - MID) * sz[..., :1] + sz[..., 1:]  # [..., K/G, G]
        return rows.flatten(-2)[..., : self.embedding_dim].to(stats.dtype)  # [..., D]

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole reconstructed table ``[V, D]``."""
        codes, stats = self._table()
        if self.bits == 8:
            return dequantize_int8_rows(codes, stats, dtype or stats.dtype)
        return dequantize_int4_groups(codes, stats, self.embedding_dim, dtype or stats.dtype)

    def extra_repr(self) -> str:
        tied = ", tied to the LM head" if self._tied is not None else ""
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}{tied}"
