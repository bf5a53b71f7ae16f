"""hayai.bench.flops: hand-computed counts for a tiny config, and PyTorch's FLOP counter as the oracle."""

from __future__ import annotations

import pytest
import torch
from tinymodels import hf_llama, native_from

from hayai.attention.sdpa import AttentionKernel, repeat_kv
from hayai.bench.flops import (
    FlopCount,
    LoRAShape,
    attention_key_visits,
    backward_flops,
    forward_flops,
    generation_flops,
    measure_flops,
    training_step_flops,
)
from hayai.errors import ConfigError
from hayai.models.config import ModelConfig

# d=8, f=16, H=2, H_kv=1, h=4, V=10, one layer. Per token: q 2·8·8=128, k 2·8·4=64, v 64, o 128,
# gate 2·8·16=256, up 256, down 256 -> 1152. Attention per (query, key) pair: 4·H·h = 32. LM head: 2·8·10 = 160.
TINY = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1)


def test_forward_by_hand():
    f = forward_flops(TINY, 3)
    assert (f.linear, f.attention, f.lm_head, f.adapters) == (3 * 1152, 6 * 32, 3 * 160, 0)  # causal: 1+2+3 pairs
    assert f.total == 4128
    assert forward_flops(TINY, 3, causal=False).attention == 9 * 32
    assert forward_flops(TINY, 3, batch=2).total == 2 * 4128
    decode = forward_flops(TINY, 1, past_tokens=3)  # one new token sees 3 cached keys and itself
    assert decode.total == 1152 + 4 * 32 + 160
    assert forward_flops(TINY, 3, logits_tokens=1).lm_head == 160


def test_backward_by_hand():
    full = backward_flops(TINY, 3)
    assert full.total == 2 * 4128  # dX and dW for every product
    frozen = backward_flops(TINY, 3, train="adapters")
    # frozen weights: dX only, and none for layer 0's q/k/v (nothing below them trains): 3·(1152 − 256)
    assert (frozen.linear, frozen.attention, frozen.lm_head) == (3 * 896, 2 * 192, 480)
    lora = LoRAShape(rank=2)
    # LoRA r=2 per token: 2·2·Σ(in+out) = 4·(16+12+12+16+24+24+24) = 512; backward 2x, less layer 0's q/k/v
    # x·A input gradients 2·2·(8+8+8) = 96 per token
    assert forward_flops(TINY, 3, lora=lora).adapters == 3 * 512
    assert backward_flops(TINY, 3, train="adapters", lora=lora).adapters == 2 * 3 * 512 - 3 * 96
    _fwd, bwd = training_step_flops(TINY, 3, train="all", recompute=True)
    assert bwd.total == 2 * 4128 + 3 * 1152 + 6 * 32  # checkpointing reruns the blocks, not the head


def test_generation_by_hand():
    g = generation_flops(TINY, prompt_tokens=2, new_tokens=3)
    prefill = 2 * 1152 + 3 * 32 + 160  # 2 prompt tokens (1+2 pairs), logits for the last only
    steps = (1152 + 3 * 32 + 160) + (1152 + 4 * 32 + 160)  # new tokens 2 and 3 see 3 and 4 keys
    assert g.total == prefill + steps
    assert attention_key_visits(4, 2) == 4 * 2 + 10 and attention_key_visits(4, 2, causal=False) == 24


def test_flop_count_arithmetic_and_validation():
    a = FlopCount(1, 2, 3, 4)
    assert (a + a).total == 20 and a.scaled(0.5).as_dict()["total"] == 5
    with pytest.raises(ConfigError):
        LoRAShape(rank=4, targets=("embed_tokens",))
    with pytest.raises(ConfigError):
        backward_flops(TINY, 3, train="some")


class MatmulAttention(AttentionKernel):
    """Attention as explicit matrix products, which the FLOP counter sees (SDPA's CPU kernel it may not)."""

    def forward(self, q, k, v, *, causal, mask=None, scale=None):
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, T, S]
        if causal:
            t, s = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(s - t), float("-inf"))
        return scores.softmax(-1) @ v


def _counted_model():
    model = native_from(hf_llama(num_hidden_layers=2))
    for layer in model.model.layers:
        layer.self_attn.kernel = MatmulAttention()
    return model, ModelConfig.from_hf_dict(hf_llama(num_hidden_layers=2).config.to_dict())


def test_forward_matches_pytorchs_flop_counter():
    model, config = _counted_model()
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        _, counted = measure_flops(lambda: model(ids))
    # the counter ignores the causal mask, so compare with the full square
    assert counted == forward_flops(config, 11, batch=2, causal=False).total


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_step_matches_pytorchs_flop_counter(method):
    from hayai.peft import apply_lora

    model, config = _counted_model()
    lora = None
    if method == "full":
        model.requires_grad_(True)
    else:
        lora = LoRAShape(rank=4)
        apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, 9))

    def step():
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    _, counted = measure_flops(step)
    fwd, bwd = training_step_flops(config, 9, batch=2, causal=False, lora=lora,
                                   train="all" if method == "full" else "adapters")
    assert counted == fwd.total + bwd.total
