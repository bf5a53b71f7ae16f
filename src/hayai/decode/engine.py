"""The generation engine: prefill, a decode loop over a static KV cache, streaming text, stop conditions, stats.

How tokens are produced after the prompt is a strategy (`DecodeStrategy`): plain autoregressive decoding here,
speculative and lookahead decoding elsewhere in `hayai.decode`. The engine owns everything strategies share:
cache allocation, context-window checks, end-of-sequence and stop strings, incremental detokenisation and timing.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hayai.decode.sampling import SamplingParams, select
from hayai.errors import ConfigError, ContextOverflowError
from hayai.models.kv_cache import KVCache
from hayai.models.llama import CausalLM, weight_bytes_read_per_token
from hayai.models.tokenizer import IncrementalDecoder, Tokenizer
from hayai.runtime import peak_memory_bytes


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # from the first generated token to the last
    target_forwards: int = 0  # forward passes of the model after prefill
    drafted_tokens: int = 0  # speculative strategies: tokens proposed
    accepted_tokens: int = 0  # speculative strategies: proposed tokens the target kept
    weight_bytes_per_forward: int = 0
    peak_memory_bytes: int = 0
    strategy: str = "autoregressive"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first (which prefill produces) per second of decoding."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens produced per target forward pass after prefill (1.0 for plain decoding)."""
        n = self.generated_tokens - 1
        return n / self.target_forwards if self.target_forwards else 0.0

    @property
    def weight_bandwidth(self) -> float:
        """Achieved weight-read bandwidth during decode, bytes/s."""
        if self.decode_seconds <= 0:
            return 0.0
        return self.weight_bytes_per_forward * self.target_forwards / self.decode_seconds

    def summary(self) -> str:
        parts = [
            f"prefill: {self.prompt_tokens} tok, {self.prefill_tokens_per_second:.1f} tok/s",
            f"decode: {self.generated_tokens} tok, {self.decode_tokens_per_second:.1f} tok/s",
        ]
        if self.strategy != "autoregressive" and self.target_forwards:
            parts.append(f"{self.strategy}: {self.tokens_per_forward:.2f} tok/forward")
        parts.append(f"peak mem {self.peak_memory_bytes / 1e9:.2f} GB")
        parts.append(f"weights {self.weight_bandwidth / 1e9:.1f} GB/s")
        return " | ".join(parts)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


class DecodeStrategy(ABC):
    """Produces the tokens that follow a prompt, one or more per `step`.

    `start` runs the prompt through the model (filling `cache`); each `step` returns the next accepted tokens
    (at least one). Strategies report their work through `stats` (target_forwards, drafted/accepted tokens).
    """

    name = "autoregressive"
    extra_cache_slots = 0  # positions a strategy may write beyond the accepted sequence (e.g. draft tokens)

    @abstractmethod
    def start(self, model: CausalLM, cache: KVCache, prompt: torch.Tensor, sampling: SamplingParams,
              generator: torch.Generator | None, stats: GenerationStats) -> None: ...

    @abstractmethod
    def step(self, max_tokens: int) -> list[int]:
        """The next tokens, at most `max_tokens` of them (>= 1)."""


class Autoregressive(DecodeStrategy):
    """One token per forward pass. The forward for a token runs only when the next token is asked for, so the
    last token costs no forward pass."""

    def start(self, model, cache, prompt, sampling, generator, stats):
        self.model, self.cache, self.sampling, self.generator, self.stats = model, cache, sampling, generator, stats
        hidden = model.hidden(prompt, cache=cache)  # [1, T, hidden]
        self.next_logits = model.logits(hidden[:, -1])  # [1, V]
        self.pending: torch.Tensor | None = None

    def step(self, max_tokens):
        if self.pending is not None:
            self.next_logits = self.model(self.pending[:, None], cache=self.cache)[:, -1]  # [1, V]
            self.stats.target_forwards += 1
        token = select(self.next_logits, self.sampling, self.generator)  # [1]
        self.pending = token
        return [int(token)]


class StopChecker:
    """Finds stop strings in streamed text and holds back text that may be the start of one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was found)."""
        self.text += delta
        if not self.stop:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        search_from = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, True
        safe = len(self.text) - self._partial_stop_suffix()
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Iterate for text deltas; `completion` holds the result once iteration ends."""

    def __init__(self, deltas: Iterator[str], finish: Callable[[], Completion]):
        self._deltas = deltas
        self._finish = finish
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._deltas
        self.completion = self._finish()


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._weight_bytes = weight_bytes_read_per_token(model)

    @property
    def context_length(self) -> int:
        return self.model.config.context_window

    def refresh_weight_bytes(self) -> None:
        """Recount the bytes a decode step reads (after quantizing or adding adapters)."""
        self._weight_bytes = weight_bytes_read_per_token(self.model)

    def check_fits(self, prompt_len: int, max_new_tokens: int, truncate: bool = False) -> int:
        """Return how many prompt tokens to keep; raise ContextOverflowError unless truncation was asked for."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.context_length
        if max_new_tokens >= limit:
            raise ContextOverflowError(f"max new tokens ({max_new_tokens}) must be below the context window "
                                       f"({limit} tokens)")
        if prompt_len + max_new_tokens <= limit:
            return prompt_len
        if truncate:
            return limit - max_new_tokens
        raise ContextOverflowError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the context window of "
            f"{limit} tokens; shorten the prompt, lower the max new tokens, or ask for truncation"
        )

    def stream(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
               sampling: SamplingParams | None = None, stop: Sequence[str] = (),
               strategy: DecodeStrategy | None = None, truncate: bool = False,
               stop_token_ids: set[int] | frozenset[int] | None = None) -> TextStream:
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        sampling = sampling or SamplingParams()
        strategy = strategy or Autoregressive()
        keep = self.check_fits(len(prompt_ids), max_new_tokens, truncate)
        prompt_ids = list(prompt_ids)[len(prompt_ids) - keep:]
        eos = self.tokenizer.eos_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), weight_bytes_per_forward=self._weight_bytes,
                                strategy=strategy.name)
        state = {"finish": "length"}
        tokens: list[int] = []
        checker = StopChecker(stop)
        text_parts: list[str] = []

        def deltas() -> Iterator[str]:
            model = self.model
            cache = model.new_cache(1, len(prompt_ids) + max_new_tokens + strategy.extra_cache_slots)
            prompt = torch.tensor([prompt_ids], device=model.device)
            with torch.inference_mode():
                t0 = time.perf_counter()
                strategy.start(model, cache, prompt, sampling, sampling.generator(model.device), stats)
                decoder = IncrementalDecoder(self.tokenizer)
                first_token_at = None
                stopped_by_string = False
                while len(tokens) < max_new_tokens:
                    new = strategy.step(max_new_tokens - len(tokens))
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        stats.prefill_seconds = first_token_at - t0
                    done = False
                    for token in new:
                        if token in eos:
                            state["finish"], done = "stop", True
                            break
                        tokens.append(token)
                    out, hit_stop = checker.push(decoder.push(tokens[len(decoder.ids):]))
                    if out:
                        text_parts.append(out)
                        yield out
                    if hit_stop:
                        state["finish"], stopped_by_string, done = "stop", True, True
                    if done:
                        break
                if not stopped_by_string:
                    tail, hit_stop = checker.push(decoder.flush())
                    tail += "" if hit_stop else checker.flush()
                    if tail:
                        text_parts.append(tail)
                        yield tail
                stats.decode_seconds = time.perf_counter() - (first_token_at or t0)
            stats.generated_tokens = len(tokens)
            stats.peak_memory_bytes = peak_memory_bytes(model.device)

        def finish() -> Completion:
            return Completion("".join(text_parts), tokens, state["finish"], stats)

        return TextStream(deltas(), finish)

    def generate(self, prompt_ids: Sequence[int], **kwargs) -> Completion:
        stream = self.stream(prompt_ids, **kwargs)
        for _ in stream:
            pass
        return stream.completion

    def generate_batch(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                       sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                       stop: Sequence[str] = (), truncate: bool = False,
                       stop_token_ids: set[int] | frozenset[int] | None = None) -> list[Completion]:
        """Decode several prompts together in one batch, each stopping on its own.

        Prompts are right-padded for one prefill pass, then every row decodes at its own position (the KV
        cache keeps per-row lengths). Finished rows are dropped from the batch once at most half remain, so
        short answers stop costing compute. Greedy outputs equal decoding each prompt alone.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt in the batch is empty")
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} sampling settings for {len(prompts)} prompts")
        prompts = [list(p)[len(p) - self.check_fits(len(p), max_new_tokens, truncate):] for p in prompts]
        eos = self.tokenizer.eos_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
        rows = [_BatchRow(i, p, params[i], StopChecker(stop), IncrementalDecoder(self.tokenizer))
                for i, p in enumerate(prompts)]
        for row in rows:
            row.stats = GenerationStats(prompt_tokens=len(row.prompt), weight_bytes_per_forward=self._weight_bytes,
                                        strategy="batched")
        model = self.model
        device = model.device
        generators = [p.generator(device) for p in params]
        width = max(len(p) for p in prompts)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = model.new_cache(len(rows), width + max_new_tokens)
            padded = torch.tensor([p + [self.tokenizer.pad_token_id] * (width - len(p)) for p in prompts],
                                  device=device)
            hidden = model.hidden(padded, cache=cache)  # [B, W, hidden]
            cache.truncate([len(p) for p in prompts])
            last = torch.tensor([len(p) - 1 for p in prompts], device=device)
            logits = model.logits(hidden[torch.arange(len(rows), device=device), last])  # [B, V]
            prefill_done = time.perf_counter()
            active = list(range(len(rows)))  # row indices, in cache-row order
            forwards = 0
            while active:
                tokens = [int(select(logits[j:j + 1], rows[i].params, generators[i]))
                          for j, i in enumerate(active)]
                for i, token in zip(active, tokens, strict=True):
                    rows[i].accept(token, eos, max_new_tokens)
                still = [j for j, i in enumerate(active) if not rows[i].done]
                if not still:
                    break
                if len(still) <= len(active) // 2:
                    cache = cache.select_rows(still)
                    active = [active[j] for j in still]
                    tokens = [tokens[j] for j in still]
                else:
                    # Finished rows keep decoding a pad token until the batch is compacted; their output is unused.
                    tokens = [t if not rows[i].done else self.tokenizer.pad_token_id
                              for t, i in zip(tokens, active, strict=True)]
                logits = model(torch.tensor(tokens, device=device)[:, None], cache=cache)[:, -1]
                forwards += 1
            end = time.perf_counter()
        peak = peak_memory_bytes(device)
        completions = []
        for row in rows:
            row.stats.prefill_seconds = prefill_done - t0
            row.stats.decode_seconds = end - prefill_done
            row.stats.target_forwards = forwards
            row.stats.generated_tokens = len(row.tokens)
            row.stats.peak_memory_bytes = peak
            completions.append(Completion(row.text(), row.tokens, row.finish, row.stats))
        return completions


@dataclass
class _BatchRow:
    index: int
    prompt: list[int]
    params: SamplingParams
    checker: StopChecker
    decoder: IncrementalDecoder
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    stats: GenerationStats | None = None
    _hit_stop_string: bool = False

    def accept(self, token: int, eos: frozenset[int], max_new_tokens: int) -> None:
        if self.done:
            return
        if token in eos:
            self.finish, self.done = "stop", True
            return
        self.tokens.append(token)
        _, hit = self.checker.push(self.decoder.push([token]))
        if hit:
            self.finish, self.done, self._hit_stop_string = "stop", True, True
        elif len(self.tokens) >= max_new_tokens:
            self.done = True

    def text(self) -> str:
        if not self._hit_stop_string:
            self.checker.push(self.decoder.flush())
        return self.checker.text
