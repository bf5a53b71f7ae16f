"""The default model behind the server: concurrent greedy answers equal `hayai generate`'s, one by one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from hayai.serve.app import ServeSettings, create_app
from hayai.serve.background import BackgroundServer
from hayai.serve.scheduler import Scheduler

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Write a haiku about the sea.", "What is 12 times 12?"]


def test_concurrent_greedy_answers_equal_generate(default_llm):
    expected = [default_llm.generate(q, max_tokens=40) for q in QUESTIONS]  # what `hayai generate -t 0` prints
    assert "Paris" in expected[0]
    scheduler = Scheduler(default_llm.model, default_llm.tokenizer, max_batch=4)
    settings = ServeSettings(model_name=default_llm.info.name)
    with BackgroundServer(create_app(scheduler, default_llm.tokenizer, settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(question: str) -> str:
            answer = client.chat.completions.create(model=default_llm.info.name, temperature=0, max_tokens=40,
                                                    messages=[{"role": "user", "content": question}])
            return answer.choices[0].message.content

        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            answers = list(pool.map(ask, QUESTIONS))
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=default_llm.info.name, temperature=0, max_tokens=40, stream=True,
            messages=[{"role": "user", "content": QUESTIONS[0]}]))
    assert answers == expected
    assert streamed == expected[0]
