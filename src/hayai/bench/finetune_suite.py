"""The finetune suite: every fine-tuning method of `hayai.finetune` for a few steps on the user's data.

Each method runs `hayai.finetune` in a fresh process (`hayai.bench.memory.run_isolated`) with the same data,
batch, sequence length, step count and a constant learning rate (the method's default peak rate; warm-up and
decay would make a few-step comparison depend on the schedule). The baseline is plain full fine-tuning with
AdamW. Measured per method:

- tokens/s over the steps after the first (the first pays one-time costs), from the trainer's log;
- peak RSS of the training phase (CUDA peak on GPUs): the high-water mark is reset when training starts, after
  loading, quantizing and the memory probe, and read when it ends, so QLoRA's quantization transient does not
  hide what training needs; the whole process's peak is kept in the details;
- quality: perplexity exp(eval loss) on the held-out records after the steps (lower is better), and the exact
  match of greedy answers when asked for;
- estimated FLOPs per token (`hayai.bench.flops`: backward skips frozen weights' gradients, activation
  checkpointing reruns the forward) and the achieved FLOP/s;
- energy over the training phase where readable; trainable parameters; hayai's own memory estimate.

Methods: full (AdamW), LOMO, AdaLomo, LoRA, QLoRA, (IA)³, LoRA with activation checkpointing, and any further
method `hayai.finetuning.METHODS` lists.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hayai.bench.report import Detail, TechniqueResult

NAMES = {"full": "full AdamW", "lomo": "LOMO", "adalomo": "AdaLomo", "lora": "LoRA r=8", "qlora": "QLoRA r=8",
         "ia3": "(IA)³"}
DESCRIPTIONS = {
    "full": "every weight, AdamW (two fp32 moments per weight)",
    "lomo": "every weight, SGD fused into backward (no optimizer state, no full gradient)",
    "adalomo": "every weight, AdaLomo (factored second moments) fused into backward",
    "lora": "LoRA r=8 on every linear layer, frozen base",
    "qlora": "LoRA r=8 over an NF4 double-quantized frozen base",
    "ia3": "(IA)³ scaling vectors on k, v and the FFN",
}


@dataclass(frozen=True)
class FinetuneSettings:
    model: str
    train_file: str
    eval_file: str
    workdir: str
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
        from hayai.finetuning import METHODS

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
class _Phase:
    """The finetune callback: resets the memory high-water mark and starts the energy meter when training starts,
    reads both when it ends, and forwards step progress."""

    def __init__(self, report: Callable[..., None], device: str) -> None:
        self.report = report
        self.device = device
        self.probe = None
        self.meter = None
        self.peak = None
        self.exact = False
        self.cuda_peak = None

    def __call__(self, event: Any) -> None:
        from hayai.bench.energy import EnergyMeter
        from hayai.bench.memory import PeakRSS, release_memory

        if event.kind == "stage" and event.message == "training" and self.probe is None:
            release_memory()
            self._reset_cuda()
            self.probe = PeakRSS()
            self.meter = EnergyMeter().__enter__()
        elif event.kind == "stage":
            self.report(event.message, 0, 1)
        elif event.kind == "step":
            self.report("training", event.step, event.total_steps)
        elif event.kind == "done" and self.probe is not None:
            self.peak, self.exact = self.probe.peak(), self.probe.exact
            self.meter.__exit__(None, None, None)
            self.cuda_peak = self._cuda_peak()

    def _reset_cuda(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def _cuda_peak(self) -> int | None:
        import torch

        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_initialized() else None


def _steady_tokens_per_second(log: Path) -> float | None:
    """Tokens/s over steps 2..N from the trainer's log (cumulative tokens/s × elapsed gives tokens so far)."""
    rows = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "tokens_per_second" in row and "elapsed_seconds" in row:
                rows.append(row)
    if len(rows) < 2:
        return rows[0]["tokens_per_second"] if rows else None
    tokens = [r["tokens_per_second"] * r["elapsed_seconds"] for r in rows]
    seconds = rows[-1]["elapsed_seconds"] - rows[0]["elapsed_seconds"]
    return (tokens[-1] - tokens[0]) / seconds if seconds > 0 else None


def measure_finetune(technique: FinetuneTechnique, settings: FinetuneSettings,
                     progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run `hayai.finetune` for one method (in a fresh process); returns plain measurements."""
    from hayai.bench.memory import peak_rss_bytes
    from hayai.finetuning import DEFAULT_LR, finetune

    report = progress or (lambda *args: None)
    phase = _Phase(report, settings.device)
    output = Path(settings.workdir) / "".join(c if c.isalnum() else "-" for c in technique.name)
    options = dict(technique.options)
    started = time.perf_counter()
    try:
        result = finetune(settings.model, settings.train_file, output=output, eval_data=settings.eval_file,
                          callback=phase, method=technique.method, max_steps=settings.steps,
                          batch_size=settings.batch_size, seq_len=settings.seq_len, schedule="constant", warmup=0,
                          lr=DEFAULT_LR.get(technique.method), eval_every=0, save_every=0, overwrite=True,
                          exact_match=settings.exact_match, device=settings.device, threads=settings.threads,
                          **options)
        steady = _steady_tokens_per_second(output / "training_log.jsonl")
    finally:
        shutil.rmtree(output, ignore_errors=True)
    estimate = result.memory_estimate
    return {
        "tokens_per_second": steady or result.tokens_per_second, "overall_tokens_per_second": result.tokens_per_second,
        "steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "train_peak_rss": phase.peak, "train_peak_exact": phase.exact, "cuda_peak_bytes": phase.cuda_peak,
        "process_peak_rss": peak_rss_bytes(), "energy": phase.meter.reading.as_dict() if phase.meter else None,
        "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
        "estimated_peak": estimate.total if estimate else None,
        "checkpointing": bool(estimate.checkpointing) if estimate else None,
        "exact_match": result.exact_match_after.accuracy if result.exact_match_after else None,
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
