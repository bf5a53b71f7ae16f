"""Continuous batching: requests join and leave the running batch between decode steps.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022): instead of decoding a fixed batch until its longest
member finishes, the scheduler decides again before every decode step. One engine thread loops over

    1. drop cancelled requests (a client that disconnected frees its row at once);
    2. admit waiting requests while rows are free; each is prefilled into a one-row staging cache, in chunks of at
       most `prefill_chunk` tokens per iteration so a long prompt does not stall everyone else's decoding
       (chunked prefill, Agrawal et al. 2023, "SARATHI"), and its KV is copied into a free row of the shared
       cache when its prefill completes;
    3. one decode step for every running row at once: tokens [n, 1] -> logits [n, V]. Rows hold sequences of
       different lengths; the KV cache keeps per-row lengths and masks each row to its own positions;
    4. rows that finished (end of sequence, a stop string, max tokens) leave; the last running row moves into the
       hole, so running rows are always rows 0 .. n-1 and a step computes exactly n rows.

Greedy decoding of a request gives the tokens `Engine.generate` gives for it alone: the same prompt forward, the
same per-token decode, only batched with others (equal up to floating-point summation order). Per-request
sampling parameters and seeds are kept: each request has its own `torch.Generator`.

With a per-request `strategy` (speculative decoding: several tokens per target pass for one sequence), requests
are not batched: each keeps its own cache and strategy, and running requests take turns, one `step` each.
Speculation pays at low concurrency; batching pays at high concurrency (vLLM's docs say the same).

Waiting requests live in a bounded queue; a submission that finds it full raises `QueueFullError` with a
suggested retry delay (the HTTP layer answers 503 with Retry-After) instead of letting latency grow without
bound. Results go to a per-request `sink` callback, called on the engine thread (keep it cheap: the HTTP layer
hands events to its event loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hayai.decode.engine import Completion, DecodeStrategy, GenerationStats, StopChecker
from hayai.decode.sampling import SamplingParams, select
from hayai.errors import ConfigError, ContextOverflowError, HayaiError
from hayai.models.kv_cache import KVCache
from hayai.models.llama import CausalLM, weight_bytes_read_per_token
from hayai.models.tokenizer import IncrementalDecoder, Tokenizer


class QueueFullError(HayaiError):
    """Every batch row is busy and the waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosedError(HayaiError):
    """The scheduler is shutting down and takes no more requests."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request. `stop_token_ids` None means the tokenizer's end-of-sequence ids."""

    prompt_ids: Sequence[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_token_ids: frozenset[int] | None = None


@dataclass
class TextEvent:
    """New text for the client (stop strings already held back) and the number of tokens generated so far."""

    text: str
    completion_tokens: int


@dataclass
class FinishEvent:
    """The request is complete: text, token ids, finish reason ("stop" or "length") and timings."""

    completion: Completion
    queued_seconds: float  # from submission to the start of prefill
    first_token_seconds: float  # from submission to the first token


@dataclass
class ErrorEvent:
    message: str


Event = TextEvent | FinishEvent | ErrorEvent
Sink = Callable[[Event], None]


@dataclass
class SchedulerStats:
    running: int  # rows decoding
    prefilling: int  # rows being prefilled
    waiting: int  # requests in the queue
    max_batch: int
    max_queue: int
    cache_rows: int  # rows the shared KV cache holds now (0 when released)
    cache_length: int  # positions per row the shared KV cache holds now
    completed: int
    cancelled: int
    failed: int
    decode_steps: int
    generated_tokens: int


_ids = itertools.count(1)


class Ticket:
    """A submitted request. `cancel()` (any thread) frees its row before the next decode step."""

    def __init__(self, request: GenerationRequest, sink: Sink, scheduler: Scheduler):
        self.id = next(_ids)
        self.request = request
        self.sink = sink
        self.submitted_at = time.perf_counter()
        self._scheduler = scheduler
        self.cancelled = False
        self.finished = False  # set on the engine thread once the last event was sent

    def cancel(self) -> None:
        self._scheduler._cancel(self)


class _Sequence:
    """A request being prefilled or decoded: its tokens, text state and timings."""

    def __init__(self, ticket: Ticket, tokenizer: Tokenizer, sampling_device: torch.device):
        request = ticket.request
        self.ticket = ticket
        self.prompt = list(request.prompt_ids)
        self.params = request.sampling
        self.generator = request.sampling.generator(sampling_device)
        self.eos = tokenizer.eos_token_ids if request.stop_token_ids is None else request.stop_token_ids
        self.checker = StopChecker(request.stop)
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens: list[int] = []
        self.finish = "length"
        self.done = False
        self.hit_stop_string = False
        self.text_parts: list[str] = []
        self.pending: int | None = None  # the last accepted token, fed to the next decode step
        self.prefilled = 0  # prompt tokens already in the staging cache
        self.staging: KVCache | None = None
        self.decoder_strategy: DecodeStrategy | None = None  # only with a per-request strategy
        self.stats: GenerationStats | None = None
        self.forwards = 0
        self.started_at = 0.0
        self.first_token_at = 0.0

    def accept(self, token: int) -> str:
        """Record a sampled token; return the text it makes safe to emit. Sets `done` when the request ends."""
        if token in self.eos:
            self.finish, self.done = "stop", True
            return self._flush()
        self.tokens.append(token)
        text, hit = self.checker.push(self.decoder.push([token]))
        if hit:
            self.finish, self.done, self.hit_stop_string = "stop", True, True
        elif len(self.tokens) >= self.ticket.request.max_tokens:
            self.done = True
            text += self._flush()
        self.pending = token
        return text

    def _flush(self) -> str:
        tail, hit = self.checker.push(self.decoder.flush())
        if hit:
            self.hit_stop_string = True
            return tail
        return tail + self.checker.flush()


class Scheduler:
    """Serve many generation requests with one model on one engine thread (continuous batching).

    max_batch: rows decoded together. max_queue: requests that may wait for a row. max_length: positions a request
    may use (prompt + new tokens; default the model's context window). prefill_chunk: prompt tokens prefilled per
    iteration. The shared KV cache is allocated as sequences actually grow (rows and positions each doubling, from
    one row of `initial_length` positions; a max_tokens that is never reached costs nothing) and released when the
    server is idle, so memory follows the load; `cache_bytes_at_full_load()` is the most it can reach.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 max_length: int | None = None, prefill_chunk: int = 512, initial_length: int = 512,
                 strategy: Callable[[], DecodeStrategy] | None = None):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        context = model.config.context_window
        if max_length is not None and not 1 < max_length <= context:
            raise ConfigError(f"max_length must be in 2..{context} (the model's context window), got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_length = max_length or context
        self.prefill_chunk = prefill_chunk
        self.initial_length = min(initial_length, self.max_length)
        self.strategy = strategy
        self._weight_bytes = weight_bytes_read_per_token(model)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cancelled: set[int] = set()  # ticket ids cancelled while admitted (read by the engine thread)
        self._closing = False
        self._thread: threading.Thread | None = None

        # Owned by the engine thread.
        self._cache: KVCache | None = None
        self._running: list[_Sequence] = []  # row i of the cache holds _running[i]
        self._prefilling: list[_Sequence] = []
        self._mean_service_seconds = 1.0
        self._counts = collections.Counter()

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hayai-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still queued or running get an ErrorEvent."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("the server is shutting down")

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submitting ---------------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise a HayaiError when the request can never run here (empty prompt, too long, bad max_tokens)."""
        if not request.prompt_ids:
            raise ConfigError("the prompt is empty")
        if request.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {request.max_tokens}")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.max_length:
            raise ContextOverflowError(
                f"the prompt has {len(request.prompt_ids)} tokens and {request.max_tokens} new tokens were asked "
                f"for, {total} in all; this server allows at most {self.max_length} per request")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ConfigError(f"prompt token ids must be in 0..{vocab - 1}")

    def submit(self, request: GenerationRequest, sink: Sink) -> Ticket:
        """Queue a request; events go to `sink` on the engine thread. Raises QueueFullError when full."""
        self.check(request)
        ticket = Ticket(request, sink, self)
        with self._lock:
            if self._closing:
                raise SchedulerClosedError("the server is shutting down")
            if len(self._waiting) >= self.max_queue and not self._has_free_row_locked():
                raise QueueFullError(
                    f"the server is busy: {self.max_batch} requests running and {len(self._waiting)} waiting "
                    f"(the queue holds {self.max_queue}); retry later", self._retry_after_locked())
            self._waiting.append(ticket)
            self._wake.notify_all()
        return ticket

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """Submit and wait for the result (any thread but the engine thread)."""
        done = threading.Event()
        result: list[Event] = []

        def sink(event: Event) -> None:
            if not isinstance(event, TextEvent):
                result.append(event)
                done.set()

        ticket = self.submit(request, sink)
        if not done.wait(timeout):
            ticket.cancel()
            raise TimeoutError(f"no result within {timeout} s")
        event = result[0]
        if isinstance(event, ErrorEvent):
            raise HayaiError(event.message)
        return event.completion

    def stats(self) -> SchedulerStats:
        with self._lock:
            waiting = len(self._waiting)
        cache = self._cache
        return SchedulerStats(
            running=len(self._running), prefilling=len(self._prefilling), waiting=waiting,
            max_batch=self.max_batch, max_queue=self.max_queue,
            cache_rows=cache.batch_size if cache is not None else 0,
            cache_length=cache.max_length if cache is not None else 0,
            completed=self._counts["completed"], cancelled=self._counts["cancelled"], failed=self._counts["failed"],
            decode_steps=self._counts["decode_steps"], generated_tokens=self._counts["generated_tokens"])

    def _cancel(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.cancelled or ticket.finished:
                return
            ticket.cancelled = True
            try:
                self._waiting.remove(ticket)
                self._counts["cancelled"] += 1
            except ValueError:  # already admitted: the engine thread drops it before its next step
                self._cancelled.add(ticket.id)
            self._wake.notify_all()

    def _has_free_row_locked(self) -> bool:
        # Waiting requests are admitted as soon as a row frees, so a non-empty queue means no free row; an empty
        # queue with free rows admits at the next iteration.
        return not self._waiting and len(self._running) + len(self._prefilling) < self.max_batch

    def _retry_after_locked(self) -> int:
        """Seconds until a queue slot is likely free: the mean request time per row ahead of us."""
        ahead = len(self._waiting) + 1
        return max(1, min(60, math.ceil(self._mean_service_seconds * ahead / self.max_batch)))

    # ---- the engine thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closing and not (self._waiting or self._running or self._prefilling):
                        self._shrink_when_idle()
                        self._wake.wait()
                    if self._closing:
                        return
                    self._admit_locked()
                    cancelled, self._cancelled = self._cancelled, set()
                try:
                    self._drop(cancelled)
                    self._prefill()
                    self._decode_step()
                except Exception as exc:  # a bug: fail what is in flight rather than hang every client
                    self._fail_running(f"internal error: {type(exc).__name__}: {exc}")

    def _admit_locked(self) -> None:
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
            ticket = self._waiting.popleft()
            seq = _Sequence(ticket, self.tokenizer, self.model.device)
            seq.started_at = time.perf_counter()
            self._prefilling.append(seq)

    def _drop(self, cancelled: set[int]) -> None:
        if not cancelled:
            return
        kept = [s for s in self._prefilling if s.ticket.id not in cancelled]
        dropped = len(self._prefilling) - len(kept)
        self._prefilling = kept
        for row in reversed(range(len(self._running))):
            if self._running[row].ticket.id in cancelled:
                if self.strategy is None:
                    self._release_row(row)
                else:
                    self._running.pop(row)
                dropped += 1
        self._counts["cancelled"] += dropped

    def _prefill(self) -> None:
        """Prefill waiting sequences, at most `prefill_chunk` prompt tokens this iteration (at least one chunk)."""
        if self.strategy is not None:
            self._start_strategies()
            return
        budget = self.prefill_chunk
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.staging is None:
                seq.staging = self.model.new_cache(1, len(seq.prompt))
            end = min(len(seq.prompt), seq.prefilled + budget)
            chunk = torch.tensor([seq.prompt[seq.prefilled:end]], device=self.model.device)  # [1, t]
            hidden = self.model.hidden(chunk, cache=seq.staging)  # [1, t, hidden]
            budget -= end - seq.prefilled
            seq.prefilled = end
            if end < len(seq.prompt):
                continue
            logits = self.model.logits(hidden[:, -1])  # [1, V]
            self._prefilling.remove(seq)
            seq.first_token_at = time.perf_counter()
            token = int(select(logits, seq.params, seq.generator))
            self._emit(seq, seq.accept(token))
            if seq.done:
                self._finish(seq)
                continue
            self._join(seq)

    def _join(self, seq: _Sequence) -> None:
        """Copy a prefilled sequence's KV into the next free row of the shared cache."""
        row = len(self._running)
        self._ensure_capacity(row + 1, len(seq.prompt) + 1)  # the next decode step writes position len(prompt)
        self._cache.copy_prefix_from(seq.staging, len(seq.prompt), src_row=0, dst_row=row)
        seq.staging = None
        self._running.append(seq)

    def _decode_step(self) -> None:
        n = len(self._running)
        if n == 0:
            return
        if self.strategy is not None:
            self._step_strategies()
            return
        device = self.model.device
        tokens = torch.tensor([[s.pending] for s in self._running], device=device)  # [n, 1]
        self._ensure_capacity(n, max(self._cache.lengths[:n]) + 1)
        view = self._leading_rows(n)
        logits = self.model(tokens, cache=view)[:, -1]  # [n, V]
        self._cache.lengths[:n] = view.lengths
        self._counts["decode_steps"] += 1
        greedy = logits.argmax(dim=-1).tolist()  # one host sync for every greedy row
        finished = []
        for row, seq in enumerate(self._running):
            seq.forwards += 1
            sampled = greedy[row] if seq.params.greedy else select(logits[row:row + 1], seq.params, seq.generator)
            token = int(sampled)
            self._emit(seq, seq.accept(token))
            if seq.done:
                finished.append(row)
        for row in reversed(finished):
            seq = self._running[row]
            self._release_row(row)
            self._finish(seq)

    def _emit(self, seq: _Sequence, text: str) -> None:
        if text:
            seq.text_parts.append(text)
            seq.ticket.sink(TextEvent(text, len(seq.tokens)))

    def _finish(self, seq: _Sequence) -> None:
        end = time.perf_counter()
        ticket = seq.ticket
        stats = seq.stats or GenerationStats(prompt_tokens=len(seq.prompt), target_forwards=seq.forwards,
                                             weight_bytes_per_forward=self._weight_bytes,
                                             strategy="continuous-batching")
        stats.generated_tokens = len(seq.tokens)
        stats.prefill_seconds = seq.first_token_at - seq.started_at
        stats.decode_seconds = end - seq.first_token_at
        completion = Completion("".join(seq.text_parts), seq.tokens, seq.finish, stats)
        self._counts["completed"] += 1
        self._counts["generated_tokens"] += len(seq.tokens)
        service = end - seq.started_at
        self._mean_service_seconds = 0.8 * self._mean_service_seconds + 0.2 * service
        ticket.finished = True
        ticket.sink(FinishEvent(completion, seq.started_at - ticket.submitted_at,
                                seq.first_token_at - ticket.submitted_at))

    # ---- per-request strategies (speculative decoding): interleaved, not batched ----------------------------------
    def _start_strategies(self) -> None:
        """Each admitted request gets its own strategy and cache; `start` runs its whole prompt."""
        budget = self.prefill_chunk
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            strategy = self.strategy()
            request = seq.ticket.request
            cache = self.model.new_cache(1, len(seq.prompt) + request.max_tokens + strategy.extra_cache_slots)
            seq.stats = GenerationStats(prompt_tokens=len(seq.prompt), weight_bytes_per_forward=self._weight_bytes,
                                        strategy=strategy.name)
            prompt = torch.tensor([seq.prompt], device=self.model.device)  # [1, T]
            strategy.start(self.model, cache, prompt, seq.params, seq.generator, seq.stats)
            seq.decoder_strategy = strategy
            budget -= len(seq.prompt)
            self._prefilling.remove(seq)
            self._running.append(seq)

    def _step_strategies(self) -> None:
        """One `step` of every running request in turn (each may return several tokens)."""
        for seq in list(self._running):
            new = seq.decoder_strategy.step(seq.ticket.request.max_tokens - len(seq.tokens))
            if not seq.first_token_at:
                seq.first_token_at = time.perf_counter()
            for token in new:
                self._emit(seq, seq.accept(token))
                if seq.done:
                    break
            if seq.done:
                self._running.remove(seq)
                self._finish(seq)
        self._counts["decode_steps"] += 1

    # ---- the shared cache ---------------------------------------------------------------------------------------
    def _leading_rows(self, n: int) -> KVCache:
        """A cache over rows 0..n-1 of the shared cache that writes into it (views, no copies)."""
        cache = self._cache
        if n == cache.batch_size:
            return cache
        view = copy.copy(cache)
        view.keys = [k[:n] for k in cache.keys]  # [n, H_kv, L, D] views
        view.values = [v[:n] for v in cache.values]
        view.lengths = cache.lengths[:n]
        return view

    def _release_row(self, row: int) -> None:
        """Free a row: the last running row moves into it, so running rows stay 0..n-1."""
        last = len(self._running) - 1
        cache = self._cache
        if row != last:
            cache.copy_prefix_from(cache, cache.lengths[last], src_row=last, dst_row=row)
            self._running[row] = self._running[last]
        self._running.pop()
        lengths = list(cache.lengths)
        lengths[last] = 0
        cache.truncate(lengths)

    def _ensure_capacity(self, rows: int, length: int) -> None:
        """Grow the shared cache (doubling rows and positions, up to the limits) so it holds `rows` x `length`."""
        cache = self._cache
        if cache is not None and cache.batch_size >= rows and cache.max_length >= length:
            return
        new_rows, new_length = rows, max(length, self.initial_length)
        if cache is not None:
            new_rows = max(rows, min(2 * cache.batch_size, self.max_batch)) if rows > cache.batch_size \
                else cache.batch_size
            new_length = max(length, min(2 * cache.max_length, self.max_length)) if length > cache.max_length \
                else cache.max_length
        grown = self.model.new_cache(min(new_rows, self.max_batch), min(new_length, self.max_length))
        if cache is not None:
            for row in range(len(self._running)):
                grown.copy_prefix_from(cache, cache.lengths[row], src_row=row, dst_row=row)
        self._cache = grown

    def _shrink_when_idle(self) -> None:
        """With nothing running, drop a cache that grew past its initial size (called holding the lock)."""
        cache = self._cache
        if cache is not None and (cache.max_length > self.initial_length or cache.batch_size > 1):
            self._cache = None

    def cache_bytes_at_full_load(self) -> int:
        """KV-cache memory with every row holding a request of the longest allowed length."""
        config = self.model.config
        per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_position * self.max_batch * self.max_length * self.model.dtype.itemsize

    # ---- failures -----------------------------------------------------------------------------------------------
    def _fail_running(self, message: str) -> None:
        for seq in self._running + self._prefilling:
            self._counts["failed"] += 1
            seq.ticket.finished = True
            seq.ticket.sink(ErrorEvent(message))
        self._running, self._prefilling = [], []
        self._cache = None

    def _fail_all(self, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._fail_running(message)
        for ticket in waiting:
            self._counts["failed"] += 1
            ticket.finished = True
            ticket.sink(ErrorEvent(message))
