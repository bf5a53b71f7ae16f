"""The OpenAI-compatible server, driven by the official `openai` client against real servers on loopback ports."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from tinymodels import write_hf_checkpoint

from hayai.decode.sampling import SamplingParams
from hayai.serve.app import LOOPBACK_HOSTS, ServeSettings, create_app
from hayai.serve.background import BackgroundServer
from hayai.serve.scheduler import Scheduler

NAME = "tiny-chat"
KEY = "sekret-key"
QUESTIONS = ["Hello world", "How are you today?", "def add(a, b):", "The quick brown fox", "Small models",
             "thank you", "0123456789", "naïve café"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer):
    import hayai

    path = write_hf_checkpoint(tmp_path_factory.mktemp("api") / "tiny", tiny_tokenizer, max_position_embeddings=2048)
    return hayai.load(str(path), dtype="fp32")


@pytest.fixture(scope="module")
def served(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=8, max_queue=16)
    settings = ServeSettings(model_name=NAME, max_tokens_cap=1900, max_body_bytes=4096)
    with BackgroundServer(create_app(scheduler, llm.tokenizer, settings)) as server:
        yield server, scheduler


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def chat_alone(llm, question: str, max_tokens: int, **kwargs):
    return llm.engine.generate(llm.prompt_ids([{"role": "user", "content": question}]), max_new_tokens=max_tokens,
                               **kwargs)


# ---- answers ----------------------------------------------------------------------------------------------------
def test_models_and_health(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(served[0].url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["max_queue"] == 16


def test_chat_answer_equals_the_engine_greedy(client, llm):
    for question in QUESTIONS[:3]:
        expected = chat_alone(llm, question, 24)
        answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=24)
        choice = answer.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected.text
        assert choice.finish_reason == expected.finish_reason
        assert answer.object == "chat.completion" and answer.model == NAME and answer.id.startswith("chatcmpl-")
        n_prompt = len(llm.prompt_ids([{"role": "user", "content": question}]))
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (n_prompt, len(expected.token_ids))
        assert answer.usage.total_tokens == n_prompt + len(expected.token_ids)


def test_streamed_chat_has_the_openai_chunk_layout(client, llm):
    expected = chat_alone(llm, QUESTIONS[1], 30)
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_event_stream_ends_with_done(served, llm):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "stream": True,
            "temperature": 0}
    response = httpx.post(served[0].url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert "usage" not in payloads[0]  # only with stream_options.include_usage
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"]


def test_completions_streamed_and_not_equal_the_engine(client, llm):
    prompt = "The quick brown fox"
    expected = llm.engine.generate(llm.tokenizer.encode(prompt), max_new_tokens=20)
    answer = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=20)
    assert answer.object == "text_completion" and answer.choices[0].text == expected.text
    assert answer.usage.completion_tokens == len(expected.token_ids)
    pieces = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=20, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected.text
    assert pieces[-1].choices[0].finish_reason == expected.finish_reason
    echoed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=20, echo=True)
    assert echoed.choices[0].text == prompt + expected.text
    by_ids = client.completions.create(model=NAME, prompt=llm.tokenizer.encode(prompt), temperature=0, max_tokens=20)
    assert by_ids.choices[0].text == expected.text


def test_stop_sequences_and_ignore_eos(client, llm):
    full = llm.engine.generate(llm.tokenizer.encode("Hello world"), max_new_tokens=40, stop_token_ids=set()).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    answer = client.completions.create(model=NAME, prompt="Hello world", temperature=0, max_tokens=40,
                                       stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    assert answer.choices[0].text == full[:full.index(stop)] and answer.choices[0].finish_reason == "stop"
    exact = client.completions.create(model=NAME, prompt="Hello world", temperature=0, max_tokens=40,
                                      extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 40 and exact.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_matches_the_engine(client, llm):
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Hello"}], temperature=1.0, top_p=0.9,
                  max_tokens=16, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    expected = chat_alone(llm, "Hello", 16, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=1234))
    assert first == second == expected.text


def test_eight_concurrent_clients_each_get_their_own_answer(served, llm):
    server, scheduler = served
    expected = {q: chat_alone(llm, q, 48, stop_token_ids=set()).text for q in QUESTIONS}
    steps_before = scheduler.stats().decode_steps
    start = threading.Barrier(len(QUESTIONS))

    def ask(i_question):
        i, question = i_question
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        start.wait()
        kwargs = dict(model=NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=48,
                      extra_body={"ignore_eos": True})
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kwargs) if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, enumerate(QUESTIONS)))
    assert answers == [expected[q] for q in QUESTIONS]
    steps = scheduler.stats().decode_steps - steps_before
    assert steps < len(QUESTIONS) * 47 * 0.75  # the requests were decoded together, not one after another


# ---- safety -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=2, max_queue=2)
    settings = ServeSettings(model_name=NAME, api_key=KEY, allowed_hosts=LOOPBACK_HOSTS)
    with BackgroundServer(create_app(scheduler, llm.tokenizer, settings)) as server:
        yield server


def test_api_key_is_required_except_for_health_and_the_page(guarded):
    url = guarded.url
    messages = [{"role": "user", "content": "Hello"}]
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(url + "/v1/models", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong-key", max_retries=0).chat.completions.create(
            model=NAME, messages=messages, max_tokens=2)
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(model=NAME, messages=messages, max_tokens=2).choices[0].message
    assert httpx.get(url + "/health").status_code == 200
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<title>hayai chat</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(url + "/static/chat.js").status_code == 200


def test_foreign_host_headers_are_refused_on_loopback(guarded):
    response = httpx.get(guarded.url + "/health", headers={"Host": "evil.example:8000"})
    assert response.status_code == 421 and "evil.example" in response.json()["error"]["message"]
    assert httpx.get(guarded.url + "/health", headers={"Host": f"localhost:{guarded.port}"}).status_code == 200


def post(served, path, body=None, content=None, headers=None):
    return httpx.post(served[0].url + path, json=body, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "'gpt-9' does not exist"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "above this server's cap of 1900"),
    ({"messages": [{"role": "user", "content": "hi " * 700}], "max_tokens": 1500}, 400, "maximum context length"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 422, "temperature"),
    ({"messages": []}, 422, "messages"),
    ({"model": NAME}, 422, "messages: Field required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "only n=1"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "only text parts"),
    ([1, 2, 3], 400, "must be a JSON object"),
])
def test_bad_chat_requests_get_4xx_with_a_message(served, body, status, fragment):
    response = post(served, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_malformed_json_oversized_bodies_and_wrong_content_types(served):
    response = post(served, "/v1/chat/completions", content=b'{"messages": [', headers={
        "Content-Type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    response = post(served, "/v1/chat/completions", big)
    assert response.status_code == 413 and "4096" in response.json()["error"]["message"]
    response = post(served, "/v1/completions", content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    response = post(served, "/v1/completions", {"prompt": ["a", "b"]})
    assert response.status_code == 400 and "one prompt per request" in response.json()["error"]["message"]
    response = post(served, "/v1/completions", {"prompt": [999999]})
    assert response.status_code == 400 and "token ids" in response.json()["error"]["message"]
    assert httpx.get(served[0].url + "/v2/nothing").status_code == 404


def test_client_errors_surface_in_the_openai_client(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length") as info:
        client.completions.create(model=NAME, prompt="hi " * 700, max_tokens=1500)
    assert info.value.code == "context_length_exceeded"


def test_full_queue_answers_503_with_retry_after(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=1, max_queue=1)
    settings = ServeSettings(model_name=NAME, manage_scheduler=False)  # never started: requests stay queued
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with BackgroundServer(create_app(scheduler, llm.tokenizer, settings)) as server, httpx.Client() as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as queued:
            assert queued.status_code == 200  # accepted: it waits for a row
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model=NAME, messages=body["messages"], max_tokens=4)
            assert info.value.status_code == 503
            assert int(info.value.response.headers["retry-after"]) >= 1
            assert "busy" in info.value.message
        assert wait_until(lambda: scheduler.stats().waiting == 0)  # the stream was closed: its request left the queue
    scheduler.close()


def test_disconnecting_clients_free_their_rows(served):
    server, scheduler = served
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    cancelled = scheduler.stats().cancelled
    generated = scheduler.stats().generated_tokens
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert wait_until(lambda: scheduler.stats().cancelled == cancelled + 1)
    # Not streamed: the client gives up waiting (timeout), the server notices the closed connection.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.2)
    assert wait_until(lambda: scheduler.stats().cancelled == cancelled + 2)
    stats = scheduler.stats()
    assert stats.running == 0 and stats.prefilling == 0 and stats.generated_tokens == generated


def test_each_finished_request_is_logged(client, caplog):
    with caplog.at_level("INFO", logger="hayai.serve"):
        client.completions.create(model=NAME, prompt="Hello", temperature=0, max_tokens=3,
                                  extra_body={"ignore_eos": True})
    lines = [r.getMessage() for r in caplog.records if r.name == "hayai.serve"]
    assert any(line.startswith("completion: ") and "+ 3 answer tokens" in line for line in lines), lines
