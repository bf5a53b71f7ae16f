"""Compiled decode: `torch.compile` of the model's short forward passes over a static KV cache.

Eager decoding issues about 2,000 small PyTorch operations per token for a 30-layer model; once the weights
are int8/int4 that Python and dispatch overhead, not reading the weights, bounds the speed. `CompiledLM`
wraps a `CausalLM` (sharing its modules) so that every forward pass of at most `max_step_tokens` new tokens
over a KV cache runs one compiled graph (TorchInductor fuses the norms, RoPE, the cache write and the
elementwise MLP ops into a few C++ kernels around the matmuls), the approach of gpt-fast (pytorch-labs).

For shapes to stay fixed, a compiled pass attends over every one of the cache's `max_length` slots with an
explicit mask instead of over the filled prefix:

    slot_b,j = length_b + j                                    (the cache always appends)
    mask[b, 0, j, s] = s <= slot_b,j        (or the caller's mask, padded with False up to max_length)
    k_cache[b, :, slot_b,j] = k_b,j ;  attention(q, k_cache, v_cache, mask)

Only the number of new tokens T and the cache length L vary between calls; both are marked dynamic, so one
graph serves single-token decode (T = 1 is specialised by the compiler) and one serves every verification
pass of speculative or lookahead decoding. Longer passes (prefill) and passes without a cache run eagerly.

Fallback: when compilation fails (no C++ compiler, an operation the compiler rejects) the wrapper records
why in `fallback_reason` and runs eagerly from then on; outputs are the same up to floating-point rounding.
Compilation takes tens of seconds on first use (TorchInductor caches compiled code on disk for later runs).
"""

from __future__ import annotations

import itertools
import types

import torch
from torch import nn

from hayai.models.kv_cache import KVCache, WritePlan
from hayai.models.llama import CausalLM

_instances = itertools.count()


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn` with a code object of its own. Dynamo keeps one cache of compiled graphs per code object,
    with a recompile limit (8); without this, every wrapped architecture and dtype would share that limit, and
    once it is reached dynamo silently runs the function eagerly."""
    name = f"{fn.__code__.co_name}_{next(_instances)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class _StaticSlots:
    """The cache interface the model calls (`plan`, `update`, `commit`) over a cache's tensors, with every
    index a tensor: nothing here depends on host-side lengths, so a compiled graph is reused at every position."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                 mask: torch.Tensor):
        self.keys, self.values, self.slots, self.mask = keys, values, slots, mask

    def plan(self, num_new: int) -> WritePlan:
        return WritePlan(self.slots, None, self.keys[0].shape[2], self.mask, causal=False)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        self.keys[layer][rows, :, self.slots] = k.transpose(1, 2)  # indexed view [B, T, H_kv, D]
        self.values[layer][rows, :, self.slots] = v.transpose(1, 2)
        return self.keys[layer], self.values[layer]  # [B, H_kv, L, D]

    def commit(self) -> None:
        pass  # lengths live on the host; CompiledLM updates them after the call


def static_inputs(cache: KVCache, num_new: int, positions: torch.Tensor | None,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slots [B, T], RoPE positions [B, T], mask [B, 1, T, L]) for appending `num_new` tokens to `cache`."""
    device = cache.keys[0].device
    lengths = torch.tensor(cache.lengths, device=device)
    slots = lengths[:, None] + torch.arange(num_new, device=device)  # [B, T]
    full = cache.max_length
    if mask is None:
        mask = torch.arange(full, device=device)[None, None, None, :] <= slots[:, None, :, None]  # [B, 1, T, L]
    else:
        mask = mask.expand(len(cache.lengths), 1, num_new, mask.shape[-1])
        mask = torch.nn.functional.pad(mask, (0, full - mask.shape[-1]), value=False)  # [B, 1, T, L]
    return slots, slots if positions is None else positions, mask


class CompiledLM(CausalLM):
    """A `CausalLM` sharing `model`'s modules whose short cached forward passes run compiled (see the module
    docstring). `eager` is the wrapped model; use it for anything that needs the eager module itself."""

    def __init__(self, model: CausalLM, max_step_tokens: int = 32, backend: str = "inductor"):
        nn.Module.__init__(self)
        self.config = model.config
        self.model = model.model  # the same modules: parameters, quantized layers, adapters
        self.lm_head = model.lm_head
        self._eager = (model,)  # a tuple, so the wrapped model is not registered twice as a submodule
        self.max_step_tokens = max_step_tokens
        self.backend = backend
        self.fallback_reason: str | None = None
        self.compiled_calls = 0
        own = types.MethodType(_own_code(CompiledLM._static_hidden), self)
        self._compiled = torch.compile(own, backend=backend, dynamic=None)
        self._warm_up()

    @property
    def eager(self) -> CausalLM:
        return self._eager[0]

    def _warm_up(self) -> None:
        """One eager pass, so that layers converting weights lazily (int4 kernel layout) do it outside the graph."""
        with torch.inference_mode():
            self.eager.hidden(torch.zeros(1, 1, dtype=torch.long, device=self.device))

    def _static_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       mask: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids, positions, _StaticSlots(keys, values, slots, mask), mask)  # [B, T, hidden]

    def _use_compiled(self, input_ids: torch.Tensor, cache: KVCache | None) -> bool:
        return (self.fallback_reason is None and cache is not None and input_ids.shape[1] <= self.max_step_tokens
                and not torch.is_grad_enabled())

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self._use_compiled(input_ids, cache):
            return self.model(input_ids, positions, cache, mask)
        num_new = input_ids.shape[1]
        if max(cache.lengths) + num_new > cache.max_length:
            cache.plan(num_new)  # raises the cache's own overflow error
        slots, rope_positions, full_mask = static_inputs(cache, num_new, positions, mask)
        if num_new > 1:  # one graph for every verification length (T = 1 keeps its own specialised graph)
            for t in (input_ids, rope_positions, slots):
                torch._dynamo.mark_dynamic(t, 1)
            torch._dynamo.mark_dynamic(full_mask, 2)
        for t in (*cache.keys, *cache.values):
            torch._dynamo.mark_dynamic(t, 2)
        torch._dynamo.mark_dynamic(full_mask, 3)
        try:
            hidden = self._compiled(input_ids, rope_positions, slots, full_mask, cache.keys, cache.values)
        except Exception as exc:  # compilation unavailable or failed: record why and stay eager
            self.fallback_reason = _reason(exc)
            return self.model(input_ids, positions, cache, mask)
        cache.lengths = [n + num_new for n in cache.lengths]
        self.compiled_calls += 1
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, positions, cache, mask))


def _reason(exc: Exception) -> str:
    """One line saying why compilation failed (the compiler's own error, not dynamo's wrapper)."""
    inner = getattr(exc, "inner_exception", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0] if lines else 'no message'}"


def compile_decode(model: CausalLM, max_step_tokens: int = 32, backend: str = "inductor",
                   fuse: bool = True) -> CompiledLM:
    """`model` with compiled short forward passes; see `CompiledLM`. Returns `model` itself if already compiled.

    With `fuse`, q/k/v and gate/up are first fused in place (`hayai.decode.fused`: 4 matmuls per layer instead
    of 7); the model is then for inference only (the separate projection names are gone)."""
    if isinstance(model, CompiledLM):
        return model
    if fuse:
        from hayai.decode.fused import fuse_projections

        fuse_projections(model)
    return CompiledLM(model, max_step_tokens=max_step_tokens, backend=backend)
