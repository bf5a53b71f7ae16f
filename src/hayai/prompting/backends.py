"""Backends: one small protocol for "complete these prompts", over the local engine or an OpenAI-compatible server.

Every prompting technique (Skeleton-of-Thought, Batch Prompting, FrugalGPT cascades) talks to a model only
through `Backend.complete(prompts, params) -> list[Result]`. A prompt is either

- a string: raw text to continue (the `/v1/completions` endpoint remotely, no chat template locally), or
- a list of chat messages `{"role", "content"}`; when the last message is the assistant's, its content is a
  pre-filled prefix the model continues (Skeleton-of-Thought's "1." trick).

Every result carries the text, the token usage, the latency and the cost. Cost is configuration, not code:

    cost = price.input · prompt_tokens / 1e6 + price.output · completion_tokens / 1e6 + price.request

with prices in currency units per million tokens (the way API price lists quote them), read from a JSON or TOML
file or a dict keyed by model name (`PriceTable`).

`LocalBackend` decodes a whole list of prompts as one batch on the hayai engine (per-row stopping, greedy
outputs equal to one-at-a-time decoding). `OpenAIBackend` sends concurrent requests through the official
`openai` client to any OpenAI-compatible server (OpenAI, vLLM, llama.cpp's server, `hayai serve`).
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hayai.decode.engine import Engine
from hayai.decode.sampling import SamplingParams
from hayai.errors import ConfigError, HayaiError
from hayai.models.tokenizer import Message

Prompt = str | Sequence[Message]


class BackendError(HayaiError):
    """A backend could not complete a request (server unreachable, bad model name, rejected request)."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters, results, prices
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters shared by every backend (and part of every cache key)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))
        self.sampling()  # validates temperature / top_p

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass
class Result:
    """One completion with its accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # wall time of the call that produced it (a whole batch locally, one request remotely)
    cost: float  # nominal cost of producing it, from the backend's price
    finish_reason: str = "stop"
    backend: str = ""
    cached: bool = False  # served from a CompletionCache: no backend call was made for it

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Price:
    """Currency units per million prompt / completion tokens, plus a fixed amount per request."""

    input: float = 0.0
    output: float = 0.0
    request: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.input * prompt_tokens / 1e6 + self.output * completion_tokens / 1e6 + self.request


@dataclass
class PriceTable:
    """Prices by model name, from a dict or a JSON/TOML file: {"model": {"input": .., "output": .., "request": ..}}."""

    prices: dict[str, Price] = field(default_factory=dict)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> PriceTable:
        prices = {}
        for model, entry in data.items():
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{source}: the price of {model!r} must be a table with input/output/request")
            unknown = set(entry) - {"input", "output", "request"}
            if unknown:
                raise ConfigError(f"{source}: unknown field(s) {sorted(unknown)} in the price of {model!r} "
                                  f"(expected input, output, request: per million tokens / per request)")
            try:
                prices[model] = Price(**{k: float(v) for k, v in entry.items()})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: the price of {model!r} must hold numbers ({exc})") from None
        return cls(prices, source)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the price file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
        return cls.from_dict(data, str(path))

    def __getitem__(self, model: str) -> Price:
        if model not in self.prices:
            raise ConfigError(f"{self.source}: no price for model {model!r} (known: {sorted(self.prices)})")
        return self.prices[model]


def resolve_price(price: Price | PriceTable | Mapping[str, Any] | str | Path | None, model: str) -> Price:
    """A Price given directly, looked up by model in a table / dict / file, or zero when none is given."""
    if price is None:
        return Price()
    if isinstance(price, Price):
        return price
    if isinstance(price, (str, Path)):
        price = PriceTable.load(price)
    elif isinstance(price, Mapping):
        price = PriceTable.from_dict(price)
    return price[model]


# ---------------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """Completes prompts. `id` names the backend and model (it is part of cache keys)."""

    id: str

    def complete(self, prompts: Sequence[Prompt], params: GenParams) -> list[Result]:
        """One Result per prompt, in order."""
        ...


def check_prompt(prompt: Prompt, index: int) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, Sequence) or not prompt:
        raise ConfigError(f"prompt {index} must be a string or a non-empty list of chat messages")
    for j, message in enumerate(prompt):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ConfigError(f"prompt {index}, message {j}: expected {{'role': ..., 'content': ...}}, "
                              f"got {message!r:.80}")


# ---------------------------------------------------------------------------------------------------------------
# Local engine
# ---------------------------------------------------------------------------------------------------------------


class LocalBackend:
    """The hayai engine: each `complete` call decodes its prompts together, `max_batch` at a time."""

    def __init__(self, engine: Engine, name: str, *, price: Price | PriceTable | Mapping | str | Path | None = None,
                 max_batch: int = 32):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.name = name
        self.id = f"local:{name}"
        self.price = resolve_price(price, name)
        self.max_batch = max_batch

    @classmethod
    def of(cls, llm: Any, *, name: str | None = None, **kwargs: Any) -> LocalBackend:
        """From a `hayai.load(...)` LLM (anything with `.engine` and `.info.name`)."""
        return cls(llm.engine, name or llm.info.name, **kwargs)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Raw text as is; chat through the template, a final assistant message continued as a prefix."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        messages = list(prompt)
        prefill = ""
        if messages[-1]["role"] == "assistant":
            prefill = messages.pop()["content"]
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return ids + (self.tokenizer.encode(prefill, add_special_tokens=False) if prefill else [])

    def complete(self, prompts: Sequence[Prompt], params: GenParams) -> list[Result]:
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, i)
        ids = [self.prompt_ids(p) for p in prompts]
        results: list[Result] = []
        for start in range(0, len(ids), self.max_batch):
            chunk = ids[start:start + self.max_batch]
            t0 = time.perf_counter()
            completions = self.engine.generate_batch(chunk, max_new_tokens=params.max_tokens,
                                                     sampling=params.sampling(), stop=params.stop)
            latency = time.perf_counter() - t0
            for prompt_ids, c in zip(chunk, completions, strict=True):
                n_in, n_out = len(prompt_ids), len(c.token_ids)
                results.append(Result(c.text, n_in, n_out, latency, self.price.cost(n_in, n_out),
                                      c.finish_reason, self.id))
        return results


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# ---------------------------------------------------------------------------------------------------------------


class OpenAIBackend:
    """Any OpenAI-compatible server through the official `openai` client; a call's requests run concurrently.

    Strings go to `/v1/completions`, message lists to `/v1/chat/completions`. A final assistant message is sent
    as is; servers that continue it need a flag in the request body (vLLM: `continue_final_message=True,
    add_generation_prompt=False`), which `prefill_body` adds to such requests.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 price: Price | PriceTable | Mapping | str | Path | None = None, max_concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 2, extra_body: Mapping[str, Any] | None = None,
                 prefill_body: Mapping[str, Any] | None = None):
        try:
            import openai
        except ImportError:
            raise ConfigError("the OpenAI backend needs the `openai` package: pip install 'hayai[prompting]'") \
                from None
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = model
        self.base_url = base_url
        # Local servers need no key, but the client insists on one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.id = f"openai:{base_url or 'api.openai.com'}:{model}"
        self.price = resolve_price(price, model)
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self.prefill_body = dict(prefill_body or {})
        self._openai = openai

    def complete(self, prompts: Sequence[Prompt], params: GenParams) -> list[Result]:
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, i)
        if len(prompts) <= 1 or self.max_concurrency == 1:
            return [self._one(p, params) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self._one(p, params), prompts))

    def _one(self, prompt: Prompt, params: GenParams) -> Result:
        common: dict[str, Any] = {"model": self.model, "max_tokens": params.max_tokens,
                                  "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            common["seed"] = params.seed
        if params.stop:
            common["stop"] = list(params.stop)
        body = dict(self.extra_body)
        t0 = time.perf_counter()
        try:
            if isinstance(prompt, str):
                response = self.client.completions.create(prompt=prompt, extra_body=body or None, **common)
                choice = response.choices[0]
                text = choice.text
            else:
                messages = [dict(m) for m in prompt]
                if messages[-1]["role"] == "assistant":
                    body.update(self.prefill_body)
                response = self.client.chat.completions.create(messages=messages, extra_body=body or None,
                                                               **common)
                choice = response.choices[0]
                text = choice.message.content or ""
        except self._openai.APIError as exc:
            raise BackendError(f"{self.id}: {exc}") from None
        latency = time.perf_counter() - t0
        usage = response.usage
        if usage is None:
            raise BackendError(f"{self.id}: the server reported no token usage, so the cost is unknown")
        n_in, n_out = usage.prompt_tokens, usage.completion_tokens
        return Result(text, n_in, n_out, latency, self.price.cost(n_in, n_out), choice.finish_reason or "stop",
                      self.id)


def total_cost(results: Sequence[Result]) -> float:
    return sum(r.cost for r in results)
