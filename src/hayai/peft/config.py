"""Adapter configurations, field for field the subset of PEFT's `LoraConfig` / `IA3Config` that hayai
implements.

Field names and defaults follow PEFT (`tuners/lora/config.py`, `tuners/ia3/config.py`) so that a config reads
the same in `adapter_config.json`. Per-module values: `rank_pattern` / `alpha_pattern` map a pattern to a rank
/ alpha; a module named `n` takes the first pattern `p` such that `re.match(rf"(.*\\.)?({p})$", n)`, PEFT's
`get_pattern_key`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from hayai.errors import ConfigError
from hayai.peft.lora import lora_scaling

ALL_LINEAR = "all-linear"

# Module name specs, as PEFT accepts them: a list of names (exact or "." suffix) or one full-match regex
# string.
TargetSpec = list[str] | str | None


def pattern_value(patterns: Mapping[str, float], module_name: str, default: float) -> float:
    """The value of the first pattern matching `module_name` (PEFT's get_pattern_key), else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return patterns.get(module_name, default)


def _check_spec(name: str, spec: object, allow_none: bool = True) -> None:
    ok = (
        (spec is None and allow_none)
        or isinstance(spec, str)
        or (isinstance(spec, list | tuple | set) and all(isinstance(s, str) for s in spec))
    )
    if not ok:
        raise ConfigError(f"{name} must be a list of module names or a regex string, got {spec!r}")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters and target rules (PEFT names; see `hayai.peft.lora` for the formula)."""

    peft_type: ClassVar[str] = "LORA"

    target_modules: TargetSpec = ALL_LINEAR
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    exclude_modules: TargetSpec = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, set | tuple):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float):
            raise ConfigError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, int | float)
            or not (0 <= self.lora_dropout < 1)
        ):
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        _check_spec("target_modules", self.target_modules, allow_none=False)
        _check_spec("exclude_modules", self.exclude_modules)
        _check_spec("modules_to_save", self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(patterns, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in patterns.items()
            ):
                raise ConfigError(f"{name} must map module patterns to numbers, got {patterns!r}")
        if any(not isinstance(v, int) or v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"rank_pattern ranks must be positive integers, got {self.rank_pattern!r}")
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        ):
            raise ConfigError(f"layers_to_transform must be an integer or a list of integers, got {layers!r}")

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """The runtime scale s of the module named `module_name` under this config."""
        return lora_scaling(self.rank_for(module_name), self.alpha_for(module_name), self.use_rslora)


@dataclass
class IA3Config:
    """(IA)³ targets: `feedforward_modules` (a subset of `target_modules`) get input scaling, the rest output
    scaling.

    The defaults are PEFT's for Llama: k_proj, v_proj and down_proj, with down_proj as the feed-forward
    module.
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: TargetSpec = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: TargetSpec = field(default_factory=lambda: ["down_proj"])
    exclude_modules: TargetSpec = None
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), set | tuple):
                setattr(self, name, sorted(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        _check_spec("target_modules", self.target_modules, allow_none=False)
        _check_spec("feedforward_modules", self.feedforward_modules)
        _check_spec("exclude_modules", self.exclude_modules)
        _check_spec("modules_to_save", self.modules_to_save)
        targets, feedforward = self.target_modules, self.feedforward_modules or []
        # PEFT's rule (PR #984): with name lists, feedforward_modules must be a subset of target_modules.
        if (
            isinstance(targets, list)
            and isinstance(feedforward, list)
            and not set(feedforward) <= set(targets)
        ):
            missing = sorted(set(feedforward) - set(targets))
            raise ConfigError(
                f"feedforward_modules must be a subset of target_modules; not targeted: {missing}"
            )

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's rule: full match of a regex string, or a plain name suffix (`name.endswith(m)`)."""
        spec = self.feedforward_modules
        if not spec:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, module_name) is not None
        return any(module_name.endswith(m) for m in spec)


AdapterConfig = LoraConfig | IA3Config
