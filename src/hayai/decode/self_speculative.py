"""Self-speculative decoding: the target drafts for itself with its first layers (early exit) and its LM head.

Draft logits come from the hidden state after layer E < L, through the model's own final norm and LM head
(LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710, §4; Draft & Verify, Zhang et al. 2023, arXiv 2309.08168,
which skips layers instead):

    draft(x) = lm_head(norm(h_E)),    h_E = layers[E-1] ∘ … ∘ layers[0] (embed(x))

No second model is loaded. In the plain variant the draft runs the target's own modules and writes its keys
and values straight into the target's KV cache: layers < E of the draft are exactly the target's layers, and
verification rewrites those slots anyway. With `quant="int4"` (or "int8") the draft is a quantized copy of
those layers (and of the head), so drafting reads a quarter of the bytes; it then keeps its own small cache.
`exit_layer=None` means every layer: with int4 that is a quantized copy of the whole model drafting for the
full-precision one (high acceptance, ~4x fewer bytes per draft token).

Models not trained for early exit (most are not) predict poorly from shallow layers, so measure acceptance
(`benchmarks/decode.py`) before choosing an exit layer.
"""

from __future__ import annotations

import copy

from torch import nn

from hayai.decode.draft_model import DraftModel
from hayai.errors import ConfigError
from hayai.models.llama import CausalLM


def early_exit_view(model: CausalLM, exit_layer: int) -> CausalLM:
    """A CausalLM running only the first `exit_layer` blocks, then the final norm and LM head.

    The view shares every module (and so every weight) with `model`; nothing is copied.
    """
    layers = len(model.model.layers)
    if not 1 <= exit_layer <= layers:
        raise ConfigError(f"exit_layer must be in [1, {layers}] for this {layers}-layer model, got {exit_layer}")
    backbone = copy.copy(model.model)  # shallow: a new module object whose children are the same modules
    backbone._modules = dict(model.model._modules)
    backbone.layers = nn.ModuleList(list(model.model.layers)[:exit_layer])
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.model = backbone
    view.config = model.config.replace(num_hidden_layers=exit_layer)
    return view


def quantized_draft(model: CausalLM, exit_layer: int, method: str = "int4",
                    group_size: int | None = None) -> CausalLM:
    """A quantized copy of the first `exit_layer` blocks, norm and LM head (and embeddings), in the dtype the
    quantized kernels are fast for (bf16 where the CPU has it)."""
    from hayai.quant import preferred_activation_dtype, quantize_model

    draft = copy.deepcopy(early_exit_view(model, exit_layer))
    kernel_dtype = preferred_activation_dtype(method, model.device.type)
    if kernel_dtype is not None:
        draft.to(kernel_dtype)
    quantize_model(draft, method, group_size=group_size, embeddings=True)
    return draft


class EarlyExit(DraftModel):
    """Draft with the target's first `exit_layer` layers; see the module docstring."""

    name = "self"

    def __init__(self, exit_layer: int | None = None, quant: str | None = None, group_size: int | None = None,
                 num_tokens: int = 5, min_confidence: float = 0.0, stop_token_ids: frozenset[int] = frozenset()):
        if quant not in (None, "int8", "int4"):
            raise ConfigError(f"self-speculative quant must be None, 'int8' or 'int4', got {quant!r}")
        if exit_layer is None and quant is None:
            raise ConfigError("self-speculative drafting needs an exit_layer, a quant method, or both "
                              "(the full unquantized model drafting for itself gains nothing)")
        super().__init__(model=None, num_tokens=num_tokens, min_confidence=min_confidence,
                         stop_token_ids=stop_token_ids, share_cache=quant is None)
        self.exit_layer, self.quant, self.group_size = exit_layer, quant, group_size
        self._target: CausalLM | None = None

    def start(self, target, target_cache, prompt, sampling, generator):
        if self._target is not target:  # build the draft network once per target model
            from hayai.decode.compiled import CompiledLM

            base = target.eager if isinstance(target, CompiledLM) else target
            layers = self.exit_layer or len(base.model.layers)
            self.model = (early_exit_view(base, layers) if self.quant is None
                          else quantized_draft(base, layers, self.quant, self.group_size))
            if isinstance(target, CompiledLM):  # a compiled target gets a compiled draft
                self.model = CompiledLM(self.model, target.max_step_tokens, target.backend)
            self._target = target
        super().start(target, target_cache, prompt, sampling, generator)
