"""The generate suite: weight formats and decoding strategies against plain decoding, on the user's model.

Each technique runs in a fresh process (`hayai.bench.memory.run_isolated`): load the model, apply the weight
format, build the decoding strategy, then

1. perplexity on the data (only for the baseline and the weight formats: a decoding strategy does not change the
   model, so it inherits the perplexity of its weights);
2. one short warm-up generation (lazy kernel packing, draft construction);
3. with the resident-memory high-water mark reset, greedy generation of `new_tokens` tokens for each prompt,
   end-of-sequence ignored so every technique does the same work (as in benchmarks/generate.py).

Measured per technique: decode tokens/s = Σ (tokens − 1) / Σ decode seconds (the first token comes from the
prefill), prefill tokens/s, tokens per target forward and draft acceptance (speculative strategies), weight
bytes read per token and the achieved fraction of the measured read-bandwidth limit, estimated FLOPs per token,
peak RSS while generating (CUDA peak on GPUs; everything resident, weights included) and of the setup (loading,
converting, perplexity, warm-up), energy where readable. "Lossless" compares the
greedy tokens with the baseline's, prompt by prompt, up to the first end-of-sequence token: speculative decoding
is lossless by construction (up to floating-point differences between a multi-token verification pass and
single-token passes), a weight format is not.

Techniques (each reported ok, failed with its error, or skipped with the reason):
  weights   fp32 / bf16 (whichever is not the baseline's dtype), int8, int4 (`hayai.quant`, embeddings too),
            nf4 (QLoRA's storage format; dequantizes per forward, so slow to decode)
  decoding  prompt lookup (`hayai.decode.prompt_lookup`), Jacobi guesses (`hayai.decode.jacobi`), lookahead
            decoding (`hayai.decode.lookahead`), self-speculative early exit at half depth and with an int4 copy
            of the model as draft (`hayai.decode.self_speculative`), a draft model (`--draft-model`), compiled
            decode (`hayai.decode.compiled`, not in --quick: compiling takes tens of seconds)
  combination  the fastest weight format within the quality tolerance with the fastest decoding strategy,
            both chosen from this run's measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hayai.bench.datasets import Prompt
from hayai.bench.report import Detail, SuiteResult, TechniqueResult
from hayai.errors import ConfigError
from hayai.train.data import Record

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4", "nf4")
DECODINGS = ("autoregressive", "lookup", "jacobi", "lookahead", "early-exit", "self-int4", "draft", "compiled")
DESCRIPTIONS = {
    "fp32": "fp32 weights and activations",
    "bf16": "bf16 weights and activations",
    "int8": "int8 weight-only, per-channel scales (hayai.quant.int8), embeddings too",
    "int4": "int4 weight-only, groups of 64 (hayai.quant.int4), embeddings too",
    "nf4": "NF4 with double quantization (QLoRA's format; dequantized per forward)",
    "lookup": "prompt lookup decoding: drafts copied from the prompt, verified in one pass",
    "jacobi": "Jacobi decoding: the target's own refined guesses of the next tokens, verified in one pass",
    "lookahead": "lookahead decoding: Jacobi window + n-gram pool (seeded from the prompt), one pass per step",
    "early-exit": "self-speculative: the first half of the layers drafts, the full model verifies",
    "self-int4": "self-speculative: an int4 copy of the model drafts, the full model verifies",
    "draft": "speculative decoding with a separate draft model",
    "compiled": "torch.compile of the decode step over the static KV cache",
}


@dataclass(frozen=True)
class GenerateSettings:
    model: str  # a resolved model directory (or a store name)
    prompts: tuple[Prompt, ...]
    perplexity_records: tuple[Record, ...]
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    new_tokens: int = 128
    repeats: int = 1
    perplexity_tokens: int = 2048
    window: int = 512
    draft_model: str | None = None


@dataclass(frozen=True)
class GenerateTechnique:
    name: str
    kind: str  # baseline | weights | decoding | combination
    weights: str = "base"  # "base" (the baseline dtype) or one of WEIGHT_FORMATS
    decoding: str = "autoregressive"
    description: str = ""

    @property
    def key(self) -> str:
        """The name `--only` selects it by: the weight format or the decoding strategy."""
        return self.weights if self.kind == "weights" else self.decoding


# ---- in the child process ----------------------------------------------------------------------------------------
def apply_weights(model: Any, weights: str, device: Any) -> dict[str, Any]:
    """Convert `model` in place to a weight format; returns what changed."""
    import torch

    if weights == "base":
        return {}
    if weights in ("fp32", "bf16"):
        model.to(torch.float32 if weights == "fp32" else torch.bfloat16)
        return {"dtype": weights}
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    from hayai.quant import preferred_activation_dtype, quantize_model

    notes = []
    kernel_dtype = preferred_activation_dtype(weights, device.type)
    if kernel_dtype is not None and kernel_dtype != model.dtype:
        model.to(kernel_dtype)
        notes.append(f"computes in {str(kernel_dtype).removeprefix('torch.')}: the {weights} kernels are fast for "
                     "those activations here")
    summary = quantize_model(model, weights, embeddings=weights in ("int8", "int4"))
    return {"bytes_before": summary.bytes_before, "bytes_after": summary.bytes_after,
            "replaced": len(summary.replaced), "skipped": len(summary.skipped), "notes": notes + summary.notes}


def build_strategy(decoding: str, model: Any, tokenizer: Any, settings: GenerateSettings) -> tuple[Any, Any]:
    """(strategy or None, model to generate with)."""
    if decoding == "autoregressive":
        return None, model
    if decoding == "compiled":
        from hayai.decode.compiled import compile_decode

        return None, compile_decode(model)
    if decoding == "lookahead":
        from hayai.decode.lookahead import LookaheadDecoding

        return LookaheadDecoding(), model
    from hayai.decode.speculative import SpeculativeDecoding

    stop = tokenizer.eos_token_ids
    if decoding == "lookup":
        from hayai.decode.prompt_lookup import PromptLookup

        return SpeculativeDecoding(PromptLookup(stop_token_ids=stop)), model
    if decoding == "jacobi":
        from hayai.decode.jacobi import Jacobi

        return SpeculativeDecoding(Jacobi(stop_token_ids=stop)), model
    if decoding in ("early-exit", "self-int4"):
        from hayai.decode.self_speculative import EarlyExit

        if decoding == "early-exit":
            source = EarlyExit(exit_layer=max(1, model.config.num_hidden_layers // 2), stop_token_ids=stop)
        else:
            source = EarlyExit(quant="int4", stop_token_ids=stop)
        return SpeculativeDecoding(source), model
    if decoding == "draft":
        if not settings.draft_model:
            raise ConfigError("the draft-model technique needs a draft model (--draft-model NAME)")
        from hayai.decode.draft_model import DraftModel
        from hayai.models.loading import load_model

        draft, _, _ = load_model(settings.draft_model, dtype=model.dtype, device=model.device)
        return SpeculativeDecoding(DraftModel(draft, stop_token_ids=stop)), model
    raise ConfigError(f"unknown decoding strategy {decoding!r}; choose one of {', '.join(DECODINGS)}")


def _perplexity_ids(records: tuple[Record, ...], tokenizer: Any, limit: int) -> list[int]:
    from hayai.train.data import tokenize_record

    ids: list[int] = []
    for record in records:
        example = tokenize_record(record, tokenizer)
        ids += [*example.input_ids, example.labels[-1]] if example.labels else list(example.input_ids)
        if len(ids) >= limit:
            break
    return ids[:limit]


def prompt_ids(prompt: Prompt, tokenizer: Any) -> list[int]:
    from hayai.train.data import prompt_text

    record = prompt.record
    if record.messages:
        return tokenizer.encode(prompt_text(record, tokenizer), add_special_tokens=not tokenizer.has_chat_template)
    return tokenizer.encode(record.text or "")


def measure_generate(technique: GenerateTechnique, settings: GenerateSettings,
                     progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run one technique (in a fresh process); returns plain measurements (see the module docstring)."""
    import torch

    from hayai.bench.energy import EnergyMeter
    from hayai.bench.memory import PeakRSS, peak_rss_bytes, release_memory
    from hayai.compress.quality import perplexity
    from hayai.decode.engine import Engine
    from hayai.models.llama import weight_bytes_read_per_token
    from hayai.models.loading import load_model
    from hayai.runtime import configure_threads, resolve_device, resolve_dtype

    report = progress or (lambda *args: None)
    configure_threads(settings.threads)
    device = resolve_device(settings.device)
    started = time.perf_counter()
    report("loading", 0, 1)
    model, tokenizer, _ = load_model(settings.model, dtype=resolve_dtype(settings.dtype, device), device=device)
    weights = apply_weights(model, technique.weights, device)
    strategy, runner = build_strategy(technique.decoding, model, tokenizer, settings)
    engine = Engine(runner, tokenizer)
    engine.refresh_weight_bytes()
    out: dict[str, Any] = {"weights": weights, "dtype": str(model.dtype).removeprefix("torch.")}

    if technique.kind in ("baseline", "weights"):  # decoding strategies keep their weights' perplexity
        ids = _perplexity_ids(settings.perplexity_records, tokenizer, settings.perplexity_tokens)
        window = min(settings.window, model.config.context_window)
        out["perplexity"] = perplexity(model, ids, window=window, progress=lambda d, t: report("perplexity", d, t))
        out["perplexity_tokens"] = len(ids)

    prompts = [prompt_ids(p, tokenizer) for p in settings.prompts]
    n = settings.new_tokens
    report("warm-up", 0, 1)
    engine.generate(prompts[0], max_new_tokens=min(8, n), strategy=strategy, stop_token_ids=set(), truncate=True)
    # Setup ends here: loading, converting, lazy kernel packing and draft construction are behind us.
    out.update(setup_seconds=time.perf_counter() - started, setup_peak_rss=peak_rss_bytes())
    release_memory()
    probe = PeakRSS()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    total = len(prompts) * settings.repeats
    meter = EnergyMeter()
    with meter:
        for i, ids in enumerate(prompts):
            for r in range(settings.repeats):
                c = engine.generate(ids, max_new_tokens=n, strategy=strategy, stop_token_ids=set(), truncate=True)
                s = c.stats
                runs.append({"prompt": i, "repeat": r, "tokens": c.token_ids, "prompt_tokens": s.prompt_tokens,
                             "generated": s.generated_tokens, "prefill_seconds": s.prefill_seconds,
                             "decode_seconds": s.decode_seconds, "target_forwards": s.target_forwards,
                             "drafted": s.drafted_tokens, "accepted": s.accepted_tokens})
                report("generating", len(runs), total)
    out.update(runs=runs, energy=meter.reading.as_dict(), weight_bytes_per_token=weight_bytes_read_per_token(model),
               run_peak_rss=probe.peak(), run_peak_exact=probe.exact, eos=sorted(tokenizer.eos_token_ids))
    if device.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if technique.decoding == "lookahead":  # the Jacobi window rides along in every pass, beyond the drafts
        out["window_tokens_per_forward"] = (strategy.window - 1) + strategy.window * (strategy.ngram - 2)
    fallback = getattr(runner, "fallback_reason", None)
    if fallback:
        out["notes"] = [f"compiled decode fell back to eager: {fallback}"]
    return out


# ---- in the parent: the technique list and the results -----------------------------------------------------------
KEYS = (*WEIGHT_FORMATS, *DECODINGS[1:])
NAMES = {"lookup": "prompt lookup", "jacobi": "Jacobi decoding", "lookahead": "lookahead decoding",
         "early-exit": "self-speculative (early exit)",
         "self-int4": "self-speculative (int4 draft)", "draft": "draft model", "compiled": "compiled decode"}


def plan_techniques(base_dtype: str, quick: bool, draft_model: str | None,
                    only: tuple[str, ...] | None = None) -> tuple[list[GenerateTechnique], list[TechniqueResult]]:
    """The techniques to run and those skipped here (with the reason). With `only`, the baseline and the
    techniques whose keys (`KEYS`) are listed."""
    chosen = set(KEYS if only is None else only)
    runs = [GenerateTechnique(f"{base_dtype} (baseline)", "baseline", description="plain autoregressive decoding")]
    skipped = []
    for fmt in WEIGHT_FORMATS:
        if fmt == base_dtype or fmt not in chosen:
            continue
        if fmt == "nf4" and quick:
            skipped.append(TechniqueResult.skipped(fmt, "--quick: NF4 dequantizes every weight on every forward "
                                                   "pass, so decoding is ~10x slower than the baseline; it is "
                                                   "QLoRA's storage format (see the finetune suite)", "weights",
                                                   DESCRIPTIONS[fmt]))
        else:
            runs.append(GenerateTechnique(fmt, "weights", weights=fmt, description=DESCRIPTIONS[fmt]))
    for decoding, name in NAMES.items():
        if decoding not in chosen:
            continue
        if decoding == "draft" and not draft_model:
            skipped.append(TechniqueResult.skipped(name, "no draft model given (--draft-model NAME)", "decoding",
                                                   DESCRIPTIONS[decoding]))
        elif decoding == "compiled" and quick:
            skipped.append(TechniqueResult.skipped(name, "--quick: compiling takes tens of seconds; run without "
                                                   "--quick", "decoding", DESCRIPTIONS[decoding]))
        else:
            label = f"{name} ({draft_model})" if decoding == "draft" else name
            runs.append(GenerateTechnique(label, "decoding", decoding=decoding, description=DESCRIPTIONS[decoding]))
    return runs, skipped


def _agree_until_eos(a: list[int], b: list[int], eos: set[int]) -> bool:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return False
        if x in eos:
            return True
    return len(a) == len(b)


@dataclass
class Measured:
    technique: GenerateTechnique
    raw: dict[str, Any] | None = None
    error: str | None = None
    traceback: str = ""
    peak_rss: int | None = None  # the whole child process


def to_result(m: Measured, baseline: Measured | None, context: dict[str, Any]) -> TechniqueResult:
    """A `TechniqueResult` from a child's measurements (quality and losslessness against the baseline)."""
    from hayai.bench.bandwidth import achieved_fraction
    from hayai.bench.flops import forward_flops, generation_flops
    from hayai.bench.timing import timing_from

    t = m.technique
    if m.raw is None:
        return TechniqueResult.failed(t.name, m.error or "no measurements", t.kind, t.description,
                                      traceback=m.traceback)
    raw, runs = m.raw, m.raw["runs"]
    generated = sum(r["generated"] - 1 for r in runs)
    decode_seconds = sum(r["decode_seconds"] for r in runs)
    speed = generated / decode_seconds if decode_seconds > 0 else None
    forwards = sum(r["target_forwards"] for r in runs)
    drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
    metrics: dict[str, Any] = {
        "prefill_tokens_per_second": sum(r["prompt_tokens"] for r in runs) / max(1e-9, sum(
            r["prefill_seconds"] for r in runs)),
        "decode_iqr": timing_from([r["decode_seconds"] / max(1, r["generated"] - 1) for r in runs]).relative_spread,
        "tokens_per_forward": generated / forwards if forwards else None,
        "acceptance": accepted / drafted if drafted else None,
        "weight_bytes_per_token": raw["weight_bytes_per_token"],
        "setup_seconds": raw["setup_seconds"], "setup_peak_rss": raw["setup_peak_rss"],
        "process_peak_rss": m.peak_rss, "dtype": raw.get("dtype"), "cpu_seconds": raw.get("cpu_seconds"),
    }
    if forwards and decode_seconds > 0:
        achieved = raw["weight_bytes_per_token"] * forwards / decode_seconds
        metrics["weight_bandwidth"] = achieved
        if context.get("bandwidth"):
            metrics["bandwidth_fraction"] = achieved_fraction(achieved, context["bandwidth"])
    config = context.get("config")
    if config is not None and runs:
        total = 0.0
        window = raw.get("window_tokens_per_forward", 0)
        for r in runs:  # accepted drafts are generated tokens; rejected ones (and a lookahead window) are extra
            total += generation_flops(config, r["prompt_tokens"], r["generated"]).total
            extra = r["drafted"] - r["accepted"] + window * r["target_forwards"]
            total += extra * forward_flops(config, 1, past_tokens=r["prompt_tokens"] + r["generated"] // 2).total
        metrics["flops_per_token"] = total / max(1, sum(r["generated"] for r in runs))
    energy = raw.get("energy") or {}
    if energy.get("joules"):
        metrics["joules_per_token"] = energy["joules"] / max(1, sum(r["generated"] for r in runs))
    quality = raw.get("perplexity")
    if quality is None and baseline is not None and baseline.raw is not None:
        quality = context.get("perplexity_by_weights", {}).get(t.weights, baseline.raw.get("perplexity"))
        metrics["perplexity_from"] = "the same weights measured in this run"
    lossless = None
    if baseline is not None and baseline.raw is not None:
        eos = set(baseline.raw.get("eos", []))
        base_runs = {(r["prompt"], r["repeat"]): r["tokens"] for r in baseline.raw["runs"]}
        pairs = [(r["tokens"], base_runs.get((r["prompt"], r["repeat"]))) for r in runs]
        same = sum(1 for a, b in pairs if b is not None and _agree_until_eos(a, b, eos))
        lossless = same == len(pairs) and bool(pairs)
        metrics["greedy_agreement"] = f"{same}/{len(pairs)} prompts"
    memory = raw.get("cuda_peak_bytes", raw["run_peak_rss"])
    notes = list(raw.get("notes", [])) + list(raw.get("weights", {}).get("notes", []))
    if notes:
        metrics["notes"] = notes
    return TechniqueResult(t.name, t.kind, "ok", None, t.description, speed, memory, quality, lossless, metrics)


def combination(results: list[TechniqueResult], techniques: dict[str, GenerateTechnique],
                suite: SuiteResult) -> GenerateTechnique | str:
    """The fastest weight format within the quality tolerance plus the fastest decoding strategy (all of them
    keep their weights' quality), or the reason there is no combination worth running."""
    def faster(r: TechniqueResult) -> bool:
        ratio = suite.speed_ratio(r)
        return ratio is not None and ratio > 1.0

    formats = [r for r in results if r.kind == "weights" and faster(r) and suite.within_tolerance(r)]
    decodings = [r for r in results if r.kind == "decoding" and faster(r) and suite.within_tolerance(r)]
    if not formats or not decodings:
        missing = "weight format within the quality tolerance" if not formats else "decoding strategy"
        return f"no {missing} was faster than the baseline, so there is nothing to combine"
    fmt = max(formats, key=lambda r: r.speed)
    dec = max(decodings, key=lambda r: r.speed)
    w, d = techniques[fmt.name], techniques[dec.name]
    return replace(d, name=f"{fmt.name} + {dec.name}", kind="combination", weights=w.weights,
                   description=f"{w.description}; {d.description}")


DETAILS = [
    Detail("prefill_tokens_per_second", "prefill tok/s"),
    Detail("tokens_per_forward", "tok/forward"),
    Detail("acceptance", "draft acceptance", "percent"),
    Detail("weight_bytes_per_token", "weights/token", "bytes"),
    Detail("bandwidth_fraction", "of bandwidth limit", "percent"),
    Detail("flops_per_token", "FLOPs/token (est.)", "flops"),
    Detail("joules_per_token", "J/token"),
    Detail("setup_peak_rss", "setup peak RSS", "bytes"),
    Detail("setup_seconds", "setup", "seconds"),
    Detail("decode_iqr", "decode IQR/median", "percent"),
    Detail("cpu_seconds", "CPU time", "seconds"),
]
