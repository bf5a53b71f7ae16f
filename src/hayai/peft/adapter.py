"""An adapter as data: a config plus named tensors, taken from a model or put onto one.

`Adapter.tensors` uses PEFT's saved key names relative to the model (PEFT's files add the prefix
"base_model.model."): `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r],
`<module>.lora_embedding_A` [r, vocab], `<module>.lora_embedding_B` [dim, r], `<module>.ia3_l` ([out, 1] or
[1, in]), and, for modules trained whole (`modules_to_save`), their own parameters `<module>.<param>`. Because
the wrappers in `lora.py` / `ia3.py` name their tensors the same way, each key is also the parameter name
inside the adapted model.

Merging (`merge.py`) and ensembling (`ensemble.py`) work on these objects without a model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft.config import AdapterConfig, IA3Config, LoraConfig
from hayai.peft.ia3 import IA3Linear
from hayai.peft.inject import adapter_layers, find_modules_to_save, inject_ia3, inject_lora, unload
from hayai.peft.lora import LoRAEmbedding, LoRALinear
from hayai.peft.targets import (
    compact_names,
    matches_target,
    original_modules,
    suffix_rule,
)

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
IA3_SUFFIXES = (".ia3_l",)
ADAPTER_SUFFIXES = LORA_SUFFIXES + IA3_SUFFIXES


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """("model.layers.0.self_attn.q_proj", "lora_A.weight") for an adapter tensor key, None for other keys."""
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return None


@dataclass
class Adapter:
    """A LoRA or (IA)³ adapter: its config and its tensors (keys as in the module docstring)."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    source: str | None = None  # the file it came from, for error messages

    @property
    def peft_type(self) -> str:
        return self.config.peft_type

    def adapted_modules(self) -> list[str]:
        """Names of the modules that carry adapter tensors, in key order."""
        names = (split_adapter_key(key) for key in self.tensors)
        return list(dict.fromkeys(parts[0] for parts in names if parts is not None))

    def full_module_keys(self) -> list[str]:
        """Keys of whole-module tensors (modules_to_save, saved embedding base layers)."""
        return [key for key in self.tensors if split_adapter_key(key) is None]

    def lora_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(A [r, in], B [out, r], is_embedding) of a LoRA module (s·B·A is ΔW; ΔEᵀ for embeddings)."""
        if f"{module}.lora_A.weight" in self.tensors:
            return self.tensors[f"{module}.lora_A.weight"], self.tensors[f"{module}.lora_B.weight"], False
        return self.tensors[f"{module}.lora_embedding_A"], self.tensors[f"{module}.lora_embedding_B"], True

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def check(self) -> None:
        """ConfigError unless every adapted module has a complete, rank-consistent set of tensors."""
        allowed = LORA_SUFFIXES if isinstance(self.config, LoraConfig) else IA3_SUFFIXES
        for key in self.tensors:
            parts = split_adapter_key(key)
            if parts is not None and f".{parts[1]}" not in allowed:
                raise ConfigError(
                    f"{self._where()}tensor {key} does not belong in a {self.peft_type} adapter"
                )
        if isinstance(self.config, LoraConfig):
            for module in self.adapted_modules():
                self._check_lora_module(module)

    def _check_lora_module(self, module: str) -> None:
        pairs = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
        for a_suffix, b_suffix in pairs:
            a, b = self.tensors.get(module + a_suffix), self.tensors.get(module + b_suffix)
            if a is None and b is None:
                continue
            if a is None or b is None:
                missing = module + (a_suffix if a is None else b_suffix)
                raise ConfigError(f"{self._where()}no tensor {missing} (its partner is present)")
            r = self.config.rank_for(module)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise ConfigError(
                    f"{self._where()}shape mismatch for module {module}: {a_suffix[1:]} has shape "
                    f"{tuple(a.shape)} and {b_suffix[1:]} has shape {tuple(b.shape)}, but the adapter config "
                    f"gives r={r} (expected ({r}, in) and (out, {r}))"
                )


# ------------------------------------------------------------------------------------------------------------
# model -> Adapter


def _most_common(values: Iterable) -> object:
    return Counter(values).most_common(1)[0][0]


def _number(value: float) -> float:
    return int(value) if float(value).is_integer() else value


def _trained_modules(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Owners of trainable parameters that are not adapter tensors (PEFT's modules_to_save). A tied parameter
    (embed_tokens and lm_head) names every module sharing it, so a PEFT model loads the same tensor into both."""
    owners: list[str] = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not parameter.requires_grad:
            continue
        wrapper = next((w for w in layers if name.startswith(f"{w}.")), None)
        if wrapper is not None:
            if name.startswith(f"{wrapper}.base_layer."):
                raise ConfigError(
                    f"parameter {name} of an adapter-wrapped module is trainable; "
                    "the PEFT format cannot save it"
                )
            continue
        owner = name.rpartition(".")[0]
        if not owner:
            raise ConfigError(f"parameter {name} belongs to the model root; the PEFT format cannot save it")
        owners.append(owner)
    return list(dict.fromkeys(owners))


def _compact_targets(wanted: list[str], universe: list[str], modules_to_save: list[str] | None) -> list[str]:
    def rule(name: str, entries: list[str]) -> bool:
        return matches_target(name, entries, modules_to_save=modules_to_save)

    return compact_names(wanted, universe, rule)


def deviation_patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """rank_pattern / alpha_pattern entries for the modules whose value differs from `default`: the last name
    component when every module with that component shares the value, else the escaped full name."""
    by_leaf: dict[str, set] = {}
    for name, value in values.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    patterns: dict[str, float] = {}
    for name, value in values.items():
        leaf = name.rsplit(".", 1)[-1]
        if value == default:
            continue
        if by_leaf[leaf] == {value}:
            patterns[re.escape(leaf)] = value
        else:
            patterns[re.escape(name)] = value
    return patterns


def _lora_config(
    layers: dict[str, nn.Module], targets: list[str], modules_to_save: list[str] | None
) -> LoraConfig:
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ConfigError(
            "the model mixes rsLoRA and plain LoRA layers; the PEFT format has one use_rslora flag"
        )
    ranks = {name: layer.r for name, layer in layers.items()}
    alphas = {name: _number(layer.alpha) for name, layer in layers.items()}
    dropouts = [getattr(getattr(layer, "lora_dropout", None), "p", 0.0) for layer in layers.values()]
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    return LoraConfig(
        target_modules=targets,
        r=r,
        lora_alpha=alpha,
        lora_dropout=_most_common(dropouts),
        use_rslora=rslora.pop(),
        modules_to_save=modules_to_save,
        rank_pattern=deviation_patterns(ranks, r),
        alpha_pattern=deviation_patterns(alphas, alpha),
    )


def _ia3_config(
    layers: dict[str, IA3Linear], universe: list[str], modules_to_save: list[str] | None
) -> IA3Config:
    names = list(layers)
    feedforward = [name for name, layer in layers.items() if layer.is_feedforward]
    targets = _compact_targets(names, universe, modules_to_save)
    ff = compact_names(feedforward, names, suffix_rule) if feedforward else []
    if not set(ff) <= set(targets):  # PEFT requires a subset; full names always are
        targets, ff = sorted(names), sorted(feedforward)
    return IA3Config(target_modules=targets, feedforward_modules=ff, modules_to_save=modules_to_save)


def adapter_from_model(
    model: nn.Module,
    *,
    modules_to_save: list[str] | None = None,
    save_embedding_layers: bool = False,
    base_model_name_or_path: str | None = None,
) -> Adapter:
    """The adapter currently in `model`: every adapter tensor plus whole modules trained alongside.

    Whole modules are `modules_to_save` if given (PEFT suffix rule), else every module owning a trainable
    parameter that is not an adapter tensor (e.g. the embeddings and norms after `apply_lora(...,
    trainable="embed,norm")`). `save_embedding_layers` also stores the base weights of LoRA-adapted embeddings
    (PEFT does this by default when an embedding is targeted, for resized vocabularies).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA or (IA)³ layers to save")
    kinds = {isinstance(layer, IA3Linear) for layer in layers.values()}
    if len(kinds) > 1:
        raise ConfigError("the model mixes LoRA and (IA)³ layers; save them as separate adapters")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for suffix, parameter in layer.adapter_parameters().items():
            tensors[f"{name}.{suffix}"] = parameter.detach().clone()
        if save_embedding_layers and isinstance(layer, LoRAEmbedding):
            tensors[f"{name}.base_layer.weight"] = layer.base_layer.weight.detach().clone()
    if modules_to_save is not None:
        save_names = find_modules_to_save(model, modules_to_save)
    else:
        save_names = _trained_modules(model, layers)
    for module_name in save_names:
        for param_name, parameter in model.get_submodule(module_name).named_parameters():
            tensors[f"{module_name}.{param_name}"] = parameter.detach().clone()
    universe = [name for name in original_modules(model) if name]
    save_spec = compact_names(save_names, universe, suffix_rule) if save_names else None
    if kinds.pop():
        config: AdapterConfig = _ia3_config(layers, universe, save_spec)
    else:
        targets = _compact_targets(list(layers), universe, save_spec)
        config = _lora_config(layers, targets, save_spec)
    config.base_model_name_or_path = base_model_name_or_path
    return Adapter(config, tensors)


# ------------------------------------------------------------------------------------------------------------
# Adapter -> model


def _shape_hint(adapter: Adapter, key: str, module: nn.Module | None) -> str:
    parts = split_adapter_key(key)
    if parts is None or not isinstance(adapter.config, LoraConfig) or module is None:
        return ""
    name = parts[0]
    size = (
        f"in_features={module.in_features}, out_features={module.out_features}"
        if isinstance(module, LoRALinear)
        else f"num_embeddings={getattr(module, 'num_embeddings', '?')}, "
        f"embedding_dim={getattr(module, 'embedding_dim', '?')}"
    )
    return f" (the adapter config gives r={adapter.config.rank_for(name)} for this module; module {size})"


def _unknown_key_message(adapter: Adapter, key: str, model: nn.Module) -> str:
    where = adapter._where()
    parts = split_adapter_key(key)
    module = parts[0] if parts else key.rpartition(".")[0]
    if parts is None and re.search(r"\.(lora_[AB]|lora_embedding_[AB]|ia3_l)\.[^.]+(\.weight)?$", key):
        return f"{where}tensor {key!r} carries an adapter name; PEFT files store keys without it"
    if module in original_modules(model):
        return (
            f"{where}tensor {key!r} is for module {module}, which the adapter config "
            "(target_modules / modules_to_save) does not select"
        )
    return (
        f"{where}tensor {key!r} matches no module of the model "
        "(was the adapter trained on another architecture?)"
    )


def _plan_copies(model: nn.Module, adapter: Adapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check every key and shape before anything is written; return (destination, source) pairs."""
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = adapter_layers(model)
    plan = []
    for key, tensor in adapter.tensors.items():
        target = params.get(key)
        if target is None:
            raise ConfigError(_unknown_key_message(adapter, key, model))
        if tuple(target.shape) != tuple(tensor.shape):
            parts = split_adapter_key(key)
            module_name = parts[0] if parts else key.rpartition(".")[0]
            raise ConfigError(
                f"{adapter._where()}shape mismatch for module {module_name}: tensor {key} has shape "
                f"{tuple(tensor.shape)} in the adapter but the model expects {tuple(target.shape)}"
                + _shape_hint(adapter, key, layers.get(module_name))
            )
        plan.append((target, tensor))
    return plan


def set_adapter_weights(model: nn.Module, adapter: Adapter, modules: Iterable[str] | None = None) -> None:
    """Copy `adapter`'s tensors into a model that already has the matching adapter layers.

    Every adapter layer named in `modules` (default: all of them) must receive all its tensors.
    """
    plan = _plan_copies(model, adapter)
    layers = adapter_layers(model)
    for name in modules if modules is not None else layers:
        for suffix in layers[name].adapter_parameters():
            if f"{name}.{suffix}" not in adapter.tensors:
                raise ConfigError(
                    f"{adapter._where()}no tensor {name}.{suffix}: the adapter config selects module {name} "
                    "but the weights do not contain it"
                )
    with torch.no_grad():
        for destination, source in plan:
            destination.copy_(source.to(destination.device))


def apply_adapter(
    model: nn.Module, adapter: Adapter, *, trainable: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Add `adapter`'s layers to `model` and load its tensors; returns `model`.

    Nothing is changed if a key or shape does not fit (the error names the module, key and shapes). With
    `trainable=False` every parameter is frozen (inference); with True, the adapter tensors and whole-module
    tensors are trainable and everything else frozen. `dtype` is the adapter dtype (default fp32).
    """
    config = adapter.config
    if isinstance(config, LoraConfig):
        names = inject_lora(model, config, dtype=dtype)
    else:
        names = inject_ia3(model, config, dtype=dtype)
    try:
        set_adapter_weights(model, adapter, names)
    except Exception:
        unload(model, names)
        raise
    model.requires_grad_(False)
    if trainable:
        params = dict(model.named_parameters(remove_duplicate=False))
        for key in adapter.tensors:
            if ".base_layer." not in key:  # a saved embedding base stays frozen, as in PEFT
                params[key].requires_grad_(True)
        layers = adapter_layers(model)
        for name in names:
            for parameter in layers[name].adapter_parameters().values():
                parameter.requires_grad_(True)
    return model


@contextmanager
def applied_adapter(model: nn.Module, adapter: Adapter) -> Iterator[nn.Module]:
    """Temporarily apply `adapter`; on exit the model is as before (layers, base tensors, requires_grad)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    flags = [(p, p.requires_grad) for p in params.values()]
    saved = {}
    for key in adapter.full_module_keys():
        base_key = key.replace(".base_layer.", ".")
        if base_key in params:
            saved[base_key] = params[base_key].detach().clone()
    before = set(adapter_layers(model))
    apply_adapter(model, adapter)
    try:
        yield model
    finally:
        unload(model, [name for name in adapter_layers(model) if name not in before])
        with torch.no_grad():
            for key, value in saved.items():
                params[key].copy_(value)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
