"""The OpenAI API's request and response shapes, as the official `openai` client sends and expects them.

Requests are validated with pydantic (a wrong type or range is a 422 whose message names the field); options
this server does not implement (n > 1, logprobs, tools, penalties, ...) are refused with a 400 naming the field
rather than silently ignored. Responses and stream chunks are plain dicts in the exact OpenAI layout:

    chat:        {"id": "chatcmpl-...", "object": "chat.completion", "created", "model",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content"}, "logprobs": null,
                               "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    chat chunk:  {"id", "object": "chat.completion.chunk", "created", "model",
                  "choices": [{"index": 0, "delta": {...}, "logprobs": null, "finish_reason"}]}
                 (+ "usage": null on every chunk and a last chunk with "choices": [] and the usage when the request
                 asked for stream_options.include_usage), then the line `data: [DONE]`.
    completion:  {"id": "cmpl-...", "object": "text_completion", ..., "choices": [{"index": 0, "text",
                  "logprobs": null, "finish_reason"}], "usage"}

Two extensions that vLLM also accepts: `top_k` (sample from the k most likely tokens) and `ignore_eos` (decode
exactly max_tokens tokens, for benchmarks).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hayai.decode.sampling import SamplingParams

MAX_STOP_SEQUENCES = 16


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests ---------------------------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields (user, metadata, store, ...) are accepted and unused


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class _GenerationRequest(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False

    def sampling(self) -> SamplingParams:
        """Temperature defaults to 1 (OpenAI's default); top_p 0 means only the top token, i.e. greedy."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0:
            temperature, top_p = 0.0, 1.0
        seed = None if self.seed is None else self.seed % 2**63
        return SamplingParams(temperature=temperature, top_k=max(self.top_k or 0, 0), top_p=top_p, seed=seed)

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are supported",
                           param="stop")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """Raise a 400 for options that would change the answer but that this server does not implement."""
        if (self.n or 1) != 1:
            raise APIError(400, "only n=1 is supported; send concurrent requests instead (they are batched)",
                           param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; leave it at 0", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages with text content for the chat template ('developer' is OpenAI's newer name for 'system')."""
        out = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, got type "
                                       f"{part.get('type')!r}", param=f"messages.{i}.content")
                    texts.append(part["text"])
                content = "\n".join(texts)
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": content or ""})
        return out


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        if (self.best_of or 1) != 1:
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: text or token ids. Several prompts in one request are refused (send them concurrently)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request (concurrent "
                               "requests are batched)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return prompt


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; a 422 names every offending field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise APIError(422, validation_message(exc), param=_first_field(exc)) from None


def validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"] if not _is_type_tag(p)) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _first_field(exc: ValidationError) -> str | None:
    errors = exc.errors()
    if not errors:
        return None
    return ".".join(str(p) for p in errors[0]["loc"] if not _is_type_tag(p)) or None


def _is_type_tag(part: Any) -> bool:
    # pydantic reports which union member failed ("str", "list[int]", "function-after[...]"); not a field name.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


# ---- responses --------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def completion_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


class ChunkWriter:
    """Builds the server-sent events of one streamed response, chat or completion."""

    def __init__(self, kind: Literal["chat", "completion"], rid: str, model: str, include_usage: bool):
        self.kind, self.rid, self.model, self.include_usage = kind, rid, model, include_usage
        self.created = int(time.time())

    def _event(self, choices: list[dict[str, Any]], usage_value: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage_value
        return sse(chunk)

    def _choice(self, content: dict[str, Any] | str, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> bytes | None:
        """The opening chunk: the assistant role for chat (as OpenAI sends it), nothing for completions."""
        if self.kind != "chat":
            return None
        return self._event([self._choice({"role": "assistant", "content": ""}, None)])

    def text(self, text: str) -> bytes:
        return self._event([self._choice({"content": text} if self.kind == "chat" else text, None)])

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = self._event([self._choice({} if self.kind == "chat" else "", finish_reason)])
        if self.include_usage:
            out += self._event([], usage(prompt_tokens, completion_tokens))
        return out + DONE


DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
