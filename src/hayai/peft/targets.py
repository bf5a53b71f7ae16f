"""Which modules an adapter wraps: PEFT's target-matching rules, reimplemented.

A module named `n` (its `named_modules()` name, e.g. "model.layers.0.self_attn.q_proj") is a target when
  - it is not excluded: `exclude_modules` is a regex string that full-matches `n`, or a list with `n` in it or
    `n`
    ending with "." + an entry;
  - it is not one of `modules_to_save` (those are trained whole, never wrapped): some entry `m` with
    `re.match(rf"(^|.*\\.){m}($|\\..*)", n)`;
  - `target_modules` is a string that full-matches `n` (a regex), or a list that contains `n` or an entry `t`
    with
    `n.endswith("." + t)`; for a list, `layers_to_transform` (with `layers_pattern`) keeps only the listed
    layer indices, the index being the first number after a "<pattern>." segment of `n`.
"all-linear" means every linear-like module except the output layer (`model.get_output_embeddings()`, or a
module named `lm_head` when the model has no such method), like PEFT's `INCLUDE_LINEAR_LAYERS_SHORTHAND`.
`modules_to_save` entries select modules by plain suffix (`n.endswith(m)`), as PEFT's `_set_trainable` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from hayai.errors import ConfigError
from hayai.peft.base_layers import is_linear_like
from hayai.peft.config import ALL_LINEAR, TargetSpec


def adapter_layer_types() -> tuple[type, ...]:
    from hayai.peft.ia3 import IA3Linear
    from hayai.peft.lora import LoRAEmbedding, LoRALinear

    return (LoRALinear, LoRAEmbedding, IA3Linear)


def original_modules(model: nn.Module) -> dict[str, nn.Module]:
    """`named_modules()` of `model`, without the insides of adapter wrappers (bases and adapter tensors)."""
    wrappers = adapter_layer_types()
    result: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        result[name] = module
        if isinstance(module, wrappers):
            inside.append(name)
    return result


def _in_list_or_suffix(name: str, entries: Iterable[str]) -> bool:
    entries = list(entries)
    return name in entries or any(name.endswith(f".{entry}") for entry in entries)


def is_excluded(name: str, exclude_modules: TargetSpec) -> bool:
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return _in_list_or_suffix(name, exclude_modules)


def is_module_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    """PEFT's `_set_trainable` rule: a plain suffix match."""
    return bool(modules_to_save) and any(name.endswith(m) for m in modules_to_save)


def _shielded_by_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    """PEFT never wraps a module named by modules_to_save (or anything inside one)."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _layer_index_allowed(
    name: str, layers_to_transform: list[int] | int | None, layers_pattern: object
) -> bool:
    if layers_to_transform is None or layers_to_transform == []:
        return True
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return (
        index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform
    )


def matches_target(
    name: str,
    target_modules: TargetSpec,
    *,
    exclude_modules: TargetSpec = None,
    modules_to_save: list[str] | None = None,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: object = None,
) -> bool:
    """PEFT's `check_target_module_exists` for one module name (with "all-linear" already resolved)."""
    if is_excluded(name, exclude_modules) or _shielded_by_modules_to_save(name, modules_to_save):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not any(name.endswith(f".{t}") for t in target_modules):
        return False
    return _layer_index_allowed(name, layers_to_transform, layers_pattern)


def output_layer_name(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """The name of the model's output projection, which "all-linear" leaves alone."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        output = get_output()
        if output is not None:
            return next((name for name, module in modules.items() if module is output), None)
    return "lm_head" if "lm_head" in modules else None


def resolve_all_linear(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Full names of all linear-like modules except the output layer."""
    head = output_layer_name(model, modules)
    return [name for name, module in modules.items() if name and name != head and is_linear_like(module)]


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    *,
    exclude_modules: TargetSpec = None,
    modules_to_save: list[str] | None = None,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: object = None,
    supported: Callable[[nn.Module], bool] = is_linear_like,
) -> list[str]:
    """Names of the modules to wrap, in model order; ConfigError if none matches or one is unsupported."""
    modules = original_modules(model)
    wrappers = adapter_layer_types()
    spec: TargetSpec = target_modules
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        spec = resolve_all_linear(model, modules)
    found = []
    for name, module in modules.items():
        if not name or not matches_target(
            name,
            spec,
            exclude_modules=exclude_modules,
            modules_to_save=modules_to_save,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
        ):
            continue
        if isinstance(module, wrappers):
            raise ConfigError(
                f"module {name} already has an adapter; call unload(model) before adding another"
            )
        if not supported(module):
            raise ConfigError(
                f"target_modules={target_modules!r} selects {name}, a {type(module).__name__}, which this "
                "adapter cannot wrap (it wraps linear-like modules; LoRA also wraps nn.Embedding)"
            )
        found.append(name)
    if not found:
        sample = [n for n, m in modules.items() if n and is_linear_like(m)][:6]
        raise ConfigError(
            f"target_modules={target_modules!r} matches no module of the model "
            f"(linear modules include: {', '.join(sample) or 'none'})"
        )
    return found


def find_modules_to_save(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Names of the modules selected by `modules_to_save` (suffix rule); ConfigError if one matches none."""
    if not modules_to_save:
        return []
    modules = original_modules(model)
    found = [name for name in modules if name and is_module_to_save(name, modules_to_save)]
    for entry in modules_to_save:
        if not any(name.endswith(entry) for name in found):
            raise ConfigError(f"modules_to_save entry {entry!r} matches no module of the model")
    return found


def compact_names(
    wanted: Iterable[str], universe: Iterable[str], rule: Callable[[str, list[str]], bool]
) -> list[str]:
    """The shortest PEFT spec selecting exactly `wanted` out of `universe` under `rule`: the distinct last
    name components if they select exactly `wanted`, else the full names."""
    wanted = list(dict.fromkeys(wanted))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in wanted})
    if {name for name in universe if name and rule(name, leaves)} == set(wanted):
        return leaves
    return sorted(wanted)


def target_rule(name: str, entries: list[str]) -> bool:
    return _in_list_or_suffix(name, entries)


def suffix_rule(name: str, entries: list[str]) -> bool:
    return any(name.endswith(entry) for entry in entries)
