"""Learning-rate schedules: linear warm-up, then cosine, linear or constant.

For step s (0-based, the step about to be taken) of S total, with W warm-up steps and floor m = min_lr_ratio:

    warm-up   (s < W):   lr = base · (s + 1) / W
    cosine:              lr = base · (m + (1 − m) · ½ (1 + cos(π p))),    p = (s − W) / max(1, S − W)
    linear:              lr = base · (m + (1 − m) · (1 − p))
    constant:            lr = base

Cosine decay is from Loshchilov & Hutter, "SGDR", ICLR 2017 (arXiv:1608.03983); linear warm-up from Goyal et
al. 2017 (arXiv:1706.02677). The schedule is a pure function of the step, so resuming needs only the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hayai.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.base_lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.base_lr}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ConfigError(f"need total steps >= 1 and warm-up steps >= 0, got {self.total_steps} and "
                              f"{self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        """The learning rate for 0-based step `step`."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        m = self.min_lr_ratio
        if self.kind == "cosine":
            return self.base_lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.base_lr * (m + (1 - m) * (1 - progress))


def warmup_steps_for(total_steps: int, warmup: float | int) -> int:
    """`warmup` as a step count: an int is taken as is, a float in [0, 1) as a fraction of the total."""
    if isinstance(warmup, float) and 0.0 <= warmup < 1.0:
        return round(warmup * total_steps)
    if int(warmup) != warmup or warmup < 0:
        raise ConfigError(f"warm-up must be a step count or a fraction in [0, 1), got {warmup!r}")
    return min(int(warmup), total_steps)
