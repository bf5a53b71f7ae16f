"""Backends: the local engine batches with one-at-a-time greedy results; the OpenAI backend against a real
OpenAI-compatible server on loopback; prices from configuration."""

from __future__ import annotations

import json

import pytest
from openai_stub_server import serve
from prompting_helpers import tiny_llm_at

from hayai.errors import ConfigError
from hayai.prompting.backends import BackendError, GenParams, LocalBackend, OpenAIBackend, Price, PriceTable

PRICE = Price(input=2.0, output=8.0, request=0.001)
RAW = ["The quick brown", "Hello world! How", "def add(a, b):\n", "Small models"]
CHATS = [
    [{"role": "user", "content": "Hello world!"}],
    [{"role": "system", "content": "You are fast."}, {"role": "user", "content": "How are you today?"}],
    [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "1."}],  # prefill
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_llm_at(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def local(llm):
    return LocalBackend.of(llm, name="tiny", price=PRICE, max_batch=3)


def one_at_a_time(llm, prompt, params: GenParams):
    ids = LocalBackend.of(llm).prompt_ids(prompt)
    c = llm.engine.generate(ids, max_new_tokens=params.max_tokens, sampling=params.sampling(), stop=params.stop)
    return ids, c


def test_local_batch_equals_one_at_a_time_greedy(llm, local):
    params = GenParams(max_tokens=12, stop=("!",))
    prompts = RAW + CHATS
    results = local.complete(prompts, params)  # 7 prompts in batches of 3: 3 + 3 + 1
    assert len(results) == len(prompts)
    for prompt, result in zip(prompts, results, strict=True):
        ids, alone = one_at_a_time(llm, prompt, params)
        assert result.text == alone.text
        assert result.prompt_tokens == len(ids)
        assert result.completion_tokens == len(alone.token_ids)
        assert result.cost == pytest.approx(PRICE.cost(len(ids), len(alone.token_ids)))
        assert result.backend == "local:tiny" and result.latency_s > 0


def test_local_prefill_is_continued_after_the_generation_prompt(llm, local):
    tok = llm.tokenizer
    ids = local.prompt_ids(CHATS[2])
    expected = tok.encode_chat(CHATS[2][:1], add_generation_prompt=True) + tok.encode("1.", add_special_tokens=False)
    assert ids == expected


def test_price_table_from_json_and_toml(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"gpt-x": {"input": 0.15, "output": 0.6}}))
    (tmp_path / "p.toml").write_text('[small]\ninput = 1\noutput = 2\nrequest = 0.5\n')
    assert PriceTable.load(tmp_path / "p.json")["gpt-x"].cost(1_000_000, 2_000_000) == pytest.approx(1.35)
    assert PriceTable.load(tmp_path / "p.toml")["small"] == Price(1.0, 2.0, 0.5)
    with pytest.raises(ConfigError, match=r"p\.json.*no price for model 'other'"):
        PriceTable.load(tmp_path / "p.json")["other"]
    (tmp_path / "bad.json").write_text(json.dumps({"m": {"inptu": 1}}))
    with pytest.raises(ConfigError, match=r"bad\.json.*inptu"):
        PriceTable.load(tmp_path / "bad.json")


def test_bad_prompt_names_its_index(local):
    with pytest.raises(ConfigError, match="prompt 1"):
        local.complete(["ok", [{"content": "no role"}]], GenParams(max_tokens=2))


def test_openai_backend_against_a_loopback_server(local):
    params = GenParams(max_tokens=10, seed=3)
    expected = local.complete(RAW + CHATS, params)
    with serve(local, "tiny-served", delay=0.1) as (url, state):
        remote = OpenAIBackend("tiny-served", base_url=url, price={"tiny-served": {"input": 2, "output": 8}},
                               max_concurrency=4, prefill_body={"continue_final_message": True,
                                                                "add_generation_prompt": False})
        got = remote.complete(RAW + CHATS, params)
        assert state.requests == len(RAW + CHATS)
        assert state.max_in_flight > 1  # the client sent them concurrently
        assert state.bodies[0]["seed"] == 3 and state.bodies[0]["max_tokens"] == 10
    for g, e in zip(got, expected, strict=True):
        assert g.text == e.text
        assert (g.prompt_tokens, g.completion_tokens) == (e.prompt_tokens, e.completion_tokens)
        assert g.cost == pytest.approx(Price(2, 8).cost(e.prompt_tokens, e.completion_tokens))
        assert g.backend.startswith("openai:http://127.0.0.1") and g.backend.endswith(":tiny-served")


def test_openai_backend_without_prefill_flag_sends_the_assistant_message_as_is(local):
    params = GenParams(max_tokens=6)
    with serve(local, "m") as (url, state):
        got = OpenAIBackend("m", base_url=url).complete([CHATS[2]], params)[0]
        assert "continue_final_message" not in state.bodies[0]
    assert got.text == local.complete([CHATS[2][:1]], params)[0].text  # this server dropped the prefix


def test_openai_backend_unknown_model_is_a_clear_error(local):
    with serve(local, "m") as (url, _):
        backend = OpenAIBackend("nope", base_url=url, max_retries=0)
        with pytest.raises(BackendError, match="nope"):
            backend.complete(["hi"], GenParams(max_tokens=2))


def test_openai_backend_against_hayai_serve(llm, local):
    """hayai's own OpenAI-compatible server on loopback: greedy answers equal the local batched backend's."""
    from hayai.serve.app import ServeSettings, create_app
    from hayai.serve.background import BackgroundServer
    from hayai.serve.scheduler import Scheduler

    params = GenParams(max_tokens=8)
    prompts = RAW[:2] + CHATS[:2]
    expected = local.complete(prompts, params)
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=4)
    with BackgroundServer(create_app(scheduler, llm.tokenizer, ServeSettings(model_name="tiny"))) as server:
        remote = OpenAIBackend("tiny", base_url=server.url + "/v1", price=PRICE, max_retries=0)
        got = remote.complete(prompts, params)
    for g, e in zip(got, expected, strict=True):
        assert g.text == e.text
        assert (g.prompt_tokens, g.completion_tokens) == (e.prompt_tokens, e.completion_tokens)
        assert g.cost == pytest.approx(e.cost)
