"""`hayai finetune` and `hayai merge`."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hayai.cli.app import app, err, out
from hayai.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4}


def parse_bytes(text: str | None) -> int | None:
    """'8GB', '512m', '1.5 g' or a plain byte count -> bytes."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower().replace("ib", "b") if match else None
    if unit not in _UNITS:
        raise ConfigError(f"--memory-limit: cannot read {text!r}; write e.g. 8GB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _TrainingDisplay:
    """Renders the finetune callback's events: stage lines, the memory table, a progress bar per training run."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: int | None = None

    def __enter__(self) -> _TrainingDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _start(self, total: int, step: int) -> None:
        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("• {task.fields[tps]} tok/s"), TextColumn("• peak {task.fields[mem]}"),
                   TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"))
        self.progress = Progress(*columns, console=err, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=step, loss="-", tps="-", mem="-", eta="-")

    def __call__(self, event) -> None:
        from hayai.train.memory import fmt_bytes

        if event.kind == "stage":
            if self.progress is None:
                err.print(f"[dim]• {event.message}[/]")
            return
        if event.kind == "memory":
            self._memory_table(event.detail)
            return
        if event.kind == "exact_match":
            err.print(f"[bold]exact match {event.message}[/]")
            return
        if event.kind == "step":
            if self.progress is None:
                self._start(event.total_steps, event.step - 1)
            self.progress.update(self.task, completed=event.step, loss=f"{event.loss:.4f}",
                                 tps=f"{event.tokens_per_second:.0f}", mem=fmt_bytes(event.peak_memory_bytes or 0),
                                 eta=_fmt_eta(event.eta_seconds))
        elif event.kind == "eval":
            (self.progress.console if self.progress else err).print(f"step {event.step}: eval loss "
                                                                    f"{event.eval_loss:.4f}")
        elif event.kind == "checkpoint":
            (self.progress.console if self.progress else err).print(f"[dim]checkpoint {event.path}[/]")
        elif event.kind == "done":
            self._stop()

    @staticmethod
    def _memory_table(estimate) -> None:
        from hayai.train.memory import fmt_bytes

        table = Table(title="memory estimate", show_header=False, title_justify="left", box=None, pad_edge=False)
        for name, value in estimate.lines():
            table.add_row(name, fmt_bytes(value))
        err.print(table)
        for note in estimate.notes:
            err.print(f"[dim]  {note}[/]")


@app.command()
def finetune(
    data: Path = typer.Option(..., "--data", "-d", help="Training data, JSONL: chat messages, instruction/output, "
                              "prompt/completion or text records."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the adapter/model, log and checkpoints."),
    model: str = typer.Option(None, "--model", "-m", help="Store name, known name or HF checkpoint dir."),
    method: str = typer.Option("lora", "--method", help="lora, longlora, qlora, ia3, full, lomo or adalomo "
                                "(longlora: LoRA + trainable embeddings/norms, trained with S²-Attn)."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Held-out JSONL for evaluation loss (and exact match)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (default: --epochs over the data)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the data when --max-steps is not given."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Sequences (packed rows) per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per sequence (longer examples are truncated; "
                                "default: --context when given, else 512)."),
    context: int = typer.Option(None, "--context", help="Extend the model's window to N tokens (RoPE scaling, "
                                "saved with the output so generate uses it)."),
    rope_scaling: str = typer.Option("linear", "--rope-scaling", help="How --context extends RoPE: linear "
                                     "(position interpolation) or dynamic (NTK)."),
    trainable: str = typer.Option(None, "--trainable", help="Also train these parameters whole, by name "
                                  "substring (e.g. embed,norm; longlora's default)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default per method: LoRA 2e-4, IA3 3e-3, "
                             "full 2e-5, LOMO 1e-2, AdaLomo 5e-4)."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, linear or constant."),
    warmup: float = typer.Option(0.03, "--warmup", help="Warm-up: a fraction of the steps (<1) or a step count."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (default 1.0; "
                                        "AdaLomo: off). 0 turns clipping off."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha (scale alpha/r)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the adapter input (PEFT "
                                       "default 0)."),
    target_modules: str = typer.Option("all-linear", "--target-modules", help="all-linear, or comma-separated "
                                       "module names (q_proj,v_proj)."),
    rslora: bool = typer.Option(False, "--rslora", help="Scale LoRA by alpha/sqrt(r)."),
    packing: bool = typer.Option(True, "--packing/--no-packing", help="Pack several examples into one sequence."),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="Also train on prompt tokens."),
    gradient_checkpointing: bool = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="Default: on only when needed to fit in memory."),
    autocast: str = typer.Option("auto", "--autocast", help="auto (bf16 where it is measured at least as fast as "
                                 "fp32), bf16 or none (fp32)."),
    memory_limit: str = typer.Option(None, "--memory-limit", help="Refuse to start above this peak (e.g. 4GB); "
                                     "default: the memory available."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (and at the end)."),
    save_every: int = typer.Option(0, "--save-every", help="Write a resumable checkpoint every N steps."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="How many checkpoints to keep (0: all)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --output."),
    resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --output that holds a run."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed data lines (and count them)."),
    exact_match: bool = typer.Option(False, "--exact-match", help="Exact-match accuracy on --eval-data before "
                                     "and after training."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Answer length limit for --exact-match."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
) -> None:
    """Fine-tune a model on your data: an adapter (LoRA/QLoRA/IA3) or all weights (full/LOMO/AdaLomo)."""
    from hayai.finetuning import finetune as run

    targets: str | list[str] = target_modules
    if target_modules != "all-linear" and "," in target_modules:
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    settings = dict(
        method=method, max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        seq_len=seq_len, lr=lr, schedule=schedule, warmup=int(warmup) if warmup >= 1 else warmup,
        weight_decay=weight_decay, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=targets, use_rslora=rslora, trainable=trainable, context=context,
        rope_scaling=rope_scaling, packing=packing, train_on_prompt=train_on_prompt,
        gradient_checkpointing=gradient_checkpointing, autocast=autocast, memory_limit=parse_bytes(memory_limit),
        eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints,
        resume=str(resume_from) if resume_from else resume, overwrite=overwrite, skip_bad=skip_bad,
        exact_match=exact_match, max_new_tokens=max_new_tokens, seed=seed, device=device, threads=threads,
    )
    if max_grad_norm is not None:
        settings["max_grad_norm"] = max_grad_norm if max_grad_norm > 0 else None
    if exact_match and eval_data is None:
        raise typer.BadParameter("--exact-match needs --eval-data")
    with _TrainingDisplay() as display:
        result = run(model, data, output=output, eval_data=eval_data, callback=display, **settings)
    if result.skipped_lines:
        err.print(f"[yellow]skipped {len(result.skipped_lines)} bad lines[/] (first: line "
                  f"{result.skipped_lines[0][0]}: {result.skipped_lines[0][1]})")
    out.print(str(result))
    if result.exact_match_after is not None:
        for prompt, expected, got in result.exact_match_after.samples[:3]:
            err.print(f"[dim]  {prompt!r}\n    expected {expected!r}\n    got      {got!r}[/]")


@app.command()
def merge(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter directory (e.g. from hayai finetune)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the merged model."),
    model: str = typer.Option(None, "--model", "-m", help="The base model (default: the default model)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Dtype of the saved weights: fp32, bf16 or fp16."),
    base_quant: str = typer.Option("auto", "--base-quant", help="nf4: merge into the NF4-rounded base a QLoRA "
                                   "adapter was trained on; none: into the float base; auto: from the adapter's "
                                   "training metadata."),
) -> None:
    """Fold an adapter into its base model and save a full model (loadable by hayai generate -m and HF)."""
    import torch

    from hayai.finetuning import merge_adapter

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(dtypes)}")
    path = merge_adapter(model, adapter, output, dtype=dtypes[dtype],
                         base_quant=None if base_quant == "none" else base_quant)
    out.print(f"merged model saved to {path}")
