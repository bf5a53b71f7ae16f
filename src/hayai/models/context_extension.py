"""Context extension: let a RoPE model attend over more positions than it was trained on.

Position interpolation ("linear", Chen et al. 2023, arXiv:2306.15595) squeezes the new window into the trained
one: position m is rotated as m / s with s = L_new / L_orig, so no angle exceeds what pre-training saw; a short
fine-tune at the new length (LongLoRA, Chen et al. 2023, arXiv:2309.12307, uses S²-Attn for it) adapts the
model. Dynamic NTK ("dynamic", bloc97/emozilla 2023) instead raises the RoPE base only for sequences longer than
L_orig, base' = base · ((s · L / L_orig) − (s − 1))^(d / (d − 2)), and works without fine-tuning. Both are what
transformers' `rope_scaling` {"rope_type": "linear" | "dynamic", "factor": s} means, so the extended config is
saved as HF config.json and other runtimes read it the same way (for dynamic NTK that means
max_position_embeddings stays the trained window and `ModelConfig.context_window` is window × factor).

`extend_context(model, 16384)` swaps the model's config and rotary module (module replacement); nothing else
changes, and the weights are untouched.
"""

from __future__ import annotations

from hayai.errors import ConfigError
from hayai.models.config import ModelConfig, RopeScaling
from hayai.models.llama import CausalLM
from hayai.models.rope import RotaryEmbedding

METHODS = ("linear", "dynamic")


def extended_config(config: ModelConfig, context: int, method: str = "linear") -> ModelConfig:
    """`config` with a `context`-token window: RoPE scaled by context / trained window. A window the model already
    has needs no scaling and returns `config` unchanged."""
    if method not in METHODS:
        raise ConfigError(f"context extension method must be one of {', '.join(METHODS)}, got {method!r}")
    if context < 1:
        raise ConfigError(f"context must be >= 1, got {context}")
    scaling = config.rope_scaling
    if scaling.rope_type not in ("default", *METHODS):
        raise ConfigError(f"the model already uses {scaling.rope_type} RoPE scaling; hayai extends only unscaled, "
                          "linear or dynamic RoPE")
    original = config.trained_window
    if context <= original:
        return config
    factor = context / original
    if method == "dynamic":  # transformers' convention: max_position_embeddings stays the trained window
        return config.replace(max_position_embeddings=original, rope_scaling=RopeScaling(method, factor=factor))
    return config.replace(max_position_embeddings=context,
                          rope_scaling=RopeScaling(method, factor=factor, original_max_position_embeddings=original))


def extend_context(model: CausalLM, context: int, method: str = "linear") -> bool:
    """Give `model` a `context`-token window in place (config and rotary module); False when it already had one."""
    config = extended_config(model.config, context, method)
    if config is model.config:
        return False
    rotary = RotaryEmbedding(config).to(model.model.rotary.inv_freq.device)
    model.config = config
    model.model.rotary = rotary
    return True
