"""Prompt lookup decoding: draft by copying what followed an earlier occurrence of the context's last n-gram.

Saxena 2023 (github.com/apoorvumang/prompt-lookup-decoding), as in transformers' `PromptLookupCandidateGenerator`:
for n = max_ngram down to min_ngram, find an earlier position where the last n tokens of the context also
occur, and propose the (up to) `num_tokens` tokens that followed it. The largest n with a match wins; among
matches of that size, `match="first"` takes the left-most occurrence (HF, PLD) and `match="last"` the most
recent one. No model runs: the draft is deterministic (one-hot q), so input-grounded tasks (summarise,
extract, edit code) get several tokens per target forward pass for free.

The n-gram index is built incrementally (each new token adds one entry per n), so a lookup costs O(max_ngram)
dictionary probes instead of a scan of the context.
"""

from __future__ import annotations

from hayai.decode.candidates import CandidateSource, Draft, cut_at_stop
from hayai.errors import ConfigError


class PromptLookup(CandidateSource):
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 10, match: str = "first",
                 stop_token_ids: frozenset[int] = frozenset()):
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if num_tokens < 1:
            raise ConfigError(f"prompt lookup num_tokens must be >= 1, got {num_tokens}")
        if match not in ("first", "last"):
            raise ConfigError(f"prompt lookup match must be 'first' or 'last', got {match!r}")
        self.max_ngram, self.min_ngram, self.num_tokens, self.match = max_ngram, min_ngram, num_tokens, match
        self.stop_token_ids = frozenset(stop_token_ids)
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token that followed it
        self._indexed = 0  # n-grams ending before this context position are in the index

    def start(self, target, target_cache, prompt, sampling, generator):
        super().start(target, target_cache, prompt, sampling, generator)
        self._index.clear()
        self._indexed = 0

    def _extend_index(self, context: list[int]) -> None:
        """Index every n-gram that ends before the last token (so each has a non-empty continuation)."""
        first = self.match == "first"
        for end in range(self._indexed, len(context) - 1):  # the n-gram is context[end-n+1 : end+1]
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                key = tuple(context[end - n + 1: end + 1])
                if first:
                    self._index.setdefault(key, end + 1)
                else:
                    self._index[key] = end + 1
        self._indexed = max(self._indexed, len(context) - 1)

    def lookup(self, context: list[int], max_tokens: int) -> list[int]:
        """The continuation the lookup proposes for `context` (empty when no n-gram matches)."""
        self._extend_index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            start = self._index.get(tuple(context[len(context) - n:]))
            if start is not None:
                return context[start: start + min(max_tokens, self.num_tokens)]
        return []

    def propose(self, context: list[int], max_tokens: int) -> Draft:
        return Draft(cut_at_stop(self.lookup(context, max_tokens), self.stop_token_ids))
