"""Floating-point operations of the native Llama-family model, forward and backward, from its config.

Counted: every matrix product, at 2 FLOPs per multiply-add (Kaplan et al. 2020, arXiv 2001.08361, §2.1;
the PaLM appendix B convention). Not counted: norms, RoPE, softmax, SiLU, residual adds, embedding lookups
and the loss: O(d) per token against O(d²) for the products, under 1% for any real config.

Notation: d = hidden size, H / H_kv = query / key-value heads, h = head dim, f = FFN size, V = vocabulary,
L = layers, r = LoRA rank.

Forward, per token and layer (the projections):

    q: 2·d·H·h    k, v: 2·d·H_kv·h each    o: 2·H·h·d    gate, up: 2·d·f each    down: 2·f·d

Attention products, per query token that sees n keys (QKᵀ scores, then probabilities × V): 4·H·h·n.
With T new tokens after P cached ones, causal attention visits Σ_{i=1..T} (P + i) = T·P + T(T+1)/2 keys
(the causal half: masked scores are not work; this is what FlashAttention's block skipping saves, and what
`torch.utils.flop_counter`, which does not know about masks, overcounts); `causal=False` counts T·(P + T).

LM head: 2·d·V per position whose logits are computed (every position in training; only the last one in
prefill and one per step in decoding).

Backward. For Y = X·W the backward computes dX = dY·Wᵀ and dW = Xᵀ·dY, each costing one forward product, so
backward = 2 × forward when everything trains. A frozen weight skips dW (1 × forward for that product); an input
that needs no gradient skips dX: with frozen embeddings nothing below layer 0 trains, so layer 0's q/k/v
products need no input gradient (autograd does not compute it). The attention products have two activation
operands (dQ and dK for the scores, dP and dV for the values): 2 × forward always. LoRA (Hu et al. 2021, arXiv
2106.09685) adds x·A then ·B on each target, 2·r·(d_in + d_out) per token forward and 2 × that backward (both
A and B train; layer 0's q/k/v skip dX as above). Activation checkpointing (Chen et al. 2016) reruns the
blocks' forward during backward; `recompute=True` adds it.

`measure_flops(fn)` counts what PyTorch actually executes (`torch.utils.flop_counter.FlopCounterMode`), which
the tests use as the oracle for these formulas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from hayai.errors import ConfigError
from hayai.models.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")  # products whose input is the block input


@dataclass(frozen=True)
class FlopCount:
    """FLOPs by part; `total` is their sum."""

    linear: float = 0.0  # q/k/v/o and MLP projections of every layer
    attention: float = 0.0  # QKᵀ and probabilities·V
    lm_head: float = 0.0
    adapters: float = 0.0  # LoRA products

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.lm_head + self.adapters

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> FlopCount:
        return FlopCount(*(getattr(self, f.name) * factor for f in fields(self)))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


@dataclass(frozen=True)
class LoRAShape:
    """Where LoRA sits: its rank and the projection names it wraps (PEFT "all-linear" = all seven)."""

    rank: int
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown:
            raise ConfigError(f"LoRA targets {unknown} are not projections of this model ({', '.join(PROJECTIONS)})")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of one layer."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * h, config.num_key_value_heads * h
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def _product(shape: tuple[int, int]) -> float:
    return 2.0 * shape[0] * shape[1]


def linear_flops_per_token(config: ModelConfig, names: Iterable[str] = PROJECTIONS) -> float:
    """Forward FLOPs of the named projections for one token, summed over all layers."""
    shapes = projection_shapes(config)
    return config.num_hidden_layers * sum(_product(shapes[n]) for n in names)


def lora_flops_per_token(config: ModelConfig, lora: LoRAShape, names: Iterable[str] | None = None) -> float:
    """Forward FLOPs of the LoRA products (x·A, then ·B) for one token, over all layers."""
    shapes = projection_shapes(config)
    chosen = lora.targets if names is None else [n for n in lora.targets if n in set(names)]
    return config.num_hidden_layers * sum(2.0 * lora.rank * (shapes[n][0] + shapes[n][1]) for n in chosen)


def attention_key_visits(new_tokens: int, past_tokens: int = 0, causal: bool = True) -> int:
    """Query-key pairs scored for `new_tokens` queries after `past_tokens` cached keys."""
    if new_tokens < 0 or past_tokens < 0:
        raise ConfigError(f"token counts must be >= 0, got {new_tokens} new and {past_tokens} past")
    if causal:
        return new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2
    return new_tokens * (past_tokens + new_tokens)


def attention_flops(config: ModelConfig, new_tokens: int, past_tokens: int = 0, causal: bool = True) -> float:
    """Forward FLOPs of QKᵀ and P·V over all layers for one sequence."""
    per_pair = 4.0 * config.num_attention_heads * config.head_dim
    return config.num_hidden_layers * per_pair * attention_key_visits(new_tokens, past_tokens, causal)


def forward_flops(config: ModelConfig, new_tokens: int, *, batch: int = 1, past_tokens: int = 0,
                  logits_tokens: int | None = None, causal: bool = True, lora: LoRAShape | None = None) -> FlopCount:
    """One forward pass over `new_tokens` tokens per sequence (after `past_tokens` cached), `batch` sequences.

    `logits_tokens`: positions per sequence that go through the LM head (default: all `new_tokens`)."""
    logits = new_tokens if logits_tokens is None else logits_tokens
    per_seq = FlopCount(
        linear=new_tokens * linear_flops_per_token(config),
        attention=attention_flops(config, new_tokens, past_tokens, causal),
        lm_head=logits * 2.0 * config.hidden_size * config.vocab_size,
        adapters=new_tokens * lora_flops_per_token(config, lora) if lora else 0.0,
    )
    return per_seq.scaled(batch)


def backward_flops(config: ModelConfig, tokens: int, *, batch: int = 1, causal: bool = True,
                   train: str = "all", lora: LoRAShape | None = None, recompute: bool = False) -> FlopCount:
    """Backward pass of a training step over `batch` sequences of `tokens` tokens (loss on every position).

    `train`: "all" (full fine-tuning: every weight and the embeddings train) or "adapters" (base weights and
    embeddings frozen; LoRA matrices given by `lora`, or parameter-free adapters like (IA)³ when None)."""
    if train not in ("all", "adapters"):
        raise ConfigError(f"train must be 'all' or 'adapters', got {train!r}")
    shapes = projection_shapes(config)
    all_linear = tokens * linear_flops_per_token(config)
    first_layer_inputs = tokens * sum(_product(shapes[n]) for n in ATTENTION_INPUTS)  # one layer
    head = tokens * 2.0 * config.hidden_size * config.vocab_size
    if train == "all":
        linear, lm_head = 2 * all_linear, 2 * head  # dX and dW everywhere (embeddings train: layer 0 needs dX)
        adapters = 0.0
    else:
        linear, lm_head = all_linear - first_layer_inputs, head  # dX only, none for layer 0's q/k/v
        adapters = 0.0
        if lora is not None:
            lora_fwd = tokens * lora_flops_per_token(config, lora)
            first_a = tokens * 2.0 * lora.rank * sum(shapes[n][0] for n in lora.targets if n in ATTENTION_INPUTS)
            adapters = 2 * lora_fwd - first_a  # layer 0's x·A needs dA but no dX
    count = FlopCount(linear=linear, attention=2 * attention_flops(config, tokens, 0, causal), lm_head=lm_head,
                      adapters=adapters)
    if recompute:
        blocks = forward_flops(config, tokens, causal=causal, lora=lora, logits_tokens=0)
        count = count + blocks
    return count.scaled(batch)


def training_step_flops(config: ModelConfig, tokens: int, *, batch: int = 1, causal: bool = True,
                        train: str = "all", lora: LoRAShape | None = None,
                        recompute: bool = False) -> tuple[FlopCount, FlopCount]:
    """(forward, backward) FLOPs of one training step on `batch` sequences of `tokens` tokens."""
    forward = forward_flops(config, tokens, batch=batch, causal=causal, lora=lora)
    return forward, backward_flops(config, tokens, batch=batch, causal=causal, train=train, lora=lora,
                                   recompute=recompute)


def generation_flops(config: ModelConfig, prompt_tokens: int, new_tokens: int) -> FlopCount:
    """Greedy generation of `new_tokens` after a prompt, one sequence: a prefill pass (logits for the last
    position only; it yields the first new token) then one single-token pass per further token."""
    if new_tokens < 1:
        return forward_flops(config, prompt_tokens, logits_tokens=1)
    total = forward_flops(config, prompt_tokens, logits_tokens=1)
    for i in range(1, new_tokens):
        total = total + forward_flops(config, 1, past_tokens=prompt_tokens + i - 1)
    return total


def measure_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` under `torch.utils.flop_counter.FlopCounterMode`: (its value, FLOPs PyTorch counted).

    The counter sees matrix products (mm, addmm, bmm, registered attention kernels) as executed, without
    knowledge of masks, so causal attention is counted in full."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        value = fn()
    return value, int(counter.get_total_flops())
