"""`hayai serve` and `hayai chat --url` end to end, in subprocesses, on a tiny model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from tinymodels import write_hf_checkpoint

KEY = "cli-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hayai(*args, home, stdin: str | None = None, key: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HAYAI_HOME": str(home), "COLUMNS": "200"}
    env.pop("HAYAI_API_KEY", None)
    if key:
        env["HAYAI_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "hayai", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    return write_hf_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    env = {**os.environ, "HAYAI_HOME": str(home), "HAYAI_API_KEY": KEY, "COLUMNS": "200"}
    log = open(home / "serve.log", "w+")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(
        [sys.executable, "-m", "hayai", "serve", str(checkpoint), "--port", str(port), "--dtype", "fp32",
         "--served-model-name", "tiny", "--max-batch", "4", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"hayai serve did not come up:\n{log.read()}")
        time.sleep(0.2)
    yield url, home
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log.seek(0)
    output = log.read()
    log.close()
    assert code == 0, output
    assert "tiny on http://127.0.0.1" in output and "API key required" in output


@pytest.fixture(scope="module")
def local(checkpoint):
    import hayai

    return hayai.load(str(checkpoint), dtype="fp32")


def test_serve_answers_the_openai_client_like_the_local_model(server, local):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            temperature=0, max_tokens=16)
    assert answer.choices[0].message.content == local.generate("Hello", max_tokens=16)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/").status_code == 200  # the chat page, bound to loopback


def test_chat_url_talks_to_the_server(server, local):
    url, home = server
    result = hayai("chat", "--url", url, "-t", "0", "-n", "12", home=home, key=KEY,
                   stdin="Hello\n/reset\nHello\n")
    assert result.returncode == 0, result.stderr
    expected = local.generate("Hello", max_tokens=12)
    assert result.stdout.split("\n")[:2] == [expected, expected]
    assert result.stderr.count("first token after") == 2 and "conversation cleared" in result.stderr


def test_chat_url_errors_are_one_clear_line(server, tmp_path):
    url, _ = server
    wrong = hayai("chat", "--url", url, home=tmp_path, key="wrong", stdin="Hello\n")
    assert wrong.returncode == 2 and "refused the API key" in wrong.stderr


def test_remote_llm_errors_name_the_server_and_the_fix(server):
    from hayai.errors import ContextOverflowError, HayaiError
    from hayai.serve.client import RemoteLLM

    url, _ = server
    with pytest.raises(HayaiError, match="does not serve 'gpt-9'; it serves tiny"):
        RemoteLLM(url, api_key=KEY, model="gpt-9")
    with pytest.raises(HayaiError, match="cannot reach a server"):
        RemoteLLM(f"http://127.0.0.1:{free_port()}")
    remote = RemoteLLM(url + "/v1/", api_key=KEY)
    with pytest.raises(ContextOverflowError, match="maximum context length"):
        remote.stream("hi " * 200, max_tokens=16)
    stream = remote.stream("Hello", max_tokens=4, temperature=0)
    assert "".join(stream) == stream.completion.text and stream.completion.stats.generated_tokens <= 4


def test_speculate_option_builds_lossless_per_request_strategies(local):
    from hayai.cli.serve_cmd import _strategy_factory
    from hayai.errors import ConfigError
    from hayai.serve.scheduler import GenerationRequest, Scheduler

    prompt = local.prompt_ids("Hello world Hello world Hello", raw=True)
    expected = local.engine.generate(prompt, max_new_tokens=20, stop_token_ids=frozenset())
    for spec in ("lookup", "self:1"):
        with Scheduler(local.model, local.tokenizer, strategy=_strategy_factory(spec, local, "fp32", "cpu")) as s:
            completion = s.generate(GenerationRequest(prompt, max_tokens=20, stop_token_ids=frozenset()), timeout=60)
        assert completion.token_ids == expected.token_ids
        assert completion.stats.strategy == {"lookup": "lookup", "self:1": "self"}[spec]
    for bad in ("bogus", "self:9", "draft:"):
        with pytest.raises(ConfigError, match="--speculate"):
            _strategy_factory(bad, local, "fp32", "cpu")
