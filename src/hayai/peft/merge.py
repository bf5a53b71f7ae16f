"""Weighted combination of several adapters into one (PEFT's `add_weighted_adapter`, on `Adapter` objects).

For LoRA adapters i = 1..n with weights w_i, per module (s_i its scale, A_i: [r_i, in], B_i: [out, r_i]):
  - "cat":    A = [w_1 s_1 A_1; ...; w_n s_n A_n]  (ranks stacked),  B = [B_1, ..., B_n]
              so B·A = Σ w_i s_i B_i A_i = Σ w_i ΔW_i exactly; rank Σ r_i.
  - "linear": A = Σ sign(w_i s_i) √|w_i s_i| A_i,  B = Σ √|w_i s_i| B_i   (equal ranks required). B·A is NOT
              Σ w_i ΔW_i (cross terms B_i A_j appear): a cheap approximation, as in PEFT.
  - "svd":    ΔW = Σ w_i s_i B_i A_i,  U S Vᵀ = svd(ΔW),  B = U_k S_k,  A = V_kᵀ  with k = svd_rank (default:
    the
              largest source rank): the best rank-k approximation of Σ w_i ΔW_i (Eckart–Young).
The result has lora_alpha = r so its own scale is 1 (with use_rslora off: PEFT 0.21 copies use_rslora from the
first source and so over-scales by √r when it is on, fixed upstream in PR #3449). A module missing from some
sources takes only the sources that have it.

For (IA)³ adapters the vectors are summed: ℓ = Σ w_i ℓ_i. A module missing from a source counts as ℓ_i = 1
(the identity scaling that source applies there); PEFT instead skips it, which agrees whenever all sources
target the same modules.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import torch

from hayai.errors import ConfigError
from hayai.peft.adapter import Adapter, deviation_patterns
from hayai.peft.config import IA3Config, LoraConfig, TargetSpec

CombinationType = Literal["svd", "linear", "cat"]


def _check_inputs(adapters: Sequence[Adapter], weights: Sequence[float], peft_type: str) -> None:
    if not adapters:
        raise ConfigError("no adapters to combine")
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters")
    for index, adapter in enumerate(adapters):
        if adapter.peft_type != peft_type:
            raise ConfigError(f"adapter {index} is {adapter.peft_type}, expected {peft_type}")
        if adapter.full_module_keys():
            raise ConfigError(
                f"adapter {index} also trains whole modules ({adapter.full_module_keys()[0]}, ...); weighted "
                "combination is defined for adapter tensors only (ensemble_adapters averages everything)"
            )


def _union_targets(
    configs: Sequence[LoraConfig | IA3Config], modules: list[str], field: str = "target_modules"
) -> TargetSpec:
    """PEFT's union of the sources' target specs, or the exact module names when specs cannot be unioned."""
    specs = [getattr(config, field) for config in configs]
    plain = all(
        not config.exclude_modules and not getattr(config, "layers_to_transform", None) for config in configs
    )
    if plain and all(isinstance(spec, list) for spec in specs):
        return sorted(set().union(*specs))
    if plain and all(isinstance(spec, str) for spec in specs) and field == "target_modules":
        return "|".join(f"({spec})" for spec in specs)
    return sorted(modules)


def _modules_in_order(adapters: Sequence[Adapter]) -> list[str]:
    return list(dict.fromkeys(name for adapter in adapters for name in adapter.adapted_modules()))


def _keys(module: str, is_embedding: bool) -> tuple[str, str]:
    if is_embedding:
        return f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def _combine_module(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]],
    method: str,
    svd_rank: int,
    svd_clamp: float | None,
    module: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for one module from its sources' (A_i, B_i, w_i·s_i), all in fp32."""
    if method == "cat":
        return (
            torch.cat([a * ws for a, _, ws in factors], dim=0),  # [Σ r_i, in]
            torch.cat([b for _, b, _ in factors], dim=1),
        )  # [out, Σ r_i]
    if method == "linear":
        ranks = {a.shape[0] for a, _, _ in factors}
        if len(ranks) > 1:
            raise ConfigError(
                f"combination 'linear' needs equal ranks; module {module} has ranks {sorted(ranks)}"
            )
        a = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for a, _, ws in factors)
        b = sum(math.sqrt(abs(ws)) * b for _, b, ws in factors)
        return a, b
    delta = sum(ws * (b @ a) for a, b, ws in factors)  # [out, in]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # [out, k'], [k'], [k', in]
    k = min(svd_rank, s.shape[0])
    b, a = u[:, :k] * s[:k], vh[:k]  # [out, k], [k, in]
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    if k < svd_rank:  # keep the requested rank (zero directions) so every module has the same r
        a = torch.cat([a, a.new_zeros(svd_rank - k, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], svd_rank - k)], dim=1)
    return a, b


def combine_lora(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    combination_type: CombinationType = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
) -> Adapter:
    """One LoRA adapter from weighted LoRA adapters (see the module docstring for the three methods)."""
    _check_inputs(adapters, weights, "LORA")
    if combination_type not in ("svd", "linear", "cat"):
        raise ConfigError(f"combination_type must be 'svd', 'linear' or 'cat', got {combination_type!r}")
    configs: list[LoraConfig] = [adapter.config for adapter in adapters]  # type: ignore[misc]
    modules = _modules_in_order(adapters)
    present = [set(adapter.adapted_modules()) for adapter in adapters]
    rank = svd_rank or max(
        a.lora_factors(m)[0].shape[0] for a, ms in zip(adapters, present, strict=True) for m in ms
    )
    tensors, ranks = {}, {}
    for module in modules:
        factors, is_embedding, dtype = [], False, None
        for adapter, config, weight, has in zip(adapters, configs, weights, present, strict=True):
            if module not in has:
                continue
            a, b, is_embedding = adapter.lora_factors(module)
            dtype = dtype or a.dtype
            factors.append((a.float(), b.float(), weight * config.scaling_for(module)))
        a, b = _combine_module(factors, combination_type, rank, svd_clamp, module)
        key_a, key_b = _keys(module, is_embedding)
        tensors[key_a], tensors[key_b] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        ranks[module] = a.shape[0]
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = deviation_patterns(ranks, common)
    config = LoraConfig(
        target_modules=_union_targets(configs, modules),
        r=common,
        lora_alpha=common,
        lora_dropout=configs[0].lora_dropout,
        use_rslora=False,
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        base_model_name_or_path=configs[0].base_model_name_or_path,
        task_type=configs[0].task_type,
    )
    return Adapter(config, tensors)


def combine_ia3(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """One (IA)³ adapter with ℓ = Σ w_i ℓ_i per module (a module a source lacks counts as ℓ_i = 1)."""
    _check_inputs(adapters, weights, "IA3")
    modules = _modules_in_order(adapters)
    tensors = {}
    for module in modules:
        key = f"{module}.ia3_l"
        present = [adapter.tensors[key] for adapter in adapters if key in adapter.tensors]
        shapes = {tuple(t.shape) for t in present}
        if len(shapes) > 1:
            raise ConfigError(f"module {module}: (IA)³ vectors of different shapes {sorted(shapes)}")
        total = torch.zeros_like(present[0], dtype=torch.float32)
        for adapter, weight in zip(adapters, weights, strict=True):
            total += weight * (adapter.tensors[key].float() if key in adapter.tensors else 1.0)
        tensors[key] = total.to(present[0].dtype)
    configs: list[IA3Config] = [adapter.config for adapter in adapters]  # type: ignore[misc]
    feedforward = [
        m
        for m in modules
        if any(
            c.is_feedforward(m) for a, c in zip(adapters, configs, strict=True) if f"{m}.ia3_l" in a.tensors
        )
    ]
    config = IA3Config(
        target_modules=_union_targets(configs, modules),
        feedforward_modules=_union_targets(configs, feedforward, "feedforward_modules")
        if feedforward
        else [],
        base_model_name_or_path=configs[0].base_model_name_or_path,
        task_type=configs[0].task_type,
    )
    return Adapter(config, tensors)
