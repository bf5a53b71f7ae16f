"""The SQLite completion cache: hits make no backend call; the key covers backend, parameters and prompt."""

from __future__ import annotations

import pytest
from prompting_helpers import CountingBackend, tiny_llm_at

from hayai.prompting.backends import GenParams, LocalBackend, Price
from hayai.prompting.cache import CachedBackend, CompletionCache, cache_key


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return LocalBackend.of(tiny_llm_at(tmp_path_factory.mktemp("tiny")), name="tiny", price=Price(1, 4))


PROMPTS = ["The quick brown", [{"role": "user", "content": "Hello world!"}], "Small models"]


def test_hits_make_no_backend_call_and_return_the_same_results(local, tmp_path):
    counting = CountingBackend(local)
    path = tmp_path / "cache.sqlite"
    cached = CachedBackend(counting, CompletionCache(path))
    params = GenParams(max_tokens=6)
    first = cached.complete(PROMPTS, params)
    assert counting.prompts_sent == 3 and not any(r.cached for r in first)
    second = cached.complete(PROMPTS, params)
    assert counting.prompts_sent == 3  # nothing new reached the backend
    assert all(r.cached for r in second)
    for a, b in zip(first, second, strict=True):
        assert (a.text, a.prompt_tokens, a.completion_tokens, a.cost) == (b.text, b.prompt_tokens,
                                                                            b.completion_tokens, b.cost)
    # persistent: a new cache object on the same file still hits
    reopened = CachedBackend(counting, CompletionCache(path))
    assert [r.text for r in reopened.complete(PROMPTS[::-1], params)] == [r.text for r in first[::-1]]
    assert counting.prompts_sent == 3 and reopened.cache.hits == 3


def test_only_misses_are_sent_and_duplicates_once(local):
    counting = CountingBackend(local)
    cached = CachedBackend(counting, CompletionCache())
    params = GenParams(max_tokens=4)
    cached.complete(PROMPTS[:1], params)
    results = cached.complete([PROMPTS[0], "Hello", "Hello"], params)
    assert counting.calls[-1] == ["Hello"]
    assert results[1].text == results[2].text == local.complete(["Hello"], params)[0].text


def test_key_covers_backend_params_and_prompt():
    base = cache_key("local:a", "hi", GenParams(max_tokens=4))
    assert base == cache_key("local:a", "hi", GenParams(max_tokens=4))
    assert base != cache_key("local:b", "hi", GenParams(max_tokens=4))
    assert base != cache_key("local:a", "hi ", GenParams(max_tokens=4))
    assert base != cache_key("local:a", "hi", GenParams(max_tokens=5))
    assert base != cache_key("local:a", "hi", GenParams(max_tokens=4, stop=("\n",)))
    assert base != cache_key("local:a", "hi", GenParams(max_tokens=4, temperature=0.5, seed=1))
    assert base != cache_key("local:a", [{"role": "user", "content": "hi"}], GenParams(max_tokens=4))


def test_changed_parameters_miss(local):
    counting = CountingBackend(local)
    cached = CachedBackend(counting, CompletionCache())
    cached.complete(PROMPTS, GenParams(max_tokens=4))
    cached.complete(PROMPTS, GenParams(max_tokens=5))
    assert counting.prompts_sent == 6
