"""Jacobi decoding as a candidate source: the previous pass's outputs are the next pass's guesses.

Jacobi (fixed-point) decoding (Song et al. 2021, arXiv 2002.03629; Santilli et al. 2023, arXiv 2305.10427)
treats the next W tokens y_1..y_W as unknowns and iterates

    y_i ← argmax p(· | context, y_1, .., y_{i-1})      for every i at once (one forward pass)

Verified as a speculative draft (`SpeculativeDecoding`), the guesses that agree with the target are kept
exactly as greedy decoding would produce them, and the outputs the pass computed at the remaining positions
(conditioned on guesses that were partly wrong) become the refined guesses for the next pass:

    pass over [c_last, y_1..y_k], n guesses accepted  ->  next guesses = argmax(logits[n+1 .. k])

padded back to the window by repeating the last guess. Those not-yet-verified guesses are FastCoT's
"approximate tokens" (`hayai.decode.fastcot`). Plain Jacobi decoding rarely accepts more than one extra token
per pass on natural text; lookahead decoding (`hayai.decode.lookahead`) adds the n-gram pool that fixes that.
"""

from __future__ import annotations

from hayai.decode.candidates import CandidateSource, Draft, cut_at_stop
from hayai.errors import ConfigError


class Jacobi(CandidateSource):
    name = "jacobi"

    def __init__(self, window: int = 8, stop_token_ids: frozenset[int] = frozenset()):
        if window < 1:
            raise ConfigError(f"Jacobi window must be >= 1, got {window}")
        self.window = window
        self.stop_token_ids = frozenset(stop_token_ids)
        self.guesses: list[int] = []

    def start(self, target, target_cache, prompt, sampling, generator):
        super().start(target, target_cache, prompt, sampling, generator)
        self.guesses = []

    def propose(self, context: list[int], max_tokens: int) -> Draft:
        k = min(self.window, max_tokens)
        guesses = self.guesses[:k]
        filler = guesses[-1] if guesses else context[-1]
        guesses += [filler] * (k - len(guesses))
        return Draft(cut_at_stop(guesses, self.stop_token_ids))

    def feedback(self, context, drafted, accepted, target_logits=None):
        if target_logits is None:
            self.guesses = []
            return
        self.guesses = target_logits[accepted + 1: drafted + 1].argmax(dim=-1).tolist()  # refined, unverified
