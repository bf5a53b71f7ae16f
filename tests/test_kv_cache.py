"""The static KV cache: cached decoding equals recomputation; rollback, ragged rows and prefix copies."""

from __future__ import annotations

import pytest
import torch
from tinymodels import VOCAB, hf_llama, native_from

from hayai.errors import ContextOverflowError
from hayai.models.kv_cache import KVCache


@pytest.fixture(scope="module")
def model():
    return native_from(hf_llama(num_hidden_layers=3))


def greedy_recompute(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy_cached(model, prompt: list[int], steps: int) -> list[int]:
    cache = model.new_cache(1, len(prompt) + steps)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache)[0, -1]
        for _ in range(steps):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache)[0, -1]
    return out


def test_cached_greedy_equals_recomputing_the_whole_sequence(model):
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    assert greedy_cached(model, prompt, 20) == greedy_recompute(model, prompt, 20)


def test_chunked_prefill_equals_one_pass(model):
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 30)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 13), (13, 14), (14, 30))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    assert cache.lengths == [30]


def test_rollback_then_rewrite_equals_a_fresh_cache(model):
    ids = torch.randint(0, VOCAB, (1, 20))
    other = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        model(ids, cache=cache)
        model(torch.randint(0, VOCAB, (1, 5)), cache=cache)  # a draft that gets rejected
        cache.truncate(20)
        rolled = model(other, cache=cache)
        fresh = model(torch.cat([ids, other], dim=1))[:, 20:]
    assert torch.allclose(rolled, fresh, atol=1e-5)


def test_ragged_batch_rows_decode_like_single_rows(model):
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 12, 8)]
    width = max(map(len, prompts))
    padded = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    with torch.no_grad():
        cache = model.new_cache(3, width + 10)
        logits = model(padded, cache=cache)
        cache.truncate([len(p) for p in prompts])  # forget the padding
        last = torch.stack([logits[i, len(p) - 1] for i, p in enumerate(prompts)])
        batched = [[] for _ in prompts]
        for _ in range(6):
            tokens = last.argmax(-1)
            for row, t in zip(batched, tokens.tolist(), strict=True):
                row.append(t)
            last = model(tokens[:, None], cache=cache)[:, -1]
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == greedy_recompute(model, prompt, 6)


def test_parallel_segments_with_explicit_positions_and_mask(model):
    """Two segments cached side by side, each at RoPE positions from 0 (not attending to each other), then a
    query that sees both: equals one uncached pass with the same positions and block mask."""
    a, b, q = (torch.randint(0, VOCAB, (1, n)) for n in (6, 4, 3))
    positions = torch.cat([torch.arange(6), torch.arange(4), torch.arange(6, 9)])[None]
    segment = torch.tensor([0] * 6 + [1] * 4 + [2] * 3)
    causal = torch.arange(13)[:, None] >= torch.arange(13)[None, :]
    mask = (causal & ((segment[:, None] == segment[None, :]) | (segment[:, None] == 2)))[None, None]
    with torch.no_grad():
        reference = model(torch.cat([a, b, q], dim=1), positions=positions, mask=mask)[:, 10:]
        cache = model.new_cache(1, 13)
        model(a, cache=cache)
        model(b, positions=torch.arange(4)[None], mask=mask[:, :, 6:10, :10], cache=cache)
        got = model(q, positions=positions[:, 10:], mask=mask[:, :, 10:, :13], cache=cache)
    assert torch.allclose(got, reference, atol=1e-5)


def test_prefix_copy_reuses_a_cached_prompt(model):
    prefix = torch.randint(0, VOCAB, (1, 10))
    suffix = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        source = model.new_cache(1, 10)
        model(prefix, cache=source)
        cache = model.new_cache(2, 20)
        cache.copy_prefix_from(source, 10)
        out = model(suffix.expand(2, 4), cache=cache)
        ref = model(torch.cat([prefix, suffix], dim=1))[:, 10:]
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1], ref[0], atol=1e-5)


def test_overflowing_the_cache_is_a_clear_error(model):
    cache = KVCache.for_model(model.config, 1, 8, torch.float32)
    with torch.no_grad(), pytest.raises(ContextOverflowError, match="overflow"):
        model(torch.randint(0, VOCAB, (1, 9)), cache=cache)


def test_truncate_cannot_grow_a_row(model):
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(3)


def test_ragged_rows_accept_keys_in_another_dtype():
    """Under autocast, rotary embedding hands fp32 keys to a bf16 cache: both write paths cast them."""
    cache = KVCache(1, 2, 1, 8, 4, torch.bfloat16)
    cache.lengths = [2, 5]  # rows at different lengths: the per-row scatter path
    cache.plan(1)
    k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    keys, values = cache.update(0, k, v)
    cache.commit()
    assert keys.dtype == torch.bfloat16 and cache.lengths == [3, 6]
    assert torch.equal(keys[0, :, 2], k[0, :, 0].bfloat16()) and torch.equal(values[1, :, 5], v[1, :, 0].bfloat16())
