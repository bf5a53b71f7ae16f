"""A running OpenAI-compatible server (hayai's, llama.cpp's, vLLM's, ...) behind the same `stream` interface as a
local `hayai.LLM`, so `hayai chat --url URL` talks to a server exactly as it talks to a local model.

    remote = RemoteLLM("http://127.0.0.1:8000")
    for piece in remote.stream([{"role": "user", "content": "Hi"}], max_tokens=64):
        print(piece, end="")
    print(remote.last_completion.stats.summary())
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hayai.decode.engine import Completion, GenerationStats, TextStream
from hayai.errors import ContextOverflowError, HayaiError
from hayai.models.tokenizer import Message


@dataclass
class RemoteInfo:
    name: str
    url: str


class RemoteStats(GenerationStats):
    """What a client can measure: usage counts from the server, time to first token and streaming rate."""

    def summary(self) -> str:
        return (f"prompt: {self.prompt_tokens} tok, first token after {self.prefill_seconds:.2f} s | "
                f"answer: {self.generated_tokens} tok, {self.decode_tokens_per_second:.1f} tok/s")


class RemoteLLM:
    """Chat with a model served at `url` (with or without the trailing /v1)."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        import openai

        self._openai = openai
        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        self.url = url
        self.client = openai.OpenAI(base_url=base, api_key=api_key or "none", timeout=timeout, max_retries=2)
        served = [m.id for m in self._call(self.client.models.list).data]
        if not served:
            raise HayaiError(f"the server at {url} serves no model")
        if model is not None and model not in served:
            raise HayaiError(f"the server at {url} does not serve '{model}'; it serves {', '.join(served)}")
        self.info = RemoteInfo(model or served[0], url)
        self.last_completion: Completion | None = None

    def __repr__(self) -> str:
        return f"RemoteLLM({self.info.name!r}, url={self.url!r})"

    def stream(self, messages: str | Sequence[Message], *, max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> TextStream:
        """Start a streamed chat answer; iterate for text pieces, then read `.completion`."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        stats = RemoteStats(strategy="remote")
        started = time.perf_counter()
        chunks = self._call(self.client.chat.completions.create, model=self.info.name, messages=list(messages),
                            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=list(stop) or None, stream=True, stream_options={"include_usage": True})
        parts: list[str] = []
        state = {"finish": "length"}

        def deltas() -> Iterator[str]:
            first = last = None
            for chunk in self._iterate(chunks):
                if chunk.usage:
                    stats.prompt_tokens = chunk.usage.prompt_tokens
                    stats.generated_tokens = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    state["finish"] = choice.finish_reason
                if choice.delta and choice.delta.content:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(choice.delta.content)
                    yield choice.delta.content
            stats.prefill_seconds = (first or time.perf_counter()) - started
            stats.decode_seconds = (last - first) if first and last else 0.0

        def finish() -> Completion:
            self.last_completion = Completion("".join(parts), [], state["finish"], stats)
            return self.last_completion

        return TextStream(deltas(), finish)

    def _iterate(self, chunks) -> Iterator:
        try:
            yield from chunks
        except self._openai.APIError as exc:
            raise HayaiError(f"the server at {self.url} failed mid-answer: {exc}") from None

    def _call(self, method, *args, **kwargs):
        openai = self._openai
        try:
            return method(*args, **kwargs)
        except openai.APIConnectionError:
            raise HayaiError(f"cannot reach a server at {self.url} (is `hayai serve` running?)") from None
        except openai.AuthenticationError:
            raise HayaiError(f"the server at {self.url} refused the API key (give it with --api-key or "
                             "HAYAI_API_KEY)") from None
        except openai.BadRequestError as exc:
            message = _message(exc)
            if exc.code == "context_length_exceeded":
                raise ContextOverflowError(message) from None
            raise HayaiError(f"the server at {self.url} refused the request: {message}") from None
        except openai.APIStatusError as exc:
            raise HayaiError(f"the server at {self.url} answered {exc.status_code}: {_message(exc)}") from None


def _message(exc) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or exc.message)
