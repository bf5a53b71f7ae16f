"""A draft model as the candidate source: a smaller network sharing the tokenizer guesses the next k tokens.

Assisted generation (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318): the draft
decodes k tokens autoregressively, each from

    q_i = warp(draft_logits_i)       (the target's temperature / top-k / top-p; one-hot argmax when greedy)

and returns them with their q_i, which the target's verification needs for exact speculative sampling.
Greedy drafting may stop early when the draft's top probability falls below `min_confidence` (llama.cpp's
`--draft-p-min`; transformers' `assistant_confidence_threshold`): a token the draft itself doubts is likely to
be rejected, and every draft token costs one draft forward pass.

The draft keeps its own KV cache and the list of tokens it holds. Before drafting it rolls that cache back to
the longest prefix it shares with the context (rejected drafts are dropped) and feeds what it has not seen:
the tokens the target accepted or chose. A draft network built from the target's own layers can instead write
into the target's cache (`share_cache=True`, see `hayai.decode.self_speculative`): the target's verification
pass rewrites those slots, so no second cache and no catch-up pass are needed.
"""

from __future__ import annotations

import torch

from hayai.decode.candidates import CandidateSource, Draft
from hayai.decode.sampling import probabilities
from hayai.errors import ConfigError
from hayai.models.llama import CausalLM


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModel(CandidateSource):
    name = "draft"

    def __init__(self, model: CausalLM, num_tokens: int = 5, min_confidence: float = 0.0,
                 stop_token_ids: frozenset[int] = frozenset(), share_cache: bool = False):
        if num_tokens < 1:
            raise ConfigError(f"draft num_tokens must be >= 1, got {num_tokens}")
        if not 0.0 <= min_confidence < 1.0:
            raise ConfigError(f"draft min_confidence must be in [0, 1), got {min_confidence}")
        self.model = model
        self.num_tokens = num_tokens
        self.min_confidence = min_confidence
        self.stop_token_ids = frozenset(stop_token_ids)
        self.share_cache = share_cache
        self._forwards = 0

    @property
    def draft_forwards(self) -> int:
        return self._forwards

    def start(self, target, target_cache, prompt, sampling, generator):
        super().start(target, target_cache, prompt, sampling, generator)
        if self.model.config.vocab_size > target.config.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({self.model.config.vocab_size}) is larger than the "
                              f"target's ({target.config.vocab_size}); they must share the tokenizer")
        self.vocab_size = target.config.vocab_size
        self._forwards = 0
        if self.share_cache:
            self.cache = target_cache
            self.ids = list(prompt)  # the target prefilled the prompt into the shared cache
        else:
            self.cache = self.model.new_cache(1, target_cache.max_length)
            self.ids: list[int] = []

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones; -> logits [V] (padded to the target's vocabulary) after the last."""
        ids = torch.tensor([tokens], device=self.model.device)
        hidden = self.model.hidden(ids, cache=self.cache)  # [1, T, hidden]
        logits = self.model.logits(hidden[0, -1]).float()  # [V_draft]
        self._forwards += 1
        self.ids.extend(tokens)
        if logits.shape[-1] < self.vocab_size:  # a draft head without the target's padding tokens
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))
        return logits

    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Roll the draft cache back to what it shares with the context, feed the rest; -> next-token logits."""
        if self.share_cache:
            keep = len(context) - 1  # the target's cache holds every context token but the last
            self.ids = context[:keep]
        else:
            keep = min(common_prefix_length(self.ids, context), len(context) - 1)  # feed at least the last token
            del self.ids[keep:]
        self.cache.truncate(keep)
        return self._forward(context[keep:])

    def propose(self, context: list[int], max_tokens: int) -> Draft:
        k = min(max_tokens, self.num_tokens)
        if k < 1:
            return Draft([])
        logits = self._catch_up(context)
        greedy = self.sampling.greedy
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if greedy:
                token = int(logits.argmax())
                if self.min_confidence > 0 and i > 0 and float(logits.softmax(-1).max()) < self.min_confidence:
                    break  # the draft doubts this token: stop here (the first token is always drafted)
            else:
                q = probabilities(logits, self.sampling)  # [V], the distribution the token is drawn from
                token = int(torch.multinomial(q, 1, generator=self.generator))
                probs.append(q)
            tokens.append(token)
            if token in self.stop_token_ids or i == k - 1:
                break
            logits = self._forward([token])
        return Draft(tokens, torch.stack(probs) if probs else None)
