"""Inference-time fusion of projections that read the same input: q/k/v into one matmul, gate/up into one.

    [q | k | v] = x · [W_q; W_k; W_v]ᵀ          (one [H·D + 2·H_kv·D, d] weight instead of three)
    [g | u]     = x · [W_gate; W_up]ᵀ           (one [2f, d] weight instead of two)

Row-wise weight formats concatenate exactly: a plain `nn.Linear` stacks its weight rows; int8 (one scale per
output row) stacks codes and scales; int4 (groups along the input dimension, per output row) stacks codes and
the per-group statistics along the output dimension. So the fused layer computes the same products, with 4
matmuls per layer instead of 7: fewer kernel launches and Python calls per token, and wider matmuls that split
better across threads. RoPE is then applied to q and k in one call. gpt-fast's `wqkv` and vLLM's
`QKVParallelLinear` do the same.

The transform replaces `self_attn` by `FusedQKVAttention` and `mlp` by `FusedMLP` (module replacement; the
model's code is untouched). The fused modules no longer have `q_proj`/`gate_proj` names, so fuse after loading
weights and adapters, for inference only. Layers whose projections are wrapped (LoRA) or mix formats are left
as they are, with the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hayai.models.llama import MLP, Attention, CausalLM
from hayai.models.rope import apply_rotary
from hayai.quant.int4 import Int4Linear
from hayai.quant.int8 import Int8Linear


class FusedQKVAttention(Attention):
    """`Attention` whose q, k and v come from one matmul (`qkv_proj`)."""

    def project(self, x, rope):
        b, t, _ = x.shape
        h, h_kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(b, t, h + 2 * h_kv, self.head_dim).transpose(1, 2)  # [B, H+2Hkv, T, D]
        cos, sin = rope
        qk = apply_rotary(qkv[:, : h + h_kv], cos, sin)  # [B, H+Hkv, T, D]
        return qk[:, :h], qk[:, h:], qkv[:, h + h_kv:]


class FusedMLP(MLP):
    """`MLP` whose gate and up projections are one matmul (`gate_up_proj`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [..., f] each
        return self.down_proj(F.silu(gate) * up)


def _cat_bias(layers: list[nn.Module]) -> nn.Parameter | None:
    biases = [layer.bias for layer in layers if layer.bias is not None]
    if not biases:
        return None
    parts = [layer.bias.detach() if layer.bias is not None else biases[0].new_zeros(layer.out_features)
             for layer in layers]
    return nn.Parameter(torch.cat(parts), requires_grad=False)


def fuse_linears(layers: list[nn.Module]) -> nn.Module | str:
    """One layer computing the concatenated outputs of `layers` (same input), or the reason it cannot."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        return f"mixed layer types {sorted(k.__name__ for k in kinds)}"
    kind = kinds.pop()
    if kind not in (nn.Linear, Int8Linear, Int4Linear):
        return f"{kind.__name__} layers are not fused (only nn.Linear, Int8Linear and Int4Linear)"
    in_features = layers[0].in_features
    if any(layer.in_features != in_features for layer in layers):
        return "different input sizes"
    out_features = sum(layer.out_features for layer in layers)
    if kind is nn.Linear:
        fused: nn.Module = nn.Linear(in_features, out_features, bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
    elif kind is Int8Linear:
        fused = Int8Linear(in_features, out_features, bias=False, dtype=layers[0].scales.dtype, device="meta")
        fused.qweight = torch.cat([layer.qweight for layer in layers])  # [N, K] int8 codes, rows stacked
        fused.scales = torch.cat([layer.scales for layer in layers])  # [N]
    else:  # Int4Linear
        group = layers[0].group_size
        if any(layer.group_size != group for layer in layers):
            return "different int4 group sizes"
        fused = Int4Linear(in_features, out_features, bias=False, group_size=group,
                           dtype=layers[0].scales_and_zeros.dtype, device="meta")
        fused.qweight = torch.cat([layer.portable_codes() for layer in layers])  # [N, Kp/2]
        fused.scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)  # [K/G, N, 2]
    fused.bias = _cat_bias(layers)
    return fused


def _fused_attention(attn: Attention, qkv: nn.Module) -> FusedQKVAttention:
    fused = FusedQKVAttention.__new__(FusedQKVAttention)
    nn.Module.__init__(fused)
    for name in ("layer_index", "num_heads", "num_kv_heads", "head_dim", "scale"):
        setattr(fused, name, getattr(attn, name))
    fused.qkv_proj, fused.o_proj, fused.kernel = qkv, attn.o_proj, attn.kernel
    return fused.train(attn.training)


def _fused_mlp(mlp: MLP, gate_up: nn.Module) -> FusedMLP:
    fused = FusedMLP.__new__(FusedMLP)
    nn.Module.__init__(fused)
    fused.gate_up_proj, fused.down_proj = gate_up, mlp.down_proj
    return fused.train(mlp.training)


@dataclass
class FusionSummary:
    attention: int = 0  # layers whose q/k/v were fused
    mlp: int = 0  # layers whose gate/up were fused
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was left as it was


def fuse_projections(model: CausalLM) -> FusionSummary:
    """Fuse q/k/v and gate/up in every decoder layer of `model`, in place (see the module docstring)."""
    summary = FusionSummary()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if type(attn) is Attention:
            qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if isinstance(qkv, str):
                summary.skipped[f"model.layers.{i}.self_attn"] = qkv
            else:
                layer.self_attn = _fused_attention(attn, qkv)
                summary.attention += 1
        mlp = layer.mlp
        if type(mlp) is MLP:
            gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
            if isinstance(gate_up, str):
                summary.skipped[f"model.layers.{i}.mlp"] = gate_up
            else:
                layer.mlp = _fused_mlp(mlp, gate_up)
                summary.mlp += 1
    return summary
