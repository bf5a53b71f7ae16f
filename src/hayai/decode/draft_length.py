"""How many tokens to draft per speculative step: constant, or adapted to how many were accepted.

With acceptance rate α per token and k drafted tokens, one verification pass yields on average
(1 − α^{k+1}) / (1 − α) tokens (Leviathan et al. 2023, eq. 1): long drafts pay off only while α is high.
`heuristic` adapts k online the way transformers' `num_assistant_tokens_schedule="heuristic"` does:

    all drafted tokens accepted  ->  k += 2            (up to `maximum`)
    any drafted token rejected   ->  k = max(minimum, k − 1)

`constant` keeps k fixed. The defaults (start at 4, at most 8) suit small CPUs: there the matmul kernels are
compute-bound from about 4 rows, so a pass over 9 tokens costs about 2.5x a one-token pass (on a GPU it costs
about the same, and longer drafts pay off).
"""

from __future__ import annotations

from hayai.errors import ConfigError

SCHEDULES = ("constant", "heuristic")


class DraftLength:
    def __init__(self, initial: int = 4, schedule: str = "heuristic", minimum: int = 1, maximum: int = 8):
        if schedule not in SCHEDULES:
            raise ConfigError(f"draft length schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not 1 <= minimum <= initial <= maximum:
            raise ConfigError(f"draft length needs 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, "
                              f"{maximum}")
        self.initial, self.schedule, self.minimum, self.maximum = initial, schedule, minimum, maximum
        self.current = initial

    def reset(self) -> None:
        self.current = self.initial

    def update(self, drafted: int, accepted: int) -> None:
        if self.schedule == "constant" or drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.maximum, self.current + 2)
        else:
            self.current = max(self.minimum, self.current - 1)
