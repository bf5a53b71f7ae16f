"""Continuous batching: every request gets what it would get alone, whatever joins or leaves around it."""

from __future__ import annotations

import threading
import time

import pytest
from tinymodels import write_hf_checkpoint

from hayai.decode.sampling import SamplingParams
from hayai.errors import ContextOverflowError
from hayai.serve.scheduler import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    TextEvent,
)

PROMPTS = ["Hello world", "The quick brown fox jumps", "def add(a, b):", "Small models", "naïve café 日本語",
           "How are you today? I am fine", "0123456789", "thank you"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer):
    import hayai

    path = write_hf_checkpoint(tmp_path_factory.mktemp("sched") / "tiny", tiny_tokenizer,
                               max_position_embeddings=256)
    return hayai.load(str(path), dtype="fp32")


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def alone(llm, prompt_ids, max_tokens, **kwargs):
    return llm.engine.generate(prompt_ids, max_new_tokens=max_tokens, **kwargs)


def run_all(scheduler: Scheduler, requests: list[GenerationRequest]):
    """Submit every request at once; return (completions, streamed text per request)."""
    done = [threading.Event() for _ in requests]
    results: list = [None] * len(requests)
    streamed = [[] for _ in requests]

    def sink_for(i):
        def sink(event):
            if isinstance(event, TextEvent):
                streamed[i].append(event.text)
            else:
                results[i] = event
                done[i].set()
        return sink

    for i, r in enumerate(requests):
        scheduler.submit(r, sink_for(i))
    for d in done:
        assert d.wait(60)
    for r in results:
        assert isinstance(r, FinishEvent), r
    return [r.completion for r in results], ["".join(s) for s in streamed]


def test_concurrent_greedy_requests_equal_decoding_each_alone(llm):
    ids = [llm.prompt_ids(p, raw=True) for p in PROMPTS]
    # Different lengths and budgets: rows finish at different steps and queued requests join mid-flight.
    requests = [GenerationRequest(p, max_tokens=8 + 7 * i, stop_token_ids=frozenset() if i % 2 else None)
                for i, p in enumerate(ids)]
    with Scheduler(llm.model, llm.tokenizer, max_batch=3, max_queue=16) as scheduler:
        completions, streamed = run_all(scheduler, requests)
        stats = scheduler.stats()
    for r, c, s in zip(requests, completions, streamed, strict=True):
        expected = alone(llm, r.prompt_ids, r.max_tokens, stop_token_ids=r.stop_token_ids)
        assert c.token_ids == expected.token_ids
        assert c.text == expected.text == s
        assert c.finish_reason == expected.finish_reason
        assert c.stats.prompt_tokens == len(r.prompt_ids) and c.stats.generated_tokens == len(c.token_ids)
    assert stats.completed == len(requests) and stats.running == 0 and stats.waiting == 0
    # Batching happened: fewer decode steps than the requests would need one after another.
    assert stats.decode_steps < sum(max(len(c.token_ids) - 1, 0) for c in completions)


def test_chat_prompts_stop_strings_and_eos_match_the_engine(llm):
    prompts = [llm.prompt_ids(p) for p in PROMPTS[:4]]  # chat-formatted: the model may end its turn
    full = [alone(llm, p, 40).text for p in prompts]
    stops = [[t[len(t) // 2: len(t) // 2 + 2]] if len(t) > 4 else [] for t in full]
    requests = [GenerationRequest(p, max_tokens=40, stop=s) for p, s in zip(prompts, stops, strict=True)]
    with Scheduler(llm.model, llm.tokenizer, max_batch=4) as scheduler:
        completions, streamed = run_all(scheduler, requests)
    for r, c, s in zip(requests, completions, streamed, strict=True):
        expected = alone(llm, r.prompt_ids, 40, stop=r.stop)
        assert (c.text, c.token_ids, c.finish_reason) == (expected.text, expected.token_ids, expected.finish_reason)
        assert s == c.text
        for stop in r.stop:
            assert stop not in c.text


def test_seeded_sampling_is_reproducible_inside_a_batch(llm):
    ids = [llm.prompt_ids(p, raw=True) for p in PROMPTS[:5]]
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=100 + i) for i in range(5)]
    requests = [GenerationRequest(p, max_tokens=20, sampling=s, stop_token_ids=frozenset())
                for p, s in zip(ids, params, strict=True)]
    with Scheduler(llm.model, llm.tokenizer, max_batch=5) as scheduler:
        completions, _ = run_all(scheduler, requests)
    for r, c in zip(requests, completions, strict=True):
        expected = alone(llm, r.prompt_ids, 20, sampling=r.sampling, stop_token_ids=frozenset())
        assert c.token_ids == expected.token_ids
    assert len({tuple(c.token_ids) for c in completions}) > 1


def test_chunked_prefill_and_cache_growth_keep_answers_equal(llm):
    long_prompt = llm.prompt_ids(" ".join(PROMPTS), raw=True)
    assert len(long_prompt) > 40
    requests = [GenerationRequest(llm.prompt_ids(PROMPTS[0], raw=True), max_tokens=30, stop_token_ids=frozenset()),
                GenerationRequest(long_prompt, max_tokens=40, stop_token_ids=frozenset()),
                GenerationRequest(llm.prompt_ids(PROMPTS[1], raw=True), max_tokens=12, stop_token_ids=frozenset())]
    # A 16-position cache must grow while rows hold data; the long prompt is prefilled 7 tokens at a time.
    with Scheduler(llm.model, llm.tokenizer, max_batch=3, prefill_chunk=7, initial_length=16) as scheduler:
        completions, _ = run_all(scheduler, requests)
        assert wait_until(lambda: scheduler.stats().cache_rows == 0)  # idle: the grown cache was released
    for r, c in zip(requests, completions, strict=True):
        assert c.token_ids == alone(llm, r.prompt_ids, r.max_tokens, stop_token_ids=frozenset()).token_ids


def test_cancelling_frees_the_row_for_the_next_request(llm):
    ids = llm.prompt_ids(PROMPTS[0], raw=True)
    events: list = []
    with Scheduler(llm.model, llm.tokenizer, max_batch=1) as scheduler:
        tickets = []
        submitted = threading.Event()

        def cancel_on_first_text(event):
            events.append(event)
            if isinstance(event, TextEvent) and len(events) == 1:
                submitted.wait(10)
                tickets[0].cancel()  # from the engine thread, like a disconnect noticed mid-stream

        tickets.append(scheduler.submit(GenerationRequest(ids, max_tokens=200, stop_token_ids=frozenset()),
                                        cancel_on_first_text))
        submitted.set()
        completion = scheduler.generate(GenerationRequest(ids, max_tokens=5, stop_token_ids=frozenset()), timeout=60)
        stats = scheduler.stats()
    assert len(completion.token_ids) == 5
    assert not any(isinstance(e, FinishEvent) for e in events)
    assert stats.cancelled == 1 and stats.completed == 1 and stats.running == 0
    assert stats.generated_tokens == 5  # the cancelled request stopped early and counted nothing


def test_full_queue_refuses_with_a_retry_delay(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=1, max_queue=2)  # not started: nothing drains
    ids = llm.prompt_ids(PROMPTS[0], raw=True)
    first = scheduler.submit(GenerationRequest(ids, max_tokens=4), lambda e: None)
    scheduler.submit(GenerationRequest(ids, max_tokens=4), lambda e: None)
    with pytest.raises(QueueFullError) as info:
        scheduler.submit(GenerationRequest(ids, max_tokens=4), lambda e: None)
    assert info.value.retry_after >= 1 and "busy" in str(info.value)
    first.cancel()  # a queued request that is cancelled leaves the queue at once
    scheduler.submit(GenerationRequest(ids, max_tokens=4), lambda e: None)
    assert scheduler.stats().waiting == 2 and scheduler.stats().cancelled == 1
    scheduler.close()
    assert scheduler.stats().failed == 2


def test_close_fails_requests_in_flight_and_queued(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=1, max_queue=4)
    ids = llm.prompt_ids(PROMPTS[0], raw=True)
    events: list = []
    for _ in range(2):
        scheduler.submit(GenerationRequest(ids, max_tokens=4), events.append)
    scheduler.close()
    assert [type(e) for e in events] == [ErrorEvent, ErrorEvent]
    assert "shutting down" in events[0].message


def test_requests_that_cannot_fit_are_refused_up_front(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_length=64)
    with pytest.raises(ContextOverflowError, match="at most 64"):
        scheduler.submit(GenerationRequest(list(range(1, 40)), max_tokens=30), lambda e: None)
    with pytest.raises(Exception, match="empty"):
        scheduler.submit(GenerationRequest([], max_tokens=3), lambda e: None)
    with pytest.raises(Exception, match="token ids"):
        scheduler.submit(GenerationRequest([10**6], max_tokens=3), lambda e: None)


def test_per_request_speculative_strategy_keeps_greedy_answers(llm):
    from hayai.decode.prompt_lookup import PromptLookup
    from hayai.decode.speculative import SpeculativeDecoding

    ids = [llm.prompt_ids(p * 3, raw=True) for p in PROMPTS[:4]]  # repetitive prompts: lookup finds drafts
    requests = [GenerationRequest(p, max_tokens=30, stop_token_ids=frozenset()) for p in ids]
    with Scheduler(llm.model, llm.tokenizer, max_batch=2,
                   strategy=lambda: SpeculativeDecoding(PromptLookup())) as scheduler:
        completions, streamed = run_all(scheduler, requests)
    for r, c, s in zip(requests, completions, streamed, strict=True):
        expected = alone(llm, r.prompt_ids, 30, stop_token_ids=frozenset())
        assert c.token_ids == expected.token_ids and c.text == s == expected.text
        assert c.stats.strategy == "lookup" and c.stats.generated_tokens == 30
    assert sum(c.stats.drafted_tokens for c in completions) > 0
