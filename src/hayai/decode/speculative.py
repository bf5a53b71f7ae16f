"""Speculative decoding as a `DecodeStrategy`: draft k tokens cheaply, verify them in one target forward pass.

Each step (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318):

    1. a `CandidateSource` proposes x̃_1..x̃_k after the context c (prompt + accepted tokens);
    2. the target runs once over [c_last, x̃_1, .., x̃_k] (the KV cache holds c without its last token) and
       gives p_1..p_{k+1};
    3. `hayai.decode.rejection` keeps a prefix of the drafts and adds the target's own next token;
    4. the KV cache is rolled back past the rejected drafts (`KVCache.truncate`: the slots stay, the length
       drops, and the next pass overwrites them).

Greedy output is token-for-token the target's greedy output, and sampled output follows the target's
distribution exactly (up to floating-point differences between a k+1-token pass and k+1 one-token passes).
Decode on a CPU reads every weight once per pass whatever the number of tokens in it, so a step that keeps
m tokens costs about 1/m of plain decoding. The draft length adapts (`hayai.decode.draft_length`).
"""

from __future__ import annotations

import torch

from hayai.decode.candidates import CandidateSource, Draft
from hayai.decode.draft_length import DraftLength
from hayai.decode.engine import DecodeStrategy
from hayai.decode.rejection import Verdict, greedy_verify, sample_verify
from hayai.decode.sampling import probabilities, select


class SpeculativeDecoding(DecodeStrategy):
    """Draft with `source`, verify with the target (see the module docstring). One object serves any number of
    generations, one at a time; `acceptance_by_position` accumulates over all of them."""

    def __init__(self, source: CandidateSource, draft_length: DraftLength | None = None):
        self.source = source
        self.draft_length = draft_length or DraftLength()
        self.name = source.name
        self.extra_cache_slots = self.draft_length.maximum + 1
        self.position_drafted = [0] * self.draft_length.maximum  # per draft position: times proposed
        self.position_accepted = [0] * self.draft_length.maximum  # ... and times kept

    def start(self, model, cache, prompt, sampling, generator, stats):
        self.model, self.cache, self.sampling, self.generator, self.stats = model, cache, sampling, generator, stats
        hidden = model.hidden(prompt, cache=cache)  # [1, T, hidden]
        self.first_logits: torch.Tensor | None = model.logits(hidden[:, -1])  # [1, V]
        self.context: list[int] = prompt[0].tolist()
        self.draft_length.reset()
        self.source.start(model, cache, list(self.context), sampling, generator)

    def step(self, max_tokens: int) -> list[int]:
        if self.first_logits is not None:  # the first token comes from the prefill pass
            token = int(select(self.first_logits, self.sampling, self.generator))
            self.first_logits = None
            self.context.append(token)
            return [token]
        k = min(self.draft_length.current, max_tokens - 1)
        draft = self.source.propose(self.context, k) if k > 0 else Draft([])
        verdict, logits = self.verify(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
        self.context.extend(verdict.tokens)
        self.source.feedback(self.context, min(k, len(draft)), verdict.accepted, logits)
        self.draft_length.update(min(k, len(draft)), verdict.accepted)
        return verdict.tokens

    def verify(self, tokens: list[int], draft_probs: torch.Tensor | None) -> tuple[Verdict, torch.Tensor]:
        """One target pass over the last context token and the drafts; roll the cache back to what is kept.
        Returns the verdict and the target's logits [k+1, V]."""
        self.cache.truncate(len(self.context) - 1)  # a draft sharing the cache may have written past it
        ids = torch.tensor([[self.context[-1], *tokens]], device=self.model.device)  # [1, k+1]
        logits = self.model(ids, cache=self.cache)[0]  # [k+1, V]
        draft = torch.tensor(tokens, dtype=torch.int64, device=logits.device)  # [k]
        if self.sampling.greedy:
            verdict = greedy_verify(draft, logits)
        else:
            verdict = sample_verify(draft, draft_probs, probabilities(logits, self.sampling), self.generator)
        self.cache.truncate(len(self.context) + verdict.accepted)  # c_last and the accepted drafts stay
        self.stats.target_forwards += 1
        self.stats.drafted_tokens += len(tokens)
        self.stats.accepted_tokens += verdict.accepted
        for i in range(len(tokens)):
            self.position_drafted[i] += 1
            self.position_accepted[i] += i < verdict.accepted
        return verdict, logits

    @property
    def draft_forwards(self) -> int:
        return self.source.draft_forwards

    def acceptance_by_position(self) -> list[float]:
        """Fraction of drafts kept at each draft position (1st drafted token, 2nd, ...), where any were drafted."""
        return [a / d for a, d in zip(self.position_accepted, self.position_drafted, strict=True) if d]
