"""The Python facade: `hayai.load(...)` returns an `LLM` that generates and chats.

    import hayai
    llm = hayai.load()                      # the default model, pulled and converted on first use
    print(llm.generate("Name three primary colours."))
    for piece in llm.stream("Count to five."):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hayai.decode.engine import Completion, DecodeStrategy, Engine, TextStream
from hayai.decode.sampling import SamplingParams
from hayai.models.loading import ModelInfo, Progress, load_model
from hayai.models.tokenizer import Message, Tokenizer
from hayai.runtime import configure_threads, resolve_device, resolve_dtype


class LLM:
    """A loaded model with its tokenizer and generation engine."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, info: ModelInfo):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.engine = Engine(model, tokenizer)
        self.last_completion: Completion | None = None
        self._drafts: dict[str, torch.nn.Module] = {}

    def __repr__(self) -> str:
        return f"LLM({self.info.name!r}, dtype={self.model.dtype}, device={self.model.device})"

    # ---- prompts ---------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[Message], *, raw: bool = False,
                   system: str | None = None) -> list[int]:
        """Token ids for a prompt: chat-formatted for chat models unless `raw`, or a message list as is."""
        if not isinstance(prompt, str):
            return self.tokenizer.encode_chat(list(prompt))
        if raw or not self.tokenizer.has_chat_template:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(messages)

    # ---- generation ------------------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[Message], *, raw: bool = False, system: str | None = None,
               max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, stop: Sequence[str] = (), truncate: bool = False,
               strategy: DecodeStrategy | None = None, speculate: str | None = None,
               draft: LLM | str | None = None, speculate_options: Any = None) -> TextStream:
        """Iterate over text pieces as they are generated; `.completion` has the text, ids and stats after.

        `speculate` names a lossless decode strategy ("lookup", "draft" with `draft=`, "self", "lookahead",
        "jacobi"; see `hayai.decode.strategies`), tuned by `speculate_options` (a `SpeculateOptions`).
        """
        if strategy is None and speculate is not None:
            strategy = self.strategy(speculate, draft=draft, options=speculate_options)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stream = self.engine.stream(self.prompt_ids(prompt, raw=raw, system=system), max_new_tokens=max_tokens,
                                    sampling=sampling, stop=stop, truncate=truncate, strategy=strategy)
        return _Remembering(stream, self)

    def strategy(self, name: str, *, draft: LLM | str | None = None, options: Any = None) -> DecodeStrategy:
        """A fresh decode strategy called `name` for this model (`draft`: an LLM or a model name/path)."""
        from hayai.decode.strategies import build_strategy

        draft_model = None
        if isinstance(draft, LLM):
            draft_model = draft.model
        elif draft is not None:
            if draft not in self._drafts:
                from hayai.decode.compiled import CompiledLM, compile_decode

                loaded, _, _ = load_model(draft, dtype=self.model.dtype, device=self.model.device)
                self._drafts[draft] = compile_decode(loaded) if isinstance(self.model, CompiledLM) else loaded
            draft_model = self._drafts[draft]
        return build_strategy(name, self.model, stop_token_ids=self.tokenizer.eos_token_ids, draft=draft_model,
                              options=options)

    def generate(self, prompt: str | Sequence[Message], **kwargs: Any) -> str:
        """The whole answer as a string. Keyword arguments as for `stream`; stats in `last_completion`."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        return stream.completion.text

    def chat(self, messages: str | Sequence[Message], **kwargs: Any) -> str:
        """Answer the last user message of a conversation (a list of {'role', 'content'} dicts)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.generate(list(messages), **kwargs)


class _Remembering(TextStream):
    """A TextStream that records its completion on the LLM when iteration ends."""

    def __init__(self, inner: TextStream, llm: LLM):
        super().__init__(iter(()), lambda: None)
        self._inner, self._llm = inner, llm

    def __iter__(self):
        yield from self._inner
        self.completion = self._inner.completion
        self._llm.last_completion = self.completion


def load(name_or_path: str | None = None, *, dtype: str | torch.dtype = "auto", device: str = "auto",
         threads: int | None = None, verify: bool = True, progress: Progress | None = None,
         adapter: str | None = None, quant: str | None = None, group_size: int | None = None,
         compile: bool = False) -> LLM:
    """Load a model: a store name, a known name (pulled on first use), an HF checkpoint dir or a .gguf file.

    dtype "auto" is bf16 on GPUs; on CPU bf16 where this CPU runs a bf16 decode matmul at least as fast as fp32
    (measured once, ~10 ms), fp32 elsewhere; int8/int4 weights (`quant`, or a `hayai quantize` store entry) run
    with the activations their packed kernels are fast in (bf16).
    `adapter` is a PEFT-format adapter directory (LoRA or (IA)³, e.g. from `hayai finetune`) applied on top.
    `quant` ("int8" or "int4", groups of `group_size`) quantizes the weights after loading (`hayai quantize`
    stores a quantized copy instead); the packed kernels are fast with bf16 activations.
    `compile` fuses q/k/v and gate/up (inference only) and runs decode steps through `torch.compile`
    (`hayai.decode.compiled`; the first call compiles)."""
    configure_threads(threads)
    target = resolve_device(device)
    auto = dtype in (None, "auto")
    resolved = resolve_dtype(dtype, target)
    if auto and quant is not None:
        from hayai.quant import preferred_activation_dtype

        resolved = preferred_activation_dtype(quant, target.type) or resolved
    model, tokenizer, info = load_model(name_or_path, dtype=resolved, device=target, verify=verify,
                                        progress=progress)
    if adapter is not None:
        from hayai.finetuning import apply_saved_context
        from hayai.peft import load_adapter

        apply_saved_context(model, adapter)  # an adapter trained with `--context` needs its RoPE scaling
        load_adapter(model, adapter)
    if quant is not None:
        from hayai.quant import quantize_model

        quantize_model(model, quant, group_size=group_size, embeddings=quant in ("int8", "int4"))
    elif auto:
        model = _in_kernel_dtype(model)
    if compile:
        from hayai.decode.compiled import compile_decode

        model = compile_decode(model)
    return LLM(model, tokenizer, info)


def _in_kernel_dtype(model: torch.nn.Module) -> torch.nn.Module:
    """A model stored quantized (`hayai quantize`) cast to the activation dtype its packed kernels are fast in."""
    from hayai.quant import model_activation_dtype

    preferred = model_activation_dtype(model)
    return model.to(preferred) if preferred is not None and preferred != model.dtype else model
