"""The finetune suite: every fine-tuning method of `hayai.finetune` for a few steps on the user's data.

Each method runs the steps of `hayai.finetune` (its config, model preparation, update rule, memory plan and
trainer; nothing is written to disk) in a fresh process (`hayai.bench.memory.run_isolated`) with the same data,
batch, sequence length, step count and a constant learning rate (the method's default peak rate; warm-up and
decay would make a few-step comparison depend on the schedule). The baseline is plain full fine-tuning with
AdamW. Measured per method:

- tokens/s over the steps after the first (the first pays one-time costs), from the trainer's log;
- peak RSS of the training phase (CUDA peak on GPUs): the high-water mark is reset when training starts, after
  loading, quantizing and the memory probe, and read when it ends (after the final evaluation), so QLoRA's
  quantization transient does not hide what training needs; the whole process's peak is in the details;
- quality: perplexity exp(eval loss) on the held-out records after the steps (lower is better), and the exact
  match of greedy answers when asked for;
- estimated FLOPs per token (`hayai.bench.flops`: backward skips frozen weights' gradients, activation
  checkpointing reruns the forward) and the achieved FLOP/s;
- energy over the training phase where readable; trainable parameters; hayai's own memory estimate.

Methods: full (AdamW), LOMO, AdaLomo, LoRA, QLoRA, (IA)³, LoRA with activation checkpointing, and any further
method `hayai.train.recipe.METHODS` lists.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hayai.bench.report import Detail, TechniqueResult

NAMES = {"full": "full AdamW", "lomo": "LOMO", "adalomo": "AdaLomo", "lora": "LoRA r=8", "qlora": "QLoRA r=8",
         "ia3": "(IA)³", "longlora": "LongLoRA r=8 (S²-Attn)"}
DESCRIPTIONS = {
    "full": "every weight, AdamW (two fp32 moments per weight)",
    "lomo": "every weight, SGD fused into backward (no optimizer state, no full gradient)",
    "adalomo": "every weight, AdaLomo (factored second moments) fused into backward",
    "lora": "LoRA r=8 on every linear layer, frozen base",
    "qlora": "LoRA r=8 over an NF4 double-quantized frozen base",
    "ia3": "(IA)³ scaling vectors on k, v and the FFN",
    "longlora": "LoRA r=8 + trainable embeddings and norms, shifted sparse attention in training",
}


@dataclass(frozen=True)
class FinetuneSettings:
    model: str
    train_file: str
    eval_file: str
    steps: int = 20
    batch_size: int = 4
    seq_len: int = 256
    device: str = "auto"
    threads: int | None = None
    exact_match: bool = False


@dataclass(frozen=True)
class FinetuneTechnique:
    name: str
    kind: str  # baseline | finetune
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    @property
    def key(self) -> str:
        """The name `--only` selects it by: the method, "lora-checkpointing" for LoRA with checkpointing."""
        return f"{self.method}-checkpointing" if dict(self.options).get("gradient_checkpointing") else self.method


def plan_techniques(methods: tuple[str, ...] | None = None,
                    only: tuple[str, ...] | None = None) -> list[FinetuneTechnique]:
    """Full fine-tuning first (the baseline), then every other method, then LoRA with checkpointing; with
    `only`, the baseline and the techniques whose keys are listed."""
    if methods is None:
        from hayai.train.recipe import METHODS

        methods = METHODS
    runs = [FinetuneTechnique(f"{NAMES['full']} (baseline)", "baseline", "full", description=DESCRIPTIONS["full"])]
    for method in methods:
        if method != "full":
            runs.append(FinetuneTechnique(NAMES.get(method, method), "finetune", method,
                                          description=DESCRIPTIONS.get(method, f"hayai.finetune(method={method!r})")))
    if "lora" in methods:
        runs.append(FinetuneTechnique("LoRA r=8 + checkpointing", "finetune", "lora",
                                      (("gradient_checkpointing", True),),
                                      "LoRA with activation checkpointing: blocks rerun their forward in backward"))
    return [t for t in runs if only is None or t.kind == "baseline" or t.key in only]


def technique_keys(methods: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t.key for t in plan_techniques(methods) if t.kind != "baseline")


# ---- in the child process ----------------------------------------------------------------------------------------
class _StepClock:
    """Trainer callback: forwards progress and records when each step ended."""

    def __init__(self, report: Callable[..., None]) -> None:
        self.report = report
        self.steps: list[tuple[float, float]] = []  # (perf_counter at the step's end, cumulative tokens/s)

    def __call__(self, event: Any) -> None:
        if event.kind == "step":
            self.steps.append((time.perf_counter(), event.tokens_per_second or 0.0))
            self.report("training", event.step, event.total_steps)


def steady_tokens_per_second(started: float, steps: list[tuple[float, float]]) -> float | None:
    """Tokens/s over steps 2..N: the trainer reports cumulative tokens/s, so tokens so far = rate × elapsed."""
    if not steps:
        return None
    tokens = [rate * (at - started) for at, rate in steps]
    if len(steps) < 2:
        return steps[0][1]
    seconds = steps[-1][0] - steps[0][0]
    return (tokens[-1] - tokens[0]) / seconds if seconds > 0 else None


def measure_finetune(technique: FinetuneTechnique, settings: FinetuneSettings,
                     progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train one method for `settings.steps` steps (in a fresh process); returns plain measurements.

    The steps are those of `hayai.finetune` (same config, model preparation, update rule, memory plan and
    trainer), without writing the adapter or model to disk, which is not what is being measured."""
    import torch

    from hayai.bench.energy import EnergyMeter
    from hayai.bench.memory import PeakRSS, peak_rss_bytes, release_memory
    from hayai.models.loading import load_model
    from hayai.peft import trainable_parameters_summary
    from hayai.runtime import configure_threads, resolve_device
    from hayai.train.data import DataLoader, read_jsonl, tokenize_records
    from hayai.train.loss import ChunkedCrossEntropy
    from hayai.train.precision import resolve_autocast
    from hayai.train.recipe import FinetuneConfig, build_update_rule, exact_match, plan_memory, prepare_model
    from hayai.train.schedule import LRSchedule
    from hayai.train.trainer import Trainer

    report = progress or (lambda *args: None)
    config = FinetuneConfig(method=technique.method, max_steps=settings.steps, batch_size=settings.batch_size,
                            seq_len=settings.seq_len, schedule="constant", warmup=0, device=settings.device,
                            threads=settings.threads, **dict(technique.options))
    configure_threads(config.threads)
    device = resolve_device(config.device)
    autocast = resolve_autocast(config.autocast, device)
    started = time.perf_counter()
    report("loading", 0, 1)
    net, tokenizer, _ = load_model(settings.model, dtype=torch.float32, device=device)
    torch.manual_seed(config.seed)
    rule = prepare_model(net, config, autocast)
    pad = tokenizer.pad_token_id

    def loader(path: str, shuffle: bool) -> DataLoader:
        examples = tokenize_records(read_jsonl(path).records, tokenizer, config.seq_len).examples
        return DataLoader(examples, batch_size=config.batch_size, seq_len=config.seq_len, pad_id=pad,
                          packing=config.packing, seed=config.seed, shuffle=shuffle,
                          fixed_width=config.pads_to_seq_len)

    clock = _StepClock(report)
    trainer = Trainer(net, loader(settings.train_file, True), build_update_rule(rule, net, config),
                      LRSchedule(config.learning_rate, settings.steps, 0, "constant", 0.0),
                      max_steps=settings.steps, loss=ChunkedCrossEntropy(), autocast_dtype=autocast,
                      eval_loader=loader(settings.eval_file, False), callback=clock)
    report("memory plan", 0, 1)
    plan = plan_memory(trainer, net, config, rule, device)
    setup = {"setup_seconds": time.perf_counter() - started, "setup_peak_rss": peak_rss_bytes()}
    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    probe = PeakRSS()
    meter = EnergyMeter()
    with meter:
        begun = time.perf_counter()
        result = trainer.train()
    train_peak = probe.peak()
    cuda_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    matched = None
    if settings.exact_match:
        report("exact match", 0, 1)
        records = read_jsonl(settings.eval_file).records
        matched = exact_match(net, tokenizer, records, autocast_dtype=autocast).accuracy
    summary = trainable_parameters_summary(net)
    return {
        **setup, "tokens_per_second": steady_tokens_per_second(begun, clock.steps) or result.tokens_per_second,
        "overall_tokens_per_second": result.tokens_per_second, "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "train_peak_rss": train_peak, "train_peak_exact": probe.exact, "cuda_peak_bytes": cuda_peak,
        "process_peak_rss": peak_rss_bytes(), "energy": meter.reading.as_dict(),
        "trainable_parameters": summary.trainable, "total_parameters": summary.total,
        "estimated_peak": plan.total, "checkpointing": bool(plan.checkpointing), "exact_match": matched,
        "seconds": time.perf_counter() - started,
    }


# ---- in the parent -----------------------------------------------------------------------------------------------
@dataclass
class Measured:
    technique: FinetuneTechnique
    raw: dict[str, Any] | None = None
    error: str | None = None
    traceback: str = ""


def to_result(m: Measured, settings: FinetuneSettings, context: dict[str, Any]) -> TechniqueResult:
    from hayai.bench.flops import PROJECTIONS, LoRAShape, training_step_flops

    t = m.technique
    if m.raw is None:
        return TechniqueResult.failed(t.name, m.error or "no measurements", t.kind, t.description,
                                      traceback=m.traceback)
    raw = m.raw
    eval_loss = raw.get("eval_loss")
    quality = math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None
    metrics: dict[str, Any] = {k: raw.get(k) for k in (
        "first_loss", "last_loss", "eval_loss", "trainable_parameters", "estimated_peak", "process_peak_rss",
        "overall_tokens_per_second", "checkpointing", "exact_match", "seconds", "cpu_seconds")}
    config = context.get("config")
    if config is not None:
        full = t.method in ("full", "lomo", "adalomo")
        lora = LoRAShape(8, PROJECTIONS) if t.method in ("lora", "qlora") else None
        fwd, bwd = training_step_flops(config, settings.seq_len, train="all" if full else "adapters", lora=lora,
                                       recompute=bool(raw.get("checkpointing")))
        metrics["flops_per_token"] = (fwd.total + bwd.total) / settings.seq_len
        if raw.get("tokens_per_second"):
            metrics["flops_per_second"] = metrics["flops_per_token"] * raw["tokens_per_second"]
    energy = raw.get("energy") or {}
    if energy.get("joules") and raw.get("tokens_per_second"):
        metrics["joules"] = energy["joules"]
    memory = raw.get("cuda_peak_bytes") or raw.get("train_peak_rss") or raw.get("process_peak_rss")
    return TechniqueResult(t.name, t.kind, "ok", None, t.description, raw.get("tokens_per_second"), memory, quality,
                           None, metrics)


DETAILS = [
    Detail("first_loss", "loss step 1"),
    Detail("last_loss", "loss last step"),
    Detail("eval_loss", "eval loss"),
    Detail("trainable_parameters", "trainable params", "int"),
    Detail("flops_per_token", "FLOPs/token (est.)", "flops"),
    Detail("flops_per_second", "achieved FLOP/s", "flops"),
    Detail("estimated_peak", "hayai's estimate", "bytes"),
    Detail("process_peak_rss", "process peak RSS", "bytes"),
    Detail("checkpointing", "checkpointing", "bool"),
    Detail("exact_match", "exact match", "percent"),
    Detail("joules", "energy (J)"),
    Detail("cpu_seconds", "CPU time", "seconds"),
]
