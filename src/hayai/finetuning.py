"""`hayai.finetune(...)`: fine-tune a model on a JSONL file in one call, and `merge_adapter` to fold the result in.

    import hayai
    result = hayai.finetune("smollm2", data="train.jsonl", method="lora", output="out/my-lora")
    print(result)

Methods (see each module for the formula and the paper):
  lora      LoRA on every linear layer (PEFT's "all-linear"), frozen base in the autocast dtype   hayai.peft.lora
  qlora     LoRA over an NF4 (4-bit, double-quantized) frozen base                               hayai.quant.nf4
  ia3       (IA)³ vectors on k, v and the FFN input                                              hayai.peft.ia3
  full      every parameter, AdamW                                                               hayai.train.optim
  lomo      every parameter, SGD fused into backward                                             hayai.train.lomo
  adalomo   every parameter, AdaLomo fused into backward                                         hayai.train.lomo

The output directory holds the PEFT adapter (lora/qlora/ia3: `adapter_config.json` +
`adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained` and `hayai generate --adapter`) or a
full model directory (full/lomo/adalomo: loadable by `hayai generate -m DIR` and HF `from_pretrained`), plus
`training_log.jsonl`, `loss_curve.png`, `hayai_finetune.json` (settings and results) and `checkpoints/`.

Before training, the memory a step needs is estimated (`hayai.train.memory`): activation checkpointing turns
on by itself when the run would not fit without it, and the run is refused, with the numbers and what would
help, when it would not fit with it either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.models.loading import ModelInfo, load_model
from hayai.models.tokenizer import Tokenizer
from hayai.runtime import configure_threads, resolve_device
from hayai.train.checkpointing import activation_checkpointing_removed
from hayai.train.data import DataLoader, read_jsonl, tokenize_records
from hayai.train.export import save_model_directory
from hayai.train.loss import ChunkedCrossEntropy, FullCrossEntropy
from hayai.train.memory import (
    MemoryEstimate,
    fmt_bytes,
)
from hayai.train.precision import resolve_autocast
from hayai.train.recipe import (
    ADAPTER_METHODS,
    DEFAULT_LR,
    METHODS,
    AutocastLM,
    ExactMatch,
    FinetuneConfig,
    build_update_rule,
    exact_match,
    plan_memory,
    prepare_model,
)
from hayai.train.report import plot_loss_curve
from hayai.train.schedule import LRSchedule, warmup_steps_for
from hayai.train.trainer import Trainer, TrainEvent, latest_checkpoint

__all__ = ["ADAPTER_METHODS", "DEFAULT_LR", "METHODS", "AutocastLM", "ExactMatch", "FinetuneConfig", "FinetuneResult",
           "build_update_rule", "exact_match", "finetune", "merge_adapter", "plan_memory", "prepare_model",
           "read_metadata"]

METADATA_FILE = "hayai_finetune.json"
Callback = Callable[[TrainEvent], None]


@dataclass
class FinetuneResult:
    output_dir: Path
    method: str
    steps: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    tokens_per_second: float
    seconds: float
    peak_memory_bytes: int
    memory_estimate: MemoryEstimate | None
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    skipped_lines: list[tuple[int, str]] = field(default_factory=list)
    exact_match_before: ExactMatch | None = None
    exact_match_after: ExactMatch | None = None
    resumed_from: int = 0

    def __str__(self) -> str:
        lines = [f"{self.method}: {self.steps} steps in {self.seconds:.0f} s, {self.tokens_per_second:.0f} tokens/s, "
                 f"peak memory {fmt_bytes(self.peak_memory_bytes)}",
                 f"trainable parameters: {self.trainable_parameters:,} of {self.total_parameters:,}"]
        if self.losses:
            lines.append(f"loss: {self.losses[0]:.4f} (step 1) -> {self.losses[-1]:.4f} (step {len(self.losses)})")
        if self.eval_losses:
            lines.append(f"eval loss: {self.eval_losses[-1][1]:.4f}")
        if self.exact_match_before is not None:
            lines.append(f"exact match before: {self.exact_match_before}")
        if self.exact_match_after is not None:
            lines.append(f"exact match after:  {self.exact_match_after}")
        lines.append(f"saved to {self.output_dir}")
        return "\n".join(lines)


def _check_output(output: Path, config: FinetuneConfig) -> None:
    has_run = (output / "checkpoints").is_dir() or (output / METADATA_FILE).exists()
    if has_run and not config.resume and not config.overwrite:
        raise ConfigError(f"{output} already holds a training run; pass resume=True (--resume) to continue it or "
                          "overwrite=True (--overwrite) to start over")
    if config.overwrite and not config.resume:
        import shutil

        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        (output / "training_log.jsonl").unlink(missing_ok=True)


def _resume_path(output: Path, resume: bool | str) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("latest", "true", "True"):
        return Path(resume)
    found = latest_checkpoint(output)
    if found is None:
        raise ConfigError(f"nothing to resume: no checkpoint under {output / 'checkpoints'} (save them with "
                          "save_every / --save-every)")
    return found


def _emit(callback: Callback | None, kind: str, **kwargs: Any) -> None:
    if callback is not None:
        callback(TrainEvent(kind, kwargs.pop("step", 0), kwargs.pop("total_steps", 0), **kwargs))


# ---- the facade ------------------------------------------------------------------------------------------------
def finetune(model: str | None = None, data: str | os.PathLike | None = None, *, output: str | os.PathLike,
             eval_data: str | os.PathLike | None = None, callback: Callback | None = None,
             **settings: Any) -> FinetuneResult:
    """Fine-tune `model` (store name, known name or HF checkpoint dir; default: the default model) on the JSONL
    file `data` and write the result to `output`. `settings` are the fields of `FinetuneConfig`; `callback`
    receives `TrainEvent`s (stages, the memory estimate, steps, evaluations, checkpoints)."""
    if data is None:
        raise ConfigError("no training data: pass data='file.jsonl'")
    config = FinetuneConfig(**settings)
    output = Path(output)
    _check_output(output, config)
    configure_threads(config.threads)
    device = resolve_device(config.device)
    autocast_dtype = resolve_autocast(config.autocast, device)

    _emit(callback, "stage", message="loading the model")
    net, tokenizer, info = load_model(model, dtype=torch.float32, device=device)
    train_data = read_jsonl(data, skip_bad=config.skip_bad)
    eval_records = read_jsonl(eval_data, skip_bad=config.skip_bad).records if eval_data is not None else []
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    rule = prepare_model(net, config, autocast_dtype)

    _emit(callback, "stage", message="tokenizing the data")
    train_tok = tokenize_records(train_data.records, tokenizer, config.seq_len, config.train_on_prompt)
    loader = DataLoader(train_tok.examples, batch_size=config.batch_size, seq_len=config.seq_len,
                        pad_id=tokenizer.pad_token_id, packing=config.packing, seed=config.seed,
                        fixed_width=config.pads_to_seq_len)
    eval_loader = None
    if eval_records:
        eval_tok = tokenize_records(eval_records, tokenizer, config.seq_len, config.train_on_prompt)
        if eval_tok.examples:
            eval_loader = DataLoader(eval_tok.examples, batch_size=config.batch_size, seq_len=config.seq_len,
                                     pad_id=tokenizer.pad_token_id, packing=config.packing, shuffle=False)
    steps = config.max_steps or max(1, math.ceil(config.epochs * loader.batches_per_epoch() / config.grad_accum))
    schedule = LRSchedule(config.learning_rate, steps, warmup_steps_for(steps, config.warmup), config.schedule,
                          config.min_lr_ratio)
    update = build_update_rule(rule, net, config)
    trainer = Trainer(net, loader, update, schedule, max_steps=steps, grad_accum=config.grad_accum,
                      loss=ChunkedCrossEntropy() if config.chunked_loss else FullCrossEntropy(),
                      autocast_dtype=autocast_dtype, eval_loader=eval_loader, eval_every=config.eval_every,
                      save_every=config.save_every, output_dir=output, keep_checkpoints=config.keep_checkpoints,
                      callback=callback)

    _emit(callback, "stage", message="estimating memory")
    plan = plan_memory(trainer, net, config, rule, device)
    _emit(callback, "memory", message=plan.summary(), detail=plan)
    resume_from = _resume_path(output, config.resume)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        _emit(callback, "stage", message=f"resumed from {resume_from} (step {trainer.step})")

    before = None
    if config.exact_match and eval_records and trainer.step == 0:
        _emit(callback, "stage", message="exact match before training")
        before = exact_match(net, tokenizer, eval_records, max_new_tokens=config.max_new_tokens,
                             autocast_dtype=autocast_dtype)
        _emit(callback, "exact_match", message=f"before training: {before}", detail=before)

    _emit(callback, "stage", message="training")
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started

    _emit(callback, "stage", message=f"saving to {output}")
    _save_outputs(net, tokenizer, info, config, output)
    after = None
    if config.exact_match and eval_records:
        _emit(callback, "stage", message="exact match after training")
        after = exact_match(net, tokenizer, eval_records, max_new_tokens=config.max_new_tokens,
                            autocast_dtype=autocast_dtype)
        _emit(callback, "exact_match", message=f"after training: {after}", detail=after)

    from hayai.peft import trainable_parameters_summary

    summary = trainable_parameters_summary(net)
    finished = FinetuneResult(output, config.method, result.steps, result.losses, result.eval_losses,
                              result.tokens_per_second, seconds, result.peak_memory_bytes, plan,
                              summary.trainable, summary.total, len(train_tok.examples), train_data.skipped,
                              before, after, result.resumed_from)
    plot_loss_curve(result.losses, result.eval_losses, output / "loss_curve.png",
                    title=f"{info.name}: {config.method}")
    _write_metadata(output, info, config, finished, train_tok)
    return finished


def _save_outputs(model: nn.Module, tokenizer: Tokenizer, info: ModelInfo, config: FinetuneConfig,
                  output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    if config.method in ADAPTER_METHODS:
        from hayai.peft import save_adapter

        with activation_checkpointing_removed(model):
            save_adapter(model, output, base_model_name_or_path=str(info.path))
    else:
        save_model_directory(model, tokenizer, output)


def _write_metadata(output: Path, info: ModelInfo, config: FinetuneConfig, result: FinetuneResult,
                    tokenized) -> None:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume", "overwrite")}
    data = {
        "base_model": info.name, "base_model_path": str(info.path), "method": config.method, "settings": settings,
        "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
        "eval_losses": result.eval_losses, "tokens_per_second": result.tokens_per_second,
        "peak_memory_bytes": result.peak_memory_bytes, "train_examples": result.train_examples,
        "truncated_examples": tokenized.truncated, "dropped_examples": tokenized.dropped,
        "skipped_lines": len(result.skipped_lines),
        "memory_estimate": dataclasses.asdict(result.memory_estimate) if result.memory_estimate else None,
        "exact_match_before": result.exact_match_before.accuracy if result.exact_match_before else None,
        "exact_match_after": result.exact_match_after.accuracy if result.exact_match_after else None,
    }
    (output / METADATA_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The `hayai_finetune.json` of a training output directory ({} when there is none)."""
    path = Path(directory) / METADATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def merge_adapter(model: str | None, adapter: str | os.PathLike, output: str | os.PathLike, *,
                  dtype: torch.dtype = torch.float32, base_quant: str | None = "auto") -> Path:
    """Fold a PEFT adapter into its base model and write a full model directory.

    `base_quant`: "nf4" quantizes the base first, so the merged weights are exactly what a QLoRA adapter was
    trained against, dequantized (PEFT issue #2321); "auto" does so when the adapter's training metadata says
    qlora; None merges into the float base.
    """
    from hayai.peft import load_adapter, merge_and_unload

    if base_quant == "auto":
        base_quant = "nf4" if read_metadata(adapter).get("method") == "qlora" else None
    if base_quant not in (None, "none", "nf4"):
        raise ConfigError(f"base_quant must be nf4, none or auto, got {base_quant!r}")
    net, tokenizer, _ = load_model(model, dtype=torch.float32)
    apply_saved_context(net, adapter)
    if base_quant == "nf4":
        from hayai.quant import quantize_model

        quantize_model(net, "nf4", double_quant=True)
    load_adapter(net, adapter)
    merge_and_unload(net)
    return save_model_directory(net, tokenizer, output, dtype=dtype)


def apply_saved_context(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Extend `model`'s window as the fine-tune that wrote `directory` did (`context`, `rope_scaling` in its
    metadata); an adapter trained at a longer context is only right on top of the same RoPE scaling. True when
    the window changed."""
    settings = read_metadata(directory).get("settings", {})
    if not settings.get("context"):
        return False
    from hayai.models.context_extension import extend_context

    return extend_context(model, int(settings["context"]), settings.get("rope_scaling", "linear"))
