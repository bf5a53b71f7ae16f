"""Compiled decode: the static-shape cached pass equals eager decoding, under every strategy; clean fallback."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import decode, tiny_lm

from hayai.decode.compiled import CompiledLM, compile_decode, static_inputs
from hayai.decode.draft_length import DraftLength
from hayai.decode.lookahead import LookaheadDecoding
from hayai.decode.prompt_lookup import PromptLookup
from hayai.decode.self_speculative import EarlyExit
from hayai.decode.speculative import SpeculativeDecoding

PROMPTS = [[5, 17, 33, 2, 8, 5, 17, 33, 41, 9, 5, 17], [60, 61, 62, 63, 60, 61]]


@pytest.fixture(scope="module")
def target():
    return tiny_lm(seed=0)


@pytest.fixture(scope="module")
def traced(target):
    """The compiled wrapper with dynamo's 'eager' backend: the same graph capture, no C++ compilation."""
    return CompiledLM(target, backend="eager")


def test_static_inputs_append_after_each_row_and_mask_the_rest(target):
    cache = target.new_cache(2, 10)
    cache.lengths = [3, 5]
    slots, positions, mask = static_inputs(cache, 2, None, None)
    assert slots.tolist() == [[3, 4], [5, 6]] and torch.equal(positions, slots)
    assert mask.shape == (2, 1, 2, 10)
    assert mask[1, 0, 1].tolist() == [True] * 7 + [False] * 3
    explicit = torch.tensor([[True, False, True, True, False, True]])  # a caller's mask over extent 6
    _, _, padded = static_inputs(cache, 1, torch.tensor([[9], [9]]), explicit[None, None])
    assert padded.shape == (2, 1, 1, 10) and padded[0, 0, 0].tolist() == explicit[0].tolist() + [False] * 4


@pytest.mark.parametrize("name", ["plain", "lookup", "self", "lookahead"])
def test_compiled_greedy_equals_eager_greedy(target, traced, name):
    strategies = {
        "plain": lambda: None,
        "lookup": lambda: SpeculativeDecoding(PromptLookup(), DraftLength(4, maximum=6)),
        "self": lambda: SpeculativeDecoding(EarlyExit(exit_layer=1), DraftLength(3)),
        "lookahead": lambda: LookaheadDecoding(window=3, ngram=3),
    }
    before = traced.compiled_calls
    for prompt in PROMPTS:
        eager, _ = decode(target, prompt, 24)
        assert decode(traced, prompt, 24, strategies[name]())[0] == eager
    assert traced.fallback_reason is None and traced.compiled_calls > before


def test_a_failing_compiler_falls_back_to_eager_with_a_reason(target):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    wrapper = CompiledLM(target, backend=broken)
    eager, _ = decode(target, PROMPTS[0], 8)
    assert decode(wrapper, PROMPTS[0], 8)[0] == eager
    assert "no C++ compiler here" in wrapper.fallback_reason and wrapper.compiled_calls == 0


def test_wrapper_shares_the_modules_and_long_passes_run_eagerly(target, traced):
    assert traced.model is target.model and traced.lm_head is target.lm_head and traced.eager is target
    assert compile_decode(traced) is traced
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in target.parameters())
    cache = traced.new_cache(1, 64)
    calls = traced.compiled_calls
    with torch.inference_mode():
        traced(torch.tensor([list(range(40))]), cache=cache)  # 40 > max_step_tokens: eager prefill
    assert traced.compiled_calls == calls and cache.lengths == [40]


@pytest.mark.slow
def test_inductor_compiled_logits_match_eager(target):
    """The real compiler (TorchInductor, C++): logits of a decode step and a verification pass match eager."""
    compiled = CompiledLM(target)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        c1, c2 = target.new_cache(1, 40), compiled.new_cache(1, 40)
        target(ids, cache=c1), compiled(ids, cache=c2)
        for step in ([[7]], [[8, 9, 10]]):
            expected = target(torch.tensor(step), cache=c1)
            got = compiled(torch.tensor(step), cache=c2)
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    if compiled.fallback_reason is not None:
        pytest.skip(f"TorchInductor is unavailable here: {compiled.fallback_reason}")
    assert compiled.compiled_calls == 3 and c2.lengths == c1.lengths  # the 12-token prefill is short too
