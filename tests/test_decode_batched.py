"""Batched speculative decoding: every row equals decoding its prompt alone."""

from __future__ import annotations

import pytest
from tinymodels import write_hf_checkpoint

import hayai
from hayai.decode.batched_speculative import BatchedDraftModel, BatchedSpeculativeDecoding, PerRow
from hayai.decode.draft_length import DraftLength
from hayai.decode.prompt_lookup import PromptLookup
from hayai.decode.sampling import SamplingParams
from hayai.decode.self_speculative import EarlyExit
from hayai.errors import ConfigError

TEXTS = ["The quick brown fox jumps over the lazy dog. The quick brown", "Hello world!",
         "def add(a, b):\n    return a + b\n\ndef add(", "Small models generate text quickly on modest hardware."]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer):
    return hayai.load(str(write_hf_checkpoint(tmp_path_factory.mktemp("t") / "target", tiny_tokenizer)), dtype="fp32")


@pytest.fixture(scope="module")
def draft(tmp_path_factory, tiny_tokenizer):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("d") / "draft", tiny_tokenizer, seed=1, num_hidden_layers=1)
    return hayai.load(str(path), dtype="fp32").model


def sources(llm, draft):
    return {
        "lookup": PerRow(lambda: PromptLookup(num_tokens=5)),
        "draft-other": BatchedDraftModel(draft, num_tokens=3, pad_token_id=llm.tokenizer.pad_token_id),
        "draft-self": BatchedDraftModel(llm.model, num_tokens=4),
    }


@pytest.mark.parametrize("name", ["lookup", "draft-other", "draft-self"])
def test_batched_greedy_equals_one_prompt_at_a_time(llm, draft, name):
    prompts = [llm.prompt_ids(t, raw=True) for t in TEXTS]
    alone = [llm.engine.generate(p, max_new_tokens=20, stop_token_ids=set()).token_ids for p in prompts]
    batched = BatchedSpeculativeDecoding(llm.engine, sources(llm, draft)[name], lambda: DraftLength(3, maximum=6))
    out = batched.generate(prompts, max_new_tokens=20, stop_token_ids=set())
    assert [c.token_ids for c in out] == alone
    assert out[0].stats.target_forwards <= 19
    if name == "draft-self":  # the target drafting for itself: every draft is accepted
        assert all(c.stats.accepted_tokens == c.stats.drafted_tokens > 0 for c in out)


def test_batched_rows_stop_on_their_own_end_of_sequence(llm, draft):
    prompts = [llm.prompt_ids(t, raw=True) for t in TEXTS]
    reference = [llm.engine.generate(p, max_new_tokens=16, stop_token_ids=set()).token_ids for p in prompts]
    eos = {reference[0][5], reference[2][3]}
    alone = [llm.engine.generate(p, max_new_tokens=16, stop_token_ids=eos) for p in prompts]
    for source in (PerRow(lambda: PromptLookup(stop_token_ids=frozenset(eos))),
                   BatchedDraftModel(draft, num_tokens=4, stop_token_ids=frozenset(eos))):
        out = BatchedSpeculativeDecoding(llm.engine, source).generate(prompts, max_new_tokens=16, stop_token_ids=eos)
        assert [(c.token_ids, c.finish_reason) for c in out] == [(c.token_ids, c.finish_reason) for c in alone]


def test_batched_sampling_runs_with_per_row_settings(llm, draft):
    prompts = [llm.prompt_ids(t, raw=True) for t in TEXTS[:3]]
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(), SamplingParams(temperature=1.0, top_k=5,
                                                                                        seed=2)]
    batched = BatchedSpeculativeDecoding(llm.engine, BatchedDraftModel(draft, num_tokens=3))
    out = batched.generate(prompts, max_new_tokens=12, sampling=params, stop_token_ids=set())
    assert all(len(c.token_ids) == 12 for c in out)
    greedy_alone = llm.engine.generate(prompts[1], max_new_tokens=12, stop_token_ids=set()).token_ids
    assert out[1].token_ids == greedy_alone  # the greedy row is unaffected by its sampling neighbours
    again = batched.generate(prompts, max_new_tokens=12, sampling=params, stop_token_ids=set())
    assert [c.token_ids for c in again] == [c.token_ids for c in out]  # seeded rows reproduce


def test_a_draft_sharing_the_target_cache_cannot_run_per_row(llm):
    prompts = [llm.prompt_ids(t, raw=True) for t in TEXTS[:2]]
    with pytest.raises(ConfigError):
        batched = BatchedSpeculativeDecoding(llm.engine, PerRow(lambda: EarlyExit(exit_layer=1)))
        batched.generate(prompts, max_new_tokens=8)
