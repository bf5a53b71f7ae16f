"""Adding adapters to a model and taking them off again: module replacement, freezing, merging, unloading.

`apply_lora` / `apply_ia3` swap each target module (PEFT's matching rules, see `targets.py`) for a
`LoRALinear`, `LoRAEmbedding` or `IA3Linear` wrapping it, freeze every other parameter and mark the adapter
tensors trainable. Two ways to train more than the adapter:
  - `modules_to_save` (PEFT): modules selected by name suffix are trained whole and saved with the adapter;
  - `trainable` (LongLoRA): parameter-name substrings, e.g. "embed,norm" trains the embeddings and every norm.
`merge_and_unload` folds each adapter into its base and returns plain modules (a quantized base is dequantized
into a dense nn.Linear); `unload` drops the adapters and restores the original bases.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft.base_layers import is_quantized_linear
from hayai.peft.config import IA3Config, LoraConfig, TargetSpec
from hayai.peft.ia3 import IA3Linear
from hayai.peft.lora import LoRAEmbedding, LoRALinear
from hayai.peft.targets import (
    adapter_layer_types,
    find_modules_to_save,
    find_targets,
    is_linear_like,
)

AdapterLayer = LoRALinear | LoRAEmbedding | IA3Linear


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter wrapper in `model`, by module name."""
    types = adapter_layer_types()
    return {name: module for name, module in model.named_modules() if isinstance(module, types)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ConfigError("the model itself cannot be replaced by an adapter; wrap it in a container first")
    new.train(
        model.get_submodule(name).training
    )  # a new wrapper keeps the train/eval mode of what it replaces
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _lora_supported(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, nn.Embedding)


def inject_lora(model: nn.Module, config: LoraConfig, *, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every module matched by `config` in a LoRA layer (rank/alpha per module from the patterns)."""
    names = find_targets(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        supported=_lora_supported,
    )
    for name in names:
        base = model.get_submodule(name)
        r, alpha = config.rank_for(name), config.alpha_for(name)
        if isinstance(base, nn.Embedding):
            layer = LoRAEmbedding(
                base, r, alpha, config.use_rslora, init_lora_weights=config.init_lora_weights, dtype=dtype
            )
        else:
            layer = LoRALinear(
                base,
                r,
                alpha,
                config.lora_dropout,
                config.use_rslora,
                init_lora_weights=config.init_lora_weights,
                dtype=dtype,
            )
        _replace(model, name, layer)
    return names


def inject_ia3(model: nn.Module, config: IA3Config, *, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every module matched by `config` in an IA3Linear (input scaling for the feed-forward modules)."""
    names = find_targets(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
    )
    for name in names:
        layer = IA3Linear(
            model.get_submodule(name),
            config.is_feedforward(name),
            init_ia3_weights=config.init_ia3_weights,
            dtype=dtype,
        )
        _replace(model, name, layer)
    return names


def _split_patterns(trainable: str | list[str] | None) -> list[str]:
    if trainable is None:
        return []
    items = trainable.split(",") if isinstance(trainable, str) else list(trainable)
    return [item.strip() for item in items if item.strip()]


def set_trainable(
    model: nn.Module, modules_to_save: list[str] | None = None, trainable: str | list[str] | None = None
) -> None:
    """Freeze everything, then unfreeze the adapter tensors, the `modules_to_save` modules and the parameters
    whose names contain one of the `trainable` substrings (comma-separated string or list)."""
    model.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for parameter in layer.adapter_parameters().values():
            parameter.requires_grad_(True)
    for name in find_modules_to_save(model, modules_to_save):
        model.get_submodule(name).requires_grad_(True)
    patterns = _split_patterns(trainable)
    wrapped = [name + "." for name in adapter_layers(model)]
    for pattern in patterns:
        selected = [(n, p) for n, p in model.named_parameters() if pattern in n]
        if not selected:
            raise ConfigError(f"trainable pattern {pattern!r} matches no parameter name of the model")
        for name, parameter in selected:
            if any(name.startswith(prefix) for prefix in wrapped):
                raise ConfigError(
                    f"trainable pattern {pattern!r} selects {name}, which belongs to an adapter-wrapped "
                    "module; "
                    "train a module either whole or through its adapter, not both"
                )
            parameter.requires_grad_(True)


def apply_lora(
    model: nn.Module,
    *,
    target_modules: TargetSpec = "all-linear",
    r: int = 8,
    alpha: float = 8,
    dropout: float = 0.0,
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
    trainable: str | list[str] | None = None,
    exclude_modules: TargetSpec = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
    init_lora_weights: bool | str = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add LoRA to `model` in place and return it; only adapter (and selected) parameters stay trainable.

    `target_modules`: names (exact, or matched as the last dotted components), one full-match regex, or
    "all-linear" (every linear-like module except the output layer). `dtype` is the adapter dtype (default
    fp32).
    """
    config = LoraConfig(
        target_modules=target_modules,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        init_lora_weights=init_lora_weights,
    )
    inject_lora(model, config, dtype=dtype)
    set_trainable(model, modules_to_save, trainable)
    return model


def apply_ia3(
    model: nn.Module,
    *,
    target_modules: TargetSpec = ("k_proj", "v_proj", "down_proj"),
    feedforward_modules: TargetSpec = ("down_proj",),
    modules_to_save: list[str] | None = None,
    trainable: str | list[str] | None = None,
    exclude_modules: TargetSpec = None,
    init_ia3_weights: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add (IA)³ to `model` in place and return it (defaults: PEFT's Llama targets, down_proj scaled at its
    input)."""
    config = IA3Config(
        target_modules=list(target_modules) if isinstance(target_modules, tuple) else target_modules,
        feedforward_modules=list(feedforward_modules)
        if isinstance(feedforward_modules, tuple)
        else feedforward_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        init_ia3_weights=init_ia3_weights,
    )
    inject_ia3(model, config, dtype=dtype)
    set_trainable(model, modules_to_save, trainable)
    return model


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base in place (needs plain nn.Linear / nn.Embedding bases)."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter wrapper by a plain module with the adapter folded in, and return `model`.

    Plain bases are updated in place; a quantized base is dequantized into a new dense nn.Linear (quantizing
    it again rounds the merged weights, PEFT issue #2321).
    """
    for name, layer in adapter_layers(model).items():
        if isinstance(layer.base_layer, nn.Linear | nn.Embedding):
            layer.merge()
            _replace(model, name, layer.base_layer)
        else:
            _replace(model, name, layer.merged_module())
    return model


def unload(model: nn.Module, names: Iterable[str] | None = None) -> nn.Module:
    """Remove the adapter wrappers (all, or those in `names`), unmerging first, restoring the original base
    modules; returns `model`."""
    layers = adapter_layers(model)
    for name in layers if names is None else list(names):
        layer = layers[name]
        layer.unmerge()
        _replace(model, name, layer.base_layer)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes as its base model (merged adapters unmerge, then merge back)."""
    with ExitStack() as stack:
        for layer in adapter_layers(model).values():
            stack.enter_context(layer.disabled())
        yield model


@dataclass(frozen=True)
class ParameterSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable_parameters_summary(model: nn.Module) -> ParameterSummary:
    """Trainable / total parameter counts (shared tensors counted once).

    A quantized linear counts as its logical in·out (+ bias) parameters, not its packed storage.
    """
    quantized = {name: m for name, m in model.named_modules() if is_quantized_linear(m)}
    prefixes = tuple(f"{name}." for name in quantized if name)
    trainable = total = 0
    for name, parameter in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            continue
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    for module in quantized.values():
        bias = getattr(module, "bias", None)
        total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
    return ParameterSummary(trainable, total)
