"""Which weights the compression stages touch: weight matrices of Linear, Conv and Embedding modules.

`compressible_weights(model, include, exclude)` lists them once each (a weight tied between an embedding and
an LM head is one entry, listing every module that holds it). Patterns are shell-style globs over module names
(``"model.layers.*.mlp.*"``); a name matches when the pattern matches it or one of its dotted prefixes. A tied
weight is selected when any of its holders matches `include` and none matches `exclude`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class TargetWeight:
    """One weight tensor and the modules (names, modules) that hold it; `name` is the first holder's name."""

    name: str
    weight: nn.Parameter
    holders: list[tuple[str, nn.Module]]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [p.strip() for p in patterns.split(",") if p.strip()]
    return list(patterns)


def compressible_weights(model: nn.Module, include: str | Sequence[str] | None = None,
                         exclude: str | Sequence[str] | None = None,
                         types: tuple[type[nn.Module], ...] = COMPRESSIBLE_TYPES) -> list[TargetWeight]:
    """The weights of `types` modules whose names match `include` (default: all) and not `exclude`."""
    include_p, exclude_p = _as_patterns(include), _as_patterns(exclude)
    found: dict[int, TargetWeight] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, types) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        key = id(module.weight)
        if key in found:
            found[key].holders.append((name, module))
        else:
            found[key] = TargetWeight(name, module.weight, [(name, module)])

    def selected(target: TargetWeight) -> bool:
        names = [n for n, _ in target.holders]
        if include_p and not any(_matches(n, include_p) for n in names):
            return False
        return not (exclude_p and any(_matches(n, exclude_p) for n in names))

    return [t for t in found.values() if selected(t)]
