"""Parameter-efficient weight ensembling (PEWE): initialise a new adapter from adapters trained on other
tasks.

Lv, Ding, Qin, Liu, Sun, "Parameter-efficient Weight Ensembling Facilitates Task-level Knowledge Transfer",
ACL 2023 (short), pp. 270–282; code: telxt/Delta_search.

Given source adapters θ_1..θ_n (same structure) and a similarity score s_i of each source to the target task
(higher is more similar; the paper's best simple choice is the negative loss of the model with θ_i on a few
target examples), the weights are

    w = softmax(s / T),   T = 0.1,

and the new adapter is the element-wise weighted average of every adapter tensor, θ_init = Σ_i w_i θ_i. θ_init
is the *initialisation* for ordinary adapter training on the target task. As T → 0 it becomes the single best
source; as T → ∞, the plain average. The scorer is generic: any `loss_fn(model, example) -> scalar` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.peft.adapter import Adapter, applied_adapter
from hayai.peft.config import IA3Config, LoraConfig

PEWE_TEMPERATURE = 0.1


def pewe_weights(scores: Sequence[float], temperature: float = PEWE_TEMPERATURE) -> list[float]:
    """w = softmax(s / T): non-negative, summing to 1, largest for the highest score."""
    if not scores:
        raise ConfigError("no scores to weight")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r}")
    logits = torch.tensor([float(s) for s in scores], dtype=torch.float64) / temperature
    return torch.softmax(logits, dim=0).tolist()


def _scaling_signature(config: LoraConfig | IA3Config) -> tuple:
    if isinstance(config, LoraConfig):
        return (
            "LORA",
            config.r,
            float(config.lora_alpha),
            config.use_rslora,
            tuple(sorted(config.rank_pattern.items())),
            tuple(sorted(config.alpha_pattern.items())),
        )
    return ("IA3",)


def ensemble_adapters(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """θ = Σ_i w_i θ_i for every tensor; the adapters must share keys, shapes and LoRA rank/alpha."""
    if not adapters:
        raise ConfigError("no adapters to ensemble")
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters")
    first = adapters[0]
    for index, adapter in enumerate(adapters[1:], start=1):
        if _scaling_signature(adapter.config) != _scaling_signature(first.config):
            raise ConfigError(
                f"adapter {index} has a different type or rank/alpha settings than adapter 0; element-wise "
                "averaging needs identically configured adapters"
            )
        if set(adapter.tensors) != set(first.tensors):
            odd = sorted(set(adapter.tensors) ^ set(first.tensors))
            raise ConfigError(
                f"adapter {index} and adapter 0 differ in tensor {odd[0]!r} ({len(odd)} keys differ)"
            )
        for key, tensor in adapter.tensors.items():
            if tensor.shape != first.tensors[key].shape:
                raise ConfigError(
                    f"tensor {key}: adapter {index} has shape {tuple(tensor.shape)}, adapter 0 has "
                    f"{tuple(first.tensors[key].shape)}"
                )
    tensors = {}
    for key, reference in first.tensors.items():
        total = torch.zeros(reference.shape, dtype=torch.float32, device=reference.device)
        for adapter, weight in zip(adapters, weights, strict=True):
            total += float(weight) * adapter.tensors[key].float().to(reference.device)
        tensors[key] = total.to(reference.dtype)
    return Adapter(first.config, tensors)


def loss_scores(
    model: nn.Module,
    adapters: Sequence[Adapter],
    examples: Iterable[object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor | float],
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """s_i = −mean over `examples` of `loss_fn(model, example)` with adapter i applied (no gradients, eval
    mode).

    `model` is the base model without adapters; it is returned to its exact previous state after each adapter.
    """
    examples = list(examples)
    if not examples:
        raise ConfigError("loss_scores needs at least one example")
    was_training = model.training
    model.eval()
    scores = []
    try:
        for index, adapter in enumerate(adapters):
            with applied_adapter(model, adapter), torch.no_grad():
                losses = [float(loss_fn(model, example)) for example in examples]
            scores.append(-sum(losses) / len(losses))
            if progress is not None:
                progress(index + 1, len(adapters))
    finally:
        model.train(was_training)
    return scores


@dataclass(frozen=True)
class PeweResult:
    adapter: Adapter  # the ensembled initialisation
    scores: list[float]  # s_i, one per source
    weights: list[float]  # w_i = softmax(s / T)


def pewe_init(
    model: nn.Module,
    adapters: Sequence[Adapter],
    examples: Iterable[object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor | float],
    *,
    temperature: float = PEWE_TEMPERATURE,
    progress: Callable[[int, int], None] | None = None,
) -> PeweResult:
    """Score each source adapter by its loss on a few target `examples`, then ensemble them (PEWE with the
    loss scorer). Apply `result.adapter` with `apply_adapter(model, result.adapter, trainable=True)` and
    train."""
    scores = loss_scores(model, adapters, examples, loss_fn, progress)
    weights = pewe_weights(scores, temperature)
    return PeweResult(ensemble_adapters(adapters, weights), scores, weights)
