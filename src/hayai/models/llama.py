"""A compact decoder-only transformer for the Llama family (Llama 1-3, Mistral, Qwen2, SmolLM).

Per block (pre-norm, Touvron et al. 2023, arXiv 2302.13971):

    h   = x + o_proj( attention( rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1) ) ),   n1 = RMSNorm(x)
    out = h + down_proj( silu(gate_proj(n2)) * up_proj(n2) ),                             n2 = RMSNorm(h)

RMSNorm(x) = w · x / sqrt(mean(x²) + eps) (Zhang & Sennrich 2019), computed in fp32. Attention is grouped-query
(Ainslie et al. 2023): H query heads share H_kv key/value heads. Module names match Hugging Face's
`LlamaForCausalLM`, so HF checkpoints load by name and PEFT adapters address the same modules.

The attention computation itself is a strategy object, `self_attn.kernel` (an `AttentionKernel`); replacing that
module (blocked FlashAttention, Triton, LongLoRA's S²-Attn) changes how attention runs without touching the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayai.attention.sdpa import SDPAttention
from hayai.models.config import ModelConfig
from hayai.models.kv_cache import KVCache, WritePlan
from hayai.models.rope import RotaryEmbedding, apply_rotary
from hayai.quant.embedding import QuantizedEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.o_bias)
        self.kernel = SDPAttention()

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> q [B, H, T, D], k and v [B, Hkv, T, D], with RoPE applied to q and k (a subclass may
        compute them differently, e.g. `hayai.decode.fused` with one fused q/k/v matmul)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None,
                plan: WritePlan | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # [B, Hkv, S, D]
        if mask is not None:
            causal = False
        elif cache is not None:
            causal = plan.causal and t > 1  # one new token per row sees every visible slot
            mask = plan.mask
        else:
            causal = True
        out = self.kernel(q, k, v, causal=causal, mask=mask, scale=self.scale)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, plan, mask):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, plan, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, the decoder stack and the final norm (HF's `LlamaModel`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> hidden states [B, T, hidden] after the final norm.

        With a cache, the new tokens' keys/values are appended after each row's cached length and attention
        covers the cache. `positions` [B, T] are the RoPE positions (default: the cache slots, or 0..T-1
        without a cache). `mask` (bool, True = may attend, broadcastable to [B, 1, T, S] where S is the cached
        extent, or T without a cache) replaces the default causal pattern, e.g. block-diagonal for packed
        sequences or demonstrations encoded in parallel.
        """
        b, t = input_ids.shape
        plan = None
        if cache is not None:
            plan = cache.plan(t)
            positions = plan.positions if positions is None else positions
        elif positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed_tokens(input_ids)  # [B, T, hidden]
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, cache, plan, mask)
        if cache is not None:
            cache.commit()
        return self.norm(x)


class CausalLM(nn.Module):
    """The native model: `model` (backbone) + `lm_head`. Call it for logits, or use `hidden` + `logits`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] for every position."""
        return self.lm_head(self.model(input_ids, positions, cache, mask))

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, hidden]; pair with `logits` to project only the positions you need."""
        return self.model(input_ids, positions, cache, mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # the embedding may be quantized (no .weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache.for_model(self.config, batch_size, max_length, self.dtype, self.device)


def weight_bytes_read_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding table, of which a
    step reads a single row (unless the table doubles as the LM head)."""
    embedding_modules = [m for m in model.modules() if isinstance(m, (nn.Embedding, QuantizedEmbedding))]
    head = getattr(model, "lm_head", None)
    head_tensors = {id(t) for t in head.parameters()} | {id(t) for t in head.buffers()} if head else set()
    skip = {id(t) for m in embedding_modules for t in (*m.parameters(), *m.buffers()) if id(t) not in head_tensors}
    seen: set[int] = set()
    total = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if id(t) in seen or id(t) in skip or name.endswith("inv_freq"):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
