"""Lookahead decoding, Jacobi drafts and FastCoT early answers."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import chi_square, chi_square_critical, decode, tiny_lm

from hayai.decode.draft_length import DraftLength
from hayai.decode.fastcot import early_answer
from hayai.decode.jacobi import Jacobi
from hayai.decode.lookahead import LookaheadDecoding, NGramPool
from hayai.decode.sampling import SamplingParams, probabilities
from hayai.decode.speculative import SpeculativeDecoding
from hayai.errors import ConfigError
from hayai.quant import quantize_model

PROMPTS = [[5, 17, 33, 2, 8, 5, 17, 33, 41, 9, 5, 17], [60, 61, 62, 63, 60, 61], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
CONFIGS = [dict(), dict(window=3, ngram=2, max_candidates=2), dict(window=4, ngram=4, max_candidates=3),
           dict(window=2, ngram=3, max_candidates=0, pool_from_prompt=False), dict(window=1, ngram=5)]


@pytest.fixture(scope="module")
def target():
    return tiny_lm(seed=0)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_lookahead_greedy_equals_plain_greedy(target, config):
    strategy = LookaheadDecoding(**config)
    forwards = 0
    for prompt in PROMPTS:
        plain, _ = decode(target, prompt, 40)
        out, stats = decode(target, prompt, 40, strategy)
        assert out == plain
        forwards += stats.target_forwards
    if config.get("max_candidates", 5):
        assert forwards < 3 * 39  # the pool lets some passes keep more than one token


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_lookahead_on_quantized_targets(method):
    model = tiny_lm(seed=0)
    quantize_model(model, method, group_size=32)
    for prompt in PROMPTS[:2]:
        assert decode(model, prompt, 30, LookaheadDecoding(window=3, ngram=3))[0] == decode(model, prompt, 30)[0]


def test_lookahead_sampling_follows_the_target_distribution():
    vocab, trials = 4, 400
    model = tiny_lm(seed=3, vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, scale=6.0)
    sampling = SamplingParams(temperature=1.0, top_p=0.9)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    with torch.no_grad():
        first = probabilities(model(torch.tensor([prompt]))[0, -1], sampling)
        nexts = torch.stack([probabilities(model(torch.tensor([[*prompt, t]]))[0, -1], sampling)
                             for t in range(vocab)])
    joint = (first[:, None] * nexts).flatten()
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    strategy = LookaheadDecoding(window=2, ngram=3, max_candidates=3)
    for seed in range(trials):
        out, _ = decode(model, prompt, 2, strategy, sampling, seed=seed)
        counts[out[0] * vocab + out[1]] += 1
    stat, df = chi_square(counts, joint)
    assert stat < chi_square_critical(df), (stat, df)


def test_ngram_pool_is_lru_per_first_token():
    pool = NGramPool(capacity=2)
    pool.add(1, (2, 3))
    pool.add(1, (4, 5))
    pool.add(1, (2, 3))  # refreshed: now the most recent
    pool.add(1, (6, 7))  # evicts (4, 5), the least recent
    assert pool.candidates(1) == [(6, 7), (2, 3)]
    assert pool.candidates(9) == [] and len(pool) == 2


def test_lookahead_rejects_bad_settings():
    with pytest.raises(ConfigError):
        LookaheadDecoding(ngram=1)


def test_move_slots_copies_a_branch_after_the_prefix():
    cache = tiny_lm().new_cache(2, 16)
    for layer in range(len(cache.keys)):
        cache.keys[layer].copy_(torch.arange(16.0)[None, None, :, None].expand_as(cache.keys[layer]))
        cache.values[layer].copy_(-torch.arange(16.0)[None, None, :, None].expand_as(cache.values[layer]))
    cache.move_slots([7, 9, 12], 4)
    assert cache.keys[1][1, 0, :8, 0].tolist() == [0, 1, 2, 3, 7, 9, 12, 7]
    assert cache.values[0][0, 1, 4:7, 0].tolist() == [-7, -9, -12]


# ---- Jacobi and FastCoT --------------------------------------------------------------------------------------
def test_jacobi_drafts_are_lossless_and_refined_from_the_last_pass(target):
    source = Jacobi(window=4)
    for prompt in PROMPTS:
        plain, _ = decode(target, prompt, 30)
        assert decode(target, prompt, 30, SpeculativeDecoding(source, DraftLength(4, schedule="constant",
                                                                                  maximum=4)))[0] == plain
    logits = torch.zeros(5, 10)
    logits[torch.arange(5), torch.tensor([1, 2, 3, 4, 5])] = 1.0
    source.feedback([0], drafted=4, accepted=1, target_logits=logits)
    assert source.guesses == [3, 4, 5]  # outputs after the correction token's position
    assert source.propose([0], 4).tokens == [3, 4, 5, 5]


def test_fastcot_exact_part_is_greedy_and_the_answer_follows_the_trigger(tiny_llm):
    engine = tiny_llm.engine
    prompt = tiny_llm.prompt_ids("Hello world! How are", raw=True)
    trigger = tiny_llm.tokenizer.encode(" So the answer is", add_special_tokens=False)
    no_eos = frozenset()
    greedy = engine.generate(prompt, max_new_tokens=40, stop_token_ids=no_eos).token_ids
    result = early_answer(engine, prompt, trigger, budget=5, window=4, answer_tokens=6, stop_token_ids=no_eos)
    assert result.exact == greedy[: len(result.exact)] and 6 <= len(result.exact) <= 1 + 5 * 5
    assert result.reasoning_forwards == 5 and not result.finished and len(result.approximate) <= 4
    expected = engine.generate(prompt + result.exact + result.approximate + trigger, max_new_tokens=6,
                               stop_token_ids=no_eos)
    assert result.answer == expected.token_ids and result.answer_text == expected.text
    exact_only = early_answer(engine, prompt, trigger, budget=5, window=4, answer_tokens=6, use_approximate=False,
                              stop_token_ids=no_eos)
    assert exact_only.approximate == [] and exact_only.exact == result.exact
    assert early_answer(engine, prompt, trigger, budget=0, window=4, stop_token_ids=no_eos).exact == greedy[:1]
    with pytest.raises(ConfigError):
        early_answer(engine, prompt, [], budget=3)
