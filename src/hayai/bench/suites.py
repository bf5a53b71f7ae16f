"""`run_bench`: every suite's techniques against the plain baseline on the user's model and data.

    from hayai.bench.suites import BenchOptions, run_bench
    from hayai.bench.report import write_report
    report = run_bench(BenchOptions(model=None, suites=("generate",), quick=True))
    write_report(report, "bench-out")

Order of work: resolve the model (pulling the default model on first use), read the data, describe the
hardware, measure the read-bandwidth limit, then for each suite run its techniques one by one, each in a fresh
process (honest peak RSS, and one technique crashing cannot take the others down). A technique that raises,
dies or runs past its time limit is recorded as failed with its error; one that cannot apply here is recorded as
skipped with the reason. Nothing is dropped. Progress goes to `callback` as `BenchEvent`s.

`--quick` sizes (2 prompts × 32 new tokens, 256 perplexity tokens; 3 training steps of 2 × 128 tokens) keep a
run on the default model (SmolLM2-135M) on two CPU cores under 5 minutes; the full sizes (8 prompts × 128
tokens, 4096 perplexity tokens; 20 steps of 4 × 256 tokens) give steadier numbers.
"""

from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hayai.bench import finetune_suite, generate_suite
from hayai.bench.datasets import BenchData, load_bench_data
from hayai.bench.memory import IsolatedRunError, run_isolated
from hayai.bench.recommend import recommend
from hayai.bench.report import BenchReport, SuiteResult, TechniqueResult
from hayai.errors import ConfigError

SUITES = ("generate", "finetune")


@dataclass(frozen=True)
class Sizes:
    prompts: int
    new_tokens: int
    perplexity_tokens: int
    window: int
    steps: int
    batch_size: int
    seq_len: int
    timeout: float  # seconds per technique


QUICK = Sizes(prompts=2, new_tokens=32, perplexity_tokens=256, window=256, steps=3, batch_size=2, seq_len=128,
              timeout=1200)
FULL = Sizes(prompts=8, new_tokens=128, perplexity_tokens=4096, window=512, steps=20, batch_size=4, seq_len=256,
             timeout=7200)


@dataclass
class BenchOptions:
    model: str | None = None
    data: str | None = None
    suites: tuple[str, ...] = SUITES
    quick: bool = False
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    tolerance: float = 0.02
    draft_model: str | None = None
    exact_match: bool = False
    only: tuple[str, ...] | None = None  # technique keys to run besides the baselines (see `technique_keys`)
    sizes: Sizes | None = None  # overrides QUICK / FULL

    def __post_init__(self) -> None:
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise ConfigError(f"unknown suite {', '.join(unknown) or '(none)'}; choose from {', '.join(SUITES)} "
                              "or all")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"the quality tolerance is a fraction in [0, 1), got {self.tolerance}")

    @property
    def size(self) -> Sizes:
        return self.sizes or (QUICK if self.quick else FULL)


@dataclass
class BenchEvent:
    """Progress: kind "stage" (message), "start" / "progress" / "done" of a technique (index of total; a
    child's stage with done / stage_total; the result when done)."""

    kind: str
    suite: str = ""
    technique: str = ""
    index: int = 0
    total: int = 0
    stage: str = ""
    done: int = 0
    stage_total: int = 0
    message: str = ""
    result: TechniqueResult | None = None


@dataclass
class _Run:
    options: BenchOptions
    callback: Callable[[BenchEvent], None] | None
    total: int = 0
    index: int = 0
    context: dict[str, Any] = field(default_factory=dict)

    def emit(self, kind: str, **kwargs: Any) -> None:
        if self.callback is not None:
            self.callback(BenchEvent(kind, index=self.index, total=self.total, **kwargs))

    def isolated(self, suite: str, name: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None, str, int]:
        """Run one technique in a fresh process: (value or None, error or None, child traceback, peak RSS).
        The value (a dict) gains the child's total CPU seconds and wall seconds."""
        self.index += 1
        self.emit("start", suite=suite, technique=name)

        def forward(stage: str, done: int, total: int) -> None:
            self.emit("progress", suite=suite, technique=name, stage=stage, done=done, stage_total=total)

        try:
            result = run_isolated(fn, *args, threads=self.context.get("threads"), progress=forward,
                                  timeout=self.options.size.timeout)
            value = result.value
            if isinstance(value, dict):
                value = {**value, "cpu_seconds": result.cpu_seconds, "wall_seconds": result.seconds}
            return value, None, "", result.peak_rss_bytes
        except IsolatedRunError as exc:
            return None, str(exc), exc.child_traceback, 0

    def finish(self, suite: str, result: TechniqueResult) -> TechniqueResult:
        self.emit("done", suite=suite, technique=result.name, result=result)
        return result


# ---- generate ----------------------------------------------------------------------------------------------------
def _generate(run: _Run, model_dir: str, data: BenchData) -> SuiteResult:
    from hayai.runtime import resolve_device

    o, size = run.options, run.options.size
    device = resolve_device(o.device)
    base_dtype = base_dtype_name(o)
    settings = generate_suite.GenerateSettings(
        model=model_dir, prompts=tuple(data.select_prompts(size.prompts)),
        perplexity_records=tuple(data.perplexity_records), dtype=o.dtype, device=o.device, threads=o.threads,
        new_tokens=size.new_tokens, perplexity_tokens=size.perplexity_tokens, window=size.window,
        draft_model=o.draft_model)
    planned, skipped = generate_suite.plan_techniques(base_dtype, o.quick, o.draft_model, o.only)
    suite = SuiteResult("generate", speed_label="decode tok/s",
                        memory_label="CUDA peak" if device.type == "cuda" else "peak RSS",
                        quality_label="perplexity", quality_tolerance=o.tolerance, details=generate_suite.DETAILS)
    measured: list[generate_suite.Measured] = []
    for technique in planned:
        value, error, tb, peak = run.isolated("generate", technique.name, generate_suite.measure_generate, technique,
                                              settings)
        m = generate_suite.Measured(technique, value, error, tb, peak)
        measured.append(m)
        if technique.kind == "baseline" and value is not None:
            run.context["perplexity_by_weights"] = {"base": value.get("perplexity")}
        if technique.kind == "weights" and value is not None:
            run.context.setdefault("perplexity_by_weights", {})[technique.weights] = value.get("perplexity")
        base = measured[0] if measured[0].raw is not None else None
        suite.results.append(run.finish("generate", generate_suite.to_result(m, base, run.context)))
    base = measured[0] if measured[0].raw is not None else None
    for r in skipped:
        run.index += 1
        suite.results.append(run.finish("generate", r))
    combo = generate_suite.combination(suite.results, {m.technique.name: m.technique for m in measured}, suite)
    if isinstance(combo, str):
        run.index += 1
        suite.results.append(run.finish("generate", TechniqueResult.skipped("best format + best decoding", combo,
                                                                            "combination")))
    else:
        value, error, tb, peak = run.isolated("generate", combo.name, generate_suite.measure_generate, combo,
                                              settings)
        m = generate_suite.Measured(combo, value, error, tb, peak)
        suite.results.append(run.finish("generate", generate_suite.to_result(m, base, run.context)))
    suite.settings = {"prompts": [p.name for p in settings.prompts], "new_tokens": size.new_tokens,
                      "perplexity_tokens": size.perplexity_tokens, "window": size.window, "dtype": base_dtype,
                      "device": str(device)}
    suite.notes = [
        f"{len(settings.prompts)} prompts ({', '.join(p.name for p in settings.prompts)}), greedy, "
        f"{size.new_tokens} new tokens each (end-of-sequence ignored), batch 1; decode tok/s excludes the first "
        "token (prefill)",
        f"perplexity on {size.perplexity_tokens} tokens of {data.source} data in windows of {size.window}; "
        "decoding strategies keep the perplexity of their weights",
        "lossless: greedy tokens identical to the baseline's on every prompt (up to the first end-of-sequence)"
        + ("" if base_dtype == "fp32" else f"; in {base_dtype} a multi-token verification pass rounds differently "
           "from single-token passes, so speculative strategies, exact by construction, can still drift"),
        "FLOPs/token: the target model's matrix products (hayai.bench.flops), rejected drafts and lookahead's "
        "window included; a draft network's own work is not",
        f"{suite.memory_label}: measured after loading and converting the model, in a fresh process per technique "
        "(weights resident + KV cache + activations); the setup peak is in the details",
    ]
    suite.recommendation = recommend(suite, ("speed", "memory"))
    return suite


# ---- finetune ----------------------------------------------------------------------------------------------------
def _finetune(run: _Run, model_dir: str, data: BenchData, workdir: Path) -> SuiteResult:
    from hayai.runtime import resolve_device

    o, size = run.options, run.options.size
    train, held_out = data.write_finetune_files(workdir / "data")
    settings = finetune_suite.FinetuneSettings(
        model=model_dir, train_file=str(train), eval_file=str(held_out),
        steps=size.steps, batch_size=size.batch_size, seq_len=size.seq_len, device=o.device, threads=o.threads,
        exact_match=o.exact_match)
    device = resolve_device(o.device)
    suite = SuiteResult("finetune", speed_label="train tok/s",
                        memory_label="CUDA peak" if device.type == "cuda" else "peak RSS",
                        quality_label="eval perplexity", quality_tolerance=o.tolerance,
                        details=finetune_suite.DETAILS)
    for technique in finetune_suite.plan_techniques(run.context.get("finetune_methods"), o.only):
        value, error, tb, _ = run.isolated("finetune", technique.name, finetune_suite.measure_finetune, technique,
                                           settings)
        m = finetune_suite.Measured(technique, value, error, tb)
        suite.results.append(run.finish("finetune", finetune_suite.to_result(m, settings, run.context)))
    suite.settings = {"steps": size.steps, "batch_size": size.batch_size, "seq_len": size.seq_len,
                      "train_records": len(data.train_records), "eval_records": len(data.eval_records)}
    suite.notes = [
        f"{size.steps} steps of {size.batch_size} × {size.seq_len} tokens (packed) per method on {data.source} data "
        f"({len(data.train_records)} training records), constant learning rate (each method's default)",
        f"train tok/s over steps 2..{size.steps}; eval perplexity = exp(mean token loss on "
        f"{len(data.eval_records)} held-out records) after the last step",
        f"{suite.memory_label} of the training phase (after loading and quantizing), fresh process per method",
        *data.notes,
    ]
    suite.recommendation = recommend(suite, ("speed", "memory"))
    return suite


# ---- the whole run -----------------------------------------------------------------------------------------------
def base_dtype_name(options: BenchOptions) -> str:
    """The baseline's dtype as a weight-format name: fp32, bf16 or fp16."""
    from hayai.runtime import resolve_device, resolve_dtype

    dtype = str(resolve_dtype(options.dtype, resolve_device(options.device))).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def count_techniques(options: BenchOptions, methods: tuple[str, ...] | None = None) -> int:
    total = 0
    if "generate" in options.suites:
        planned, skipped = generate_suite.plan_techniques(base_dtype_name(options), options.quick,
                                                          options.draft_model, options.only)
        total += len(planned) + len(skipped) + 1  # + the combination
    if "finetune" in options.suites:
        total += len(finetune_suite.plan_techniques(methods, options.only))
    return total


def technique_keys(methods: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Every name `only` accepts: weight formats, decoding strategies, finetune methods."""
    if methods is None:
        from hayai.train.recipe import METHODS

        methods = tuple(METHODS)
    return tuple(dict.fromkeys((*generate_suite.KEYS, *finetune_suite.technique_keys(methods))))


def suites_to_run(options: BenchOptions, methods: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The chosen suites, less those none of whose techniques `only` selects."""
    if options.only is None:
        return options.suites
    selected = {"generate": set(generate_suite.KEYS), "finetune": set(finetune_suite.technique_keys(methods or ()))}
    chosen = tuple(s for s in options.suites if selected[s] & set(options.only))
    if not chosen:
        raise ConfigError(f"--only {', '.join(options.only)} selects no technique of the {' or '.join(options.suites)} "
                          "suite")
    return chosen


def check_only(only: tuple[str, ...] | None, methods: tuple[str, ...] | None = None) -> None:
    if only is None:
        return
    known = technique_keys(methods)
    unknown = [k for k in only if k not in known]
    if unknown:
        raise ConfigError(f"--only: unknown technique {', '.join(unknown)}; choose from {', '.join(known)}")


def run_bench(options: BenchOptions, callback: Callable[[BenchEvent], None] | None = None) -> BenchReport:
    """Run the chosen suites; returns the report (write it with `hayai.bench.report.write_report`)."""
    from hayai.bench.bandwidth import measure_read_bandwidth
    from hayai.bench.energy import energy_sources, unavailable_reason
    from hayai.bench.hardware import describe
    from hayai.models.config import ModelConfig
    from hayai.models.loading import resolve
    from hayai.runtime import configure_threads, resolve_device

    started = time.perf_counter()
    run = _Run(options, callback)
    run.emit("stage", message="finding the model")
    directory, info, _ = resolve(options.model)
    model_dir = str(directory)
    data = load_bench_data(options.data)
    run.context["threads"] = configure_threads(options.threads)
    run.context["config"] = ModelConfig.from_file(directory / "config.json")
    from hayai.train.recipe import METHODS

    run.context["finetune_methods"] = tuple(METHODS)
    methods = run.context.get("finetune_methods")
    check_only(options.only, methods)
    options = replace(options, suites=suites_to_run(options, methods))
    run.options = options
    run.total = count_techniques(options, methods)
    run.emit("stage", message="measuring the memory read bandwidth")
    device = resolve_device(options.device)
    limit = measure_read_bandwidth(device)
    run.context["bandwidth"] = limit
    sources = energy_sources()
    environment = {
        "read bandwidth limit": limit.summary(),
        "energy": ", ".join(sources) if sources else f"unavailable ({unavailable_reason()})",
        "threads": run.context["threads"],
    }
    report = BenchReport(info.name, describe(), [], {
        "model path": model_dir, "data": data.source, "suites": ", ".join(options.suites), "quick": options.quick,
        "device": str(device), "quality tolerance": f"{options.tolerance:.0%}",
        **({"only": ", ".join(options.only)} if options.only else {})}, environment,
        datetime.datetime.now().isoformat(timespec="seconds"))
    with tempfile.TemporaryDirectory(prefix="hayai-bench-") as tmp:
        for name in options.suites:
            run.emit("stage", message=f"{name} suite")
            if name == "generate":
                report.suites.append(_generate(run, model_dir, data))
            else:
                report.suites.append(_finetune(run, model_dir, data, Path(tmp)))
    report.seconds = time.perf_counter() - started
    return report
