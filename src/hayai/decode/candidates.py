"""The candidate-source interface of speculative decoding: something that guesses the next few tokens.

A `CandidateSource` proposes a draft continuation of the current context; `SpeculativeDecoding`
(`hayai.decode.speculative`) verifies it with one target forward pass and tells the source what was kept.
Interchangeable sources (the two-method contract of transformers' `CandidateGenerator`):

- `hayai.decode.prompt_lookup.PromptLookup`: copy what followed an earlier occurrence of the last n-gram;
- `hayai.decode.draft_model.DraftModel`: a small model sharing the tokenizer;
- `hayai.decode.self_speculative.EarlyExit`: the target's own first layers and LM head (optionally int4).

A draft carries the distributions its tokens were sampled from (`probs`), or None when it is deterministic
(prompt lookup, greedy drafting); exact speculative sampling needs exactly that q (`hayai.decode.rejection`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hayai.decode.sampling import SamplingParams
from hayai.models.kv_cache import KVCache
from hayai.models.llama import CausalLM


@dataclass
class Draft:
    tokens: list[int]  # proposed continuation of the context, possibly empty
    probs: torch.Tensor | None = None  # [len(tokens), V] fp32 draft distributions; None = deterministic (one-hot)

    def __len__(self) -> int:
        return len(self.tokens)


class CandidateSource(ABC):
    """Proposes drafts. Lifecycle: `start` once per generation, then `propose` / `feedback` once per step."""

    name = "candidates"

    def start(self, target: CausalLM, target_cache: KVCache, prompt: list[int], sampling: SamplingParams,
              generator: torch.Generator | None) -> None:
        """A new generation begins (the target has already prefilled `prompt` into `target_cache`)."""
        self.sampling = sampling
        self.generator = generator

    @abstractmethod
    def propose(self, context: list[int], max_tokens: int) -> Draft:
        """At most `max_tokens` tokens likely to follow `context` (the prompt and every token accepted so far)."""

    def feedback(self, context: list[int], drafted: int, accepted: int,  # noqa: B027 (an optional hook)
                 target_logits: torch.Tensor | None = None) -> None:
        """After verification: `context` now ends with the accepted drafts and the target's own token;
        `target_logits` [drafted+1, V] are the target's outputs at the verified positions."""

    @property
    def draft_forwards(self) -> int:
        """Forward passes of a draft network so far (0 for model-free sources)."""
        return 0


def cut_at_stop(tokens: list[int], stop_token_ids: frozenset[int]) -> list[int]:
    """Drafting past an end-of-sequence token is wasted work: keep tokens up to and including the first one."""
    for i, t in enumerate(tokens):
        if t in stop_token_ids:
            return tokens[: i + 1]
    return tokens
