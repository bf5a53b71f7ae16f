"""Speculative decoding for a batch of prompts: ragged drafts, one target pass per step for every row.

Each step, every running row b proposes k_b drafted tokens (prompt lookup per row, or one batched draft
model), the rows are right-padded to the longest draft, and the target verifies all of them in one pass:

    ids [B, K+1] = [c_b,last, x̃_b,1 .. x̃_b,k_b, pad ..]           (K = max_b k_b)

Because the KV cache keeps a length per row and always appends after it, row b's tokens sit at its own
positions, padding lands after them (no real token attends to it, causal masking by position), and rollback
is per row: `truncate(len(c_b) + accepted_b)`. Each row is verified on its own k_b + 1 logits with the
single-sequence rules (`hayai.decode.rejection`), keeps its own adaptive draft length, sampling settings and
generator, and stops on its own; finished rows are dropped from the batch once at most half remain.
Greedy outputs equal decoding each prompt alone (transformers' assisted generation does not support batches:
issues #32165, #26875, #32189).

`BatchedDraftModel` drafts for every row with one draft forward pass per drafted position: the draft's cache
is batched too, and its catch-up (feeding each row what its cache has not seen) is one ragged, right-padded pass.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hayai.decode.candidates import CandidateSource, Draft, cut_at_stop
from hayai.decode.draft_length import DraftLength
from hayai.decode.draft_model import common_prefix_length
from hayai.decode.engine import Completion, Engine, GenerationStats, StopChecker
from hayai.decode.rejection import greedy_verify, sample_verify
from hayai.decode.sampling import SamplingParams, probabilities, select
from hayai.errors import ConfigError
from hayai.models.kv_cache import KVCache
from hayai.models.llama import CausalLM
from hayai.models.tokenizer import IncrementalDecoder


class BatchCandidateSource(ABC):
    """Proposes drafts for the rows of a batch (row i of every call is row i of the target's cache)."""

    name = "candidates"

    @abstractmethod
    def start(self, target: CausalLM, target_cache: KVCache, prompts: list[list[int]],
              sampling: list[SamplingParams], generators: list[torch.Generator | None]) -> None: ...

    @abstractmethod
    def propose(self, contexts: list[list[int]], max_tokens: list[int]) -> list[Draft]:
        """One draft per row, at most max_tokens[i] tokens for row i (0: no draft wanted)."""

    def retain(self, rows: list[int]) -> None:  # noqa: B027 (an optional hook)
        """The batch keeps only these rows (in this order)."""

    @property
    def draft_forwards(self) -> int:
        return 0


class PerRow(BatchCandidateSource):
    """One single-sequence `CandidateSource` per row (for model-free sources such as prompt lookup)."""

    def __init__(self, factory: Callable[[], CandidateSource]):
        self.factory = factory
        self.name = factory().name

    def start(self, target, target_cache, prompts, sampling, generators):
        self.sources = [self.factory() for _ in prompts]
        if any(getattr(s, "share_cache", False) for s in self.sources):
            raise ConfigError(f"{self.name}: a draft writing into the target's cache cannot draft per row of a batch")
        for source, prompt, params, generator in zip(self.sources, prompts, sampling, generators, strict=True):
            source.start(target, target_cache, prompt, params, generator)

    def propose(self, contexts, max_tokens):
        return [s.propose(c, k) if k > 0 else Draft([])
                for s, c, k in zip(self.sources, contexts, max_tokens, strict=True)]

    def retain(self, rows):
        self.sources = [self.sources[r] for r in rows]


class BatchedDraftModel(BatchCandidateSource):
    """A draft model drafting for every row at once (see the module docstring)."""

    name = "draft"

    def __init__(self, model: CausalLM, num_tokens: int = 5, stop_token_ids: frozenset[int] = frozenset(),
                 pad_token_id: int = 0):
        if num_tokens < 1:
            raise ConfigError(f"draft num_tokens must be >= 1, got {num_tokens}")
        self.model, self.num_tokens = model, num_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.pad = pad_token_id
        self._forwards = 0

    @property
    def draft_forwards(self) -> int:
        return self._forwards

    def start(self, target, target_cache, prompts, sampling, generators):
        self.sampling, self.generators = sampling, generators
        self.vocab_size = target.config.vocab_size
        self.cache = self.model.new_cache(len(prompts), target_cache.max_length)
        self.ids: list[list[int]] = [[] for _ in prompts]
        self._forwards = 0

    def retain(self, rows):
        self.cache = self.cache.select_rows(rows)
        self.ids = [self.ids[r] for r in rows]
        self.sampling = [self.sampling[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]

    def _forward(self, feeds: list[list[int]]) -> torch.Tensor:
        """Feed each row its tokens (right-padded to one pass); -> logits [B, V] after each row's last token."""
        width = max(len(f) for f in feeds)
        start = list(self.cache.lengths)
        ids = torch.tensor([f + [self.pad] * (width - len(f)) for f in feeds], device=self.model.device)
        hidden = self.model.hidden(ids, cache=self.cache)  # [B, width, hidden]
        last = torch.tensor([len(f) - 1 for f in feeds], device=ids.device)
        logits = self.model.logits(hidden[torch.arange(len(feeds), device=ids.device), last]).float()  # [B, V]
        self.cache.truncate([s + len(f) for s, f in zip(start, feeds, strict=True)])  # padding is not kept
        self._forwards += 1
        if logits.shape[-1] < self.vocab_size:
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))
        return logits

    def propose(self, contexts, max_tokens):
        rows = len(contexts)
        k_max = min(self.num_tokens, max(max_tokens))
        if k_max < 1:
            return [Draft([]) for _ in range(rows)]
        keep = [min(common_prefix_length(ids, c), len(c) - 1) for ids, c in zip(self.ids, contexts, strict=True)]
        self.cache.truncate(keep)
        feeds = [c[k:] for c, k in zip(contexts, keep, strict=True)]  # at least the last context token
        self.ids = [list(c) for c in contexts]
        logits = self._forward(feeds)
        drafts: list[list[int]] = [[] for _ in range(rows)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        for j in range(k_max):
            for r in range(rows):
                params = self.sampling[r]
                if params.greedy:
                    token = int(logits[r].argmax())
                else:
                    q = probabilities(logits[r], params)  # [V]
                    token = int(torch.multinomial(q, 1, generator=self.generators[r]))
                    probs[r].append(q)
                drafts[r].append(token)
            if j < k_max - 1:
                logits = self._forward([[d[-1]] for d in drafts])
        out = []
        for r in range(rows):
            tokens = cut_at_stop(drafts[r][: min(max_tokens[r], self.num_tokens)], self.stop_token_ids)
            # every row was fed d_1 .. d_{k_max-1}; the first len(tokens)-1 of them are this row's own draft
            self.ids[r] += tokens[: max(0, len(tokens) - 1)]
            out.append(Draft(tokens, torch.stack(probs[r][: len(tokens)]) if probs[r] and tokens else None))
        self.cache.truncate([len(ids) for ids in self.ids])
        return out


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    checker: StopChecker
    decoder: IncrementalDecoder
    draft_length: DraftLength
    context: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    hit_stop_string: bool = False
    drafted: int = 0
    accepted: int = 0

    def accept(self, new: list[int], eos: frozenset[int], max_new_tokens: int) -> None:
        for token in new:
            if self.done:
                return
            if token in eos:
                self.finish, self.done = "stop", True
                return
            self.tokens.append(token)
            _, hit = self.checker.push(self.decoder.push([token]))
            if hit:
                self.finish, self.done, self.hit_stop_string = "stop", True, True
            elif len(self.tokens) >= max_new_tokens:
                self.done = True

    def text(self) -> str:
        if not self.hit_stop_string:
            self.checker.push(self.decoder.flush())
        return self.checker.text


class BatchedSpeculativeDecoding:
    """Greedy or sampled speculative decoding of several prompts in one batch (see the module docstring)."""

    def __init__(self, engine: Engine, source: BatchCandidateSource,
                 draft_length: Callable[[], DraftLength] | None = None):
        self.engine = engine
        self.source = source
        self.draft_length = draft_length or DraftLength

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None, stop: Sequence[str] = (),
                 truncate: bool = False, stop_token_ids: set[int] | frozenset[int] | None = None) -> list[Completion]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt in the batch is empty")
        engine, model = self.engine, self.engine.model
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} sampling settings for {len(prompts)} prompts")
        prompts = [list(p)[len(p) - engine.check_fits(len(p), max_new_tokens, truncate):] for p in prompts]
        eos = engine.tokenizer.eos_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
        device = model.device
        rows = [_Row(p, s, s.generator(device), StopChecker(stop), IncrementalDecoder(engine.tokenizer),
                     self.draft_length()) for p, s in zip(prompts, params, strict=True)]
        slack = max(r.draft_length.maximum for r in rows) + 1
        pad = engine.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        forwards = 0
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = model.new_cache(len(rows), width + max_new_tokens + slack)
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=device)
            hidden = model.hidden(ids, cache=cache)  # [B, W, hidden]
            cache.truncate([len(p) for p in prompts])
            last = torch.tensor([len(p) - 1 for p in prompts], device=device)
            first = model.logits(hidden[torch.arange(len(rows), device=device), last])  # [B, V]
            for i, row in enumerate(rows):
                token = int(select(first[i:i + 1], row.params, row.generator))
                row.context = [*row.prompt, token]
                row.accept([token], eos, max_new_tokens)
            prefill_done = time.perf_counter()
            self.source.start(model, cache, [list(p) for p in prompts], [r.params for r in rows],
                              [r.generator for r in rows])
            active = list(range(len(rows)))  # row indices in cache-row order
            while True:
                still = [j for j, i in enumerate(active) if not rows[i].done]
                if not still:
                    break
                if len(still) <= len(active) // 2:  # drop finished rows from the batch
                    cache = cache.select_rows(still)
                    self.source.retain(still)
                    active = [active[j] for j in still]
                batch = [rows[i] for i in active]
                want = [0 if r.done else min(r.draft_length.current, max_new_tokens - len(r.tokens) - 1)
                        for r in batch]
                drafts = self.source.propose([r.context for r in batch], want)
                drafts = [Draft(d.tokens[:k], None if d.probs is None else d.probs[:k])
                          for d, k in zip(drafts, want, strict=True)]
                k_max = max(len(d) for d in drafts)
                cache.truncate([len(r.context) - 1 for r in batch])
                ids = torch.tensor([[r.context[-1], *d.tokens] + [pad] * (k_max - len(d)) for r, d in
                                    zip(batch, drafts, strict=True)], device=device)  # [B, K+1]
                logits = model(ids, cache=cache)  # [B, K+1, V]
                forwards += 1
                keep = []
                for j, (row, draft) in enumerate(zip(batch, drafts, strict=True)):
                    k = len(draft)
                    draft_ids = torch.tensor(draft.tokens, dtype=torch.int64, device=device)
                    if row.params.greedy:
                        verdict = greedy_verify(draft_ids, logits[j, : k + 1])
                    else:
                        verdict = sample_verify(draft_ids, draft.probs, probabilities(logits[j, : k + 1], row.params),
                                                row.generator)
                    keep.append(len(row.context) + verdict.accepted)
                    if not row.done:
                        row.context += verdict.tokens
                        row.drafted += k
                        row.accepted += verdict.accepted
                        row.draft_length.update(k, verdict.accepted)
                        row.accept(verdict.tokens, eos, max_new_tokens)
                cache.truncate(keep)
            end = time.perf_counter()
        completions = []
        for row in rows:
            stats = GenerationStats(prompt_tokens=len(row.prompt), generated_tokens=len(row.tokens),
                                    prefill_seconds=prefill_done - t0, decode_seconds=end - prefill_done,
                                    target_forwards=forwards, drafted_tokens=row.drafted,
                                    accepted_tokens=row.accepted, strategy=f"batched-{self.source.name}")
            completions.append(Completion(row.text(), row.tokens, row.finish, stats))
        return completions
