"""What each fine-tuning method is: its settings (`FinetuneConfig`), the module transforms that prepare a model for
it, its update rule, its memory plan, and exact-match evaluation of the result.

`hayai.finetune` (hayai.finetuning) runs these end to end and writes the outputs; `hayai.bench` measures the same
steps without writing anything, which is why they live here, below both.

Methods (see each module for the formula and the paper):
  lora      LoRA on every linear layer (PEFT's "all-linear"), frozen base in the autocast dtype   hayai.peft.lora
  longlora  LoRA + trainable embeddings and norms, trained with shifted sparse attention (S²-Attn) hayai.attention
  qlora     LoRA over an NF4 (4-bit, double-quantized) frozen base                               hayai.quant.nf4
  ia3       (IA)³ vectors on k, v and the FFN input                                              hayai.peft.ia3
  full      every parameter, AdamW                                                               hayai.train.optim
  lomo      every parameter, SGD fused into backward                                             hayai.train.lomo
  adalomo   every parameter, AdaLomo fused into backward                                         hayai.train.lomo
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.models.tokenizer import Tokenizer
from hayai.runtime import current_rss_bytes
from hayai.train.checkpointing import apply_activation_checkpointing
from hayai.train.data import Batch, Record, Row, collate, prompt_text
from hayai.train.lomo import AdaLomo, Lomo
from hayai.train.loss import ChunkedCrossEntropy
from hayai.train.memory import (
    MemoryEstimate,
    check_fits,
    default_budget,
    estimate_memory,
    fmt_bytes,
    probe_activations,
    release_freed_memory,
)
from hayai.train.optim import OptimizerUpdate, UpdateRule
from hayai.train.trainer import Trainer, trainable_parameters

if TYPE_CHECKING:
    from hayai.attention import ShiftedSparseAttention

METHODS = ("lora", "longlora", "qlora", "ia3", "full", "lomo", "adalomo")
ADAPTER_METHODS = ("lora", "longlora", "qlora", "ia3")
DEFAULT_LR = {"lora": 2e-4, "longlora": 2e-4, "qlora": 2e-4, "ia3": 3e-3, "full": 2e-5, "lomo": 1e-2, "adalomo": 5e-4}


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the keyword arguments of `hayai.finetune`)."""

    method: str = "lora"
    # data
    seq_len: int | None = None  # default: `context` when given, else 512
    packing: bool = True
    train_on_prompt: bool = False
    skip_bad: bool = False
    # steps and optimisation
    max_steps: int | None = None  # default: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # default per method (DEFAULT_LR)
    schedule: str = "cosine"
    warmup: float | int = 0.03  # a fraction of the steps, or a step count
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | str | None = "auto"  # auto: 1.0, but none for adalomo (its authors' advice)
    # adapters
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # PEFT's default; dropout keeps an fp32 mask per adapted layer
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    trainable: str | None = None  # parameter-name substrings trained whole (longlora default: "embed,norm")
    # long context
    context: int | None = None  # extend the window to this many tokens (RoPE scaling saved with the output)
    rope_scaling: str = "linear"  # linear (position interpolation) | dynamic (NTK)
    s2_group_ratio: float = 0.25  # longlora: S²-Attn group size as a fraction of the sequence
    # memory
    gradient_checkpointing: bool | None = None  # None: only when needed to fit
    autocast: str = "auto"  # auto (bf16 where it is at least as fast as fp32; see hayai.train.precision) | bf16 | none
    chunked_loss: bool = True
    memory_limit: int | None = None  # bytes; default: what the machine has available
    # run
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool | str = False
    overwrite: bool = False
    exact_match: bool = False
    max_new_tokens: int | None = None
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.seq_len is None:
            self.seq_len = self.context or 512
        if self.method == "longlora" and self.trainable is None:
            self.trainable = "embed,norm"
        if self.trainable and self.method not in ("lora", "longlora", "qlora"):
            raise ConfigError(f"trainable applies to LoRA methods, not {self.method}")
        if self.method == "longlora":
            try:
                self.s2_attention().group_size_for(self.seq_len)
            except ConfigError as exc:
                raise ConfigError(f"longlora: seq_len {self.seq_len} does not split into S²-Attn groups ({exc}); the "
                                  "group must be even and divide seq_len: use a multiple of 8 with the default "
                                  "ratio 1/4") from None
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.method in ("lomo", "adalomo") and self.grad_accum > 1:
            raise ConfigError(f"{self.method} updates inside backward and cannot accumulate gradients; use "
                              "grad_accum 1 and a larger batch size")

    def s2_attention(self) -> ShiftedSparseAttention:
        """The S²-Attn kernel longlora trains with (`hayai.attention.ShiftedSparseAttention`)."""
        from hayai.attention import ShiftedSparseAttention

        return ShiftedSparseAttention(group_size_ratio=self.s2_group_ratio)

    @property
    def pads_to_seq_len(self) -> bool:
        """Every batch padded to `seq_len`: S²-Attn needs whole groups, which a shorter batch may not have."""
        return self.method == "longlora"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def grad_norm_limit(self) -> float | None:
        if self.max_grad_norm == "auto":
            return None if self.method == "adalomo" else 1.0
        return None if self.max_grad_norm is None else float(self.max_grad_norm)


@dataclass
class ExactMatch:
    """Exact-match accuracy of greedy answers against the reference answers."""

    correct: int
    total: int
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, expected, generated)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.accuracy:.1%} ({self.correct}/{self.total})"


# ---- setup helpers -----------------------------------------------------------------------------------------------
def _cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen nn.Linear weights in `dtype` (the autocast dtype: they are only ever read in it), except a
    weight shared with the embedding table, which stays fp32 with the embeddings and norms."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if type(module) is nn.Linear and id(module.weight) not in embedding_weights:
            module.to(dtype)


def prepare_model(model: nn.Module, config: FinetuneConfig, autocast_dtype: torch.dtype | None) -> str:
    """Apply the method's transforms in place; returns the update rule's name (adamw | lomo | adalomo)."""
    from hayai.peft import apply_ia3, apply_lora

    method = config.method
    if config.context is not None:
        from hayai.models.context_extension import extend_context

        extend_context(model, config.context, config.rope_scaling)
    if method == "qlora":
        from hayai.quant import quantize_model

        quantize_model(model, "nf4", double_quant=True)
    elif method in ADAPTER_METHODS and autocast_dtype is not None:
        _cast_frozen_linears(model, autocast_dtype)
    if method in ("lora", "longlora", "qlora"):
        apply_lora(model, target_modules=config.target_modules, r=config.lora_r, alpha=config.lora_alpha,
                   dropout=config.lora_dropout, use_rslora=config.use_rslora, trainable=config.trainable)
        if method == "longlora":
            from hayai.attention import set_attention_kernel

            set_attention_kernel(model, config.s2_attention())
        return "adamw"
    if method == "ia3":
        apply_ia3(model)
        return "adamw"
    model.requires_grad_(True)
    return "adamw" if method == "full" else method


def build_update_rule(rule: str, model: nn.Module, config: FinetuneConfig) -> UpdateRule:
    named = trainable_parameters(model)
    if rule == "lomo":
        return Lomo(named, weight_decay=config.weight_decay, max_grad_norm=config.grad_norm_limit)
    if rule == "adalomo":
        return AdaLomo(named, weight_decay=config.weight_decay, max_grad_norm=config.grad_norm_limit)
    return OptimizerUpdate(named, weight_decay=config.weight_decay, max_grad_norm=config.grad_norm_limit)


def _probe_batch(seq_len: int, vocab: int, packing: bool) -> Batch:
    """One sequence of `seq_len` random tokens, every position trained (the most a sequence can cost)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (seq_len + 1,), generator=generator).tolist()
    return collate([Row(tuple(ids[:-1]), tuple(ids[1:]), (seq_len,))], pad_id=0, packed=packing)


def plan_memory(trainer: Trainer, model: nn.Module, config: FinetuneConfig, rule: str,
                device: torch.device) -> MemoryEstimate:
    """Probe activations, choose activation checkpointing ("auto": only if needed) and refuse what cannot fit."""
    blocks = list(model.model.layers)
    batch = _probe_batch(config.seq_len, model.config.vocab_size, config.packing)
    model.train()
    current = current_rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    probe = probe_activations(model, lambda: trainer.batch_loss(batch), blocks)
    release_freed_memory()
    chunk = ChunkedCrossEntropy()._chunk(model.config.vocab_size) if config.chunked_loss else config.seq_len
    budget = config.memory_limit or default_budget(device)

    def estimate(checkpointing: bool) -> MemoryEstimate:
        return estimate_memory(model, probe, rule=rule, batch_size=config.batch_size, seq_len=config.seq_len,
                               checkpointing=checkpointing, vocab_size=model.config.vocab_size,
                               chunk_tokens=chunk * (1 if config.chunked_loss else config.batch_size),
                               current=current)

    if config.gradient_checkpointing is None:
        plan = estimate(False)
        if plan.total > budget:
            plan = estimate(True)
            plan.notes.append("activation checkpointing turned on: the run would not fit without it")
    else:
        plan = estimate(config.gradient_checkpointing)
    check_fits(plan, budget, device)
    plan.notes.append(f"budget {fmt_bytes(budget)}")
    if plan.checkpointing:
        apply_activation_checkpointing(model)
    return plan


class AutocastLM(nn.Module):
    """A causal LM whose forward passes run under autocast to `dtype`, with its KV cache in `dtype`: how a model
    with bf16 frozen weights and fp32 adapters/embeddings/norms (the training layout) generates."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = model
        self.compute_dtype = dtype
        self.config = model.config

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._autocast():
            return self.inner(*args, **kwargs)

    def hidden(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._autocast():
            return self.inner.hidden(*args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.inner.logits(hidden)

    def new_cache(self, batch_size: int, max_length: int):
        from hayai.models.kv_cache import KVCache

        return KVCache.for_model(self.config, batch_size, max_length, self.compute_dtype, self.device)


def exact_match(model: nn.Module, tokenizer: Tokenizer, records: Sequence[Record], *,
                max_new_tokens: int | None = None, autocast_dtype: torch.dtype | None = None,
                batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> ExactMatch:
    """Greedy answers to each record's prompt compared, after stripping whitespace, with its last assistant turn."""
    from hayai.decode.engine import Engine

    records = [r for r in records if r.messages]
    if not records:
        raise ConfigError("exact match needs chat or instruction records with answers")
    prompts = [tokenizer.encode(prompt_text(r, tokenizer), add_special_tokens=not tokenizer.has_chat_template)
               for r in records]
    # An answer more than a few tokens longer than the reference cannot match it: stop generating there.
    limits = [max_new_tokens or min(512, len(tokenizer.encode(r.answer, add_special_tokens=False)) + 8)
              for r in records]
    was_training = model.training
    model.eval()
    engine = Engine(AutocastLM(model, autocast_dtype) if autocast_dtype is not None else model, tokenizer)
    # Prompts sorted by length, so batches carry little padding.
    order = sorted(range(len(records)), key=lambda i: (len(prompts[i]), i))
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    texts: dict[int, str] = {}
    for group in groups:
        outputs = engine.generate_batch([prompts[i] for i in group], max_new_tokens=max(limits[i] for i in group))
        texts.update({i: output.text for i, output in zip(group, outputs, strict=True)})
        if progress:
            progress(len(texts), len(records))
    correct, samples = 0, []
    for i, record in enumerate(records):
        correct += texts[i].strip() == record.answer.strip()
        if len(samples) < 5:
            samples.append((record.prompt_messages[-1]["content"], record.answer, texts[i]))
    model.train(was_training)
    return ExactMatch(correct, len(records), samples)
