"""Lookahead decoding: Jacobi iteration over a 2-D window of future tokens, an n-gram pool, and verification.

Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding" (arXiv 2402.02057),
with the batch layout of llama.cpp's `examples/lookahead`. Every step is one forward pass over

    [x] + verification branch (G n-grams from the pool that start with x, N-1 tokens each)
        + lookahead branch (levels 0..N-2 of a W-wide window; level 0's first slot is x itself)

where x is the last accepted token. Window token (level j, column i) sits at position p + j + i (p = position
of x) and attends to the cache, to x and level 0's columns 1..i, and to its own column's levels 1..j; a
verification token attends to the cache, x and its own n-gram's earlier tokens. From one pass:

- the target's token after x, and, for every n-gram whose tokens match what the target produces, the tokens
  after them (greedy: argmax; sampling: a draw from the target's distribution at that position, which is
  exact because each token is drawn from the target given the accepted prefix; n-grams only decide how far
  the target's outputs are usable);
- a Jacobi update of the window: the outputs at the last level become the new last level (levels shift down);
- new n-grams: each column (level 0 .. N-2, then its new output) is N consecutive guesses, added to the pool
  under its first token (LRU, at most G per first token). The pool can also be seeded with the prompt's
  n-grams, which makes lookahead subsume prompt lookup for input-grounded text.

The output is the target's greedy output token for token (verification keeps only tokens the target itself
produces). The cost: one pass carries 1 + G(N-1) + (W-1) + W(N-2) tokens, so lookahead pays off where a pass
over many tokens costs little more than over one (GPUs); on a small CPU it is mostly a correctness reference
(`benchmarks/decode.py` measures it).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import torch

from hayai.decode.engine import DecodeStrategy
from hayai.decode.sampling import select
from hayai.errors import ConfigError


class NGramPool:
    """n-grams keyed by their first token; per key an LRU list of at most `capacity` (N-1)-token tails."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, first: int, tail: tuple[int, ...]) -> None:
        entries = self._pool.setdefault(first, OrderedDict())
        if tail in entries:
            entries.move_to_end(tail)
            return
        entries[tail] = None
        if len(entries) > self.capacity:
            entries.popitem(last=False)  # drop the least recently added

    def candidates(self, first: int) -> list[tuple[int, ...]]:
        """Tails of the n-grams starting with `first`, most recent first."""
        return list(reversed(self._pool.get(first, {})))

    def __len__(self) -> int:
        return sum(len(v) for v in self._pool.values())


class LookaheadDecoding(DecodeStrategy):
    name = "lookahead"

    def __init__(self, window: int = 5, ngram: int = 3, max_candidates: int = 5, pool_from_prompt: bool = True,
                 seed: int = 0):
        if window < 1 or ngram < 2 or max_candidates < 0:
            raise ConfigError(f"lookahead needs window >= 1, ngram >= 2, max_candidates >= 0; got {window}, "
                              f"{ngram}, {max_candidates}")
        self.window, self.ngram, self.max_candidates = window, ngram, max_candidates
        self.pool_from_prompt = pool_from_prompt
        self.seed = seed
        levels = ngram - 1
        self.extra_cache_slots = 1 + max_candidates * (ngram - 1) + (window - 1) + window * (levels - 1)

    def start(self, model, cache, prompt, sampling, generator, stats):
        self.model, self.cache, self.sampling, self.generator, self.stats = model, cache, sampling, generator, stats
        hidden = model.hidden(prompt, cache=cache)  # [1, T, hidden]
        self.first_logits: torch.Tensor | None = model.logits(hidden[:, -1])  # [1, V]
        self.context: list[int] = prompt[0].tolist()
        self.pool = NGramPool(max(1, self.max_candidates))
        n = self.ngram
        if self.pool_from_prompt:
            for i in range(len(self.context) - n + 1):
                self.pool.add(self.context[i], tuple(self.context[i + 1:i + n]))
        rng = random.Random(self.seed)  # the window starts as tokens drawn from the prompt (lade's default)
        self.levels = [[rng.choice(self.context) for _ in range(self.window)] for _ in range(n - 1)]

    # ---- one pass ---------------------------------------------------------------------------------------------
    def _layout(self, x: int, candidates: list[tuple[int, ...]]) -> tuple[list[int], list[int], torch.Tensor,
                                                                          list[list[int]], list[int]]:
        """(tokens, relative positions, in-pass mask [M, M], batch index of each candidate token, batch index
        of each last-level window token). Batch order: x, the candidates, then the window level by level."""
        tokens, positions = [x], [0]
        parents: list[list[int]] = [[]]  # batch indices each token attends to (besides itself)
        cand_index: list[list[int]] = []
        for cand in candidates:
            idx = []
            for j, t in enumerate(cand):
                parents.append([0, *idx])
                idx.append(len(tokens))
                tokens.append(t)
                positions.append(1 + j)
            cand_index.append(idx)
        column: list[list[int]] = [[0] for _ in range(self.window)]  # per column: batch indices, level 0 up
        level0 = [0]
        for i in range(1, self.window):
            parents.append(list(level0))
            level0.append(len(tokens))
            column[i] = [len(tokens)]
            tokens.append(self.levels[0][i])
            positions.append(i)
        for j in range(1, self.ngram - 1):
            for i in range(self.window):
                parents.append(level0[: i + 1] + column[i][1:])
                column[i].append(len(tokens))
                tokens.append(self.levels[j][i])
                positions.append(j + i)
        m = len(tokens)
        mask = torch.eye(m, dtype=torch.bool)
        for row, cols in enumerate(parents):
            mask[row, cols] = True
        last_level = [column[i][-1] for i in range(self.window)]
        return tokens, positions, mask, cand_index, last_level

    def step(self, max_tokens: int) -> list[int]:
        if self.first_logits is not None:
            token = int(select(self.first_logits, self.sampling, self.generator))
            self.first_logits = None
            self.context.append(token)
            return [token]
        x = self.context[-1]
        past = len(self.context) - 1  # the cache holds the context without x
        self.cache.truncate(past)
        limit = max(0, min(self.ngram - 1, max_tokens - 1))
        candidates = [c[:limit] for c in self.pool.candidates(x)[: self.max_candidates]] if limit else []
        tokens, rel, inner, cand_index, last_level = self._layout(x, candidates)
        device = self.model.device
        m = len(tokens)
        mask = torch.cat([torch.ones(m, past, dtype=torch.bool), inner], dim=1)[None, None].to(device)  # [1,1,M,S]
        positions = (torch.tensor(rel) + past)[None].to(device)  # [1, M]
        logits = self.model(torch.tensor([tokens], device=device), positions=positions, cache=self.cache,
                            mask=mask)[0]  # [M, V]
        self.stats.target_forwards += 1

        # verification: the target's token after x, then along every candidate that agrees with it
        out = [int(select(logits[0:1], self.sampling, self.generator))]
        active = [g for g, c in enumerate(candidates) if c and c[0] == out[0]]
        kept: list[int] = []  # batch indices of the accepted candidate tokens
        depth = 0
        while active and len(out) < max_tokens:
            best = active[0]
            kept.append(cand_index[best][depth])
            out.append(int(select(logits[cand_index[best][depth]][None], self.sampling, self.generator)))
            depth += 1
            active = [g for g in active if len(candidates[g]) > depth and candidates[g][depth] == out[-1]]
        self.stats.drafted_tokens += sum(len(c) for c in candidates)
        self.stats.accepted_tokens += len(kept)

        # keep x's and the accepted candidate tokens' keys/values, contiguous after the prefix
        self.cache.move_slots([past + i for i in kept], past + 1)
        self.cache.truncate(past + 1 + len(kept))

        self._update_window(logits, last_level, accepted=len(out))
        self.context.extend(out)
        return out

    def _update_window(self, logits: torch.Tensor, last_level: list[int], accepted: int) -> None:
        """Jacobi update and n-gram collection (once per pass), then shift the window by the accepted tokens."""
        new = logits[last_level].argmax(dim=-1).tolist()  # [W] the next guess of every column
        x = self.context[-1]
        for i in range(self.window):
            column = [x if i == 0 else self.levels[0][i]] + [self.levels[j][i] for j in range(1, self.ngram - 1)]
            self.pool.add(column[0], (*column[1:], new[i]))
        self.levels = [*self.levels[1:], new]
        for _ in range(accepted - 1):  # further accepted tokens: rotate, as llama.cpp does
            self.levels = [*self.levels[1:], self.levels[0]]
