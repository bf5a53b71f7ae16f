"""`hayai sot`, `hayai batch` and `hayai cascade train|run`: LLM-call-level techniques over a local model or an
OpenAI-compatible server.

A cascade's stages are configured in a TOML or JSON file:

    exemplars_file = "shots.jsonl"        # optional: {"question", "answer"} lines (default: the bundled set)

    [prices]                              # per million tokens / per request, by model name
    "smollm2-135m-instruct" = { input = 0.05, output = 0.2 }

    [[stage]]
    name = "small"                        # names tie a trained strategy to its stages
    backend = "local"                     # "local" (a hayai model) or "openai" (any compatible server)
    model = "smollm2-135m-instruct"
    exemplars = 1                         # prompt adaptation: fewer exemplars, cheaper prompts

    [[stage]]
    name = "large"
    backend = "openai"
    base_url = "http://127.0.0.1:8000/v1"
    model = "gpt-4o-mini"
    exemplars = 8
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import typer

from hayai.cli.app import app, err, out
from hayai.cli.generate_cmd import DeviceOption, DtypeOption, ModelOption, ThreadsOption, load_llm
from hayai.errors import ConfigError

OpenAIURLOption = typer.Option(None, "--openai-url", help="Use an OpenAI-compatible server at this base URL "
                                                          "(e.g. http://127.0.0.1:8000/v1) instead of a local model.")
OpenAIModelOption = typer.Option(None, "--openai-model", help="Model name on the OpenAI-compatible server.")
PriceFileOption = typer.Option(None, "--prices", help="JSON/TOML price table {model: {input, output, request}} "
                                                      "(per million tokens / per request).")


def _backend(model: str | None, dtype: str, device: str, threads: int | None, openai_url: str | None,
             openai_model: str | None, prices: Path | None):
    from hayai.prompting.backends import LocalBackend, OpenAIBackend, PriceTable

    table = PriceTable.load(prices) if prices else None
    if openai_url or openai_model:
        if not openai_model:
            raise ConfigError("--openai-url needs --openai-model")
        return OpenAIBackend(openai_model, base_url=openai_url, price=table)
    llm = load_llm(model, dtype, device, threads)
    return LocalBackend.of(llm, price=table[llm.info.name] if table else None)


def _bundled_exemplars() -> list[tuple[str, str]]:
    """One exemplar per task of the bundled set, round-robin, from its train split."""
    from hayai.prompting.evalset import load_eval_set

    by_task: dict[str, list] = {}
    for item in load_eval_set("train"):
        by_task.setdefault(item.task, []).append(item)
    rounds = zip(*by_task.values(), strict=False)
    return [(i.question, i.answer) for group in rounds for i in group]


def _exemplars(path: Path | None) -> list[tuple[str, str]]:
    from hayai.prompting.evalset import read_jsonl

    if path is None:
        return _bundled_exemplars()
    return [(i.question, i.answer) for i in read_jsonl(path, need_answer=True)]


# ---------------------------------------------------------------------------------------------------------------
# hayai sot
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def sot(
    question: str = typer.Argument(..., help="The question."),
    router: str = typer.Option("none", "--router", help="none (always SoT), prompt (ask the model) or "
                                                        "classifier (sentence-embedding classifier)."),
    max_points: int = typer.Option(10, "--max-points", help="Expand at most this many skeleton points."),
    point_tokens: int = typer.Option(64, "--point-tokens", help="Maximum new tokens per point."),
    skeleton_tokens: int = typer.Option(96, "--skeleton-tokens", help="Maximum new tokens for the skeleton."),
    show_skeleton: bool = typer.Option(False, "--show-skeleton", help="Print the skeleton to stderr first."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No timing report on stderr."),
    model: str = ModelOption,
    openai_url: str = OpenAIURLOption,
    openai_model: str = OpenAIModelOption,
    prices: Path = PriceFileOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
) -> None:
    """Answer with Skeleton-of-Thought: a short skeleton first, then every point expanded in parallel."""
    from hayai.prompting.backends import GenParams
    from hayai.prompting.skeleton_of_thought import SkeletonOfThought
    from hayai.prompting.sot_router import EmbeddingRouter, PromptRouter

    if router not in ("none", "prompt", "classifier"):
        raise ConfigError(f"--router must be none, prompt or classifier, got {router!r}")
    backend = _backend(model, dtype, device, threads, openai_url, openai_model, prices)
    chosen = {"none": None, "prompt": lambda: PromptRouter(backend), "classifier": EmbeddingRouter.default}[router]
    engine = SkeletonOfThought(backend, router=chosen() if chosen else None, max_points=max_points,
                               skeleton_params=GenParams(max_tokens=skeleton_tokens, stop=("\n\n",)),
                               point_params=GenParams(max_tokens=point_tokens, stop=("\n\n",)))
    answer = engine(question)
    if show_skeleton and answer.points:
        err.print("\n".join(f"{i}. {p}" for i, p in answer.points), style="dim")
    out.print(answer.text, markup=False)
    if not quiet:
        if answer.used_sot:
            err.print(f"SoT: {len(answer.points)} points | skeleton {answer.skeleton_seconds:.2f} s | "
                      f"expansion {answer.expand_seconds:.2f} s | {answer.prompt_tokens} prompt + "
                      f"{answer.completion_tokens} completion tokens | cost {answer.cost:.6g}", style="dim")
        else:
            err.print("answered without SoT (routed away or no usable skeleton)", style="dim")


# ---------------------------------------------------------------------------------------------------------------
# hayai batch
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def batch(
    file: Path = typer.Argument(..., help="Questions: JSONL with a 'question' field (and optional 'answer'), "
                                          "or a text file with one question per line."),
    k: int = typer.Option(4, "--k", "-k", help="Questions per prompt."),
    exemplars: Path = typer.Option(None, "--exemplars", help="JSONL exemplars {question, answer} "
                                                             "(default: 5 from the bundled set)."),
    n_exemplars: int = typer.Option(5, "--n-exemplars", help="How many exemplars to use."),
    answer_tokens: int = typer.Option(16, "--answer-tokens", help="Token budget per answer."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No report on stderr."),
    model: str = ModelOption,
    openai_url: str = OpenAIURLOption,
    openai_model: str = OpenAIModelOption,
    prices: Path = PriceFileOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
) -> None:
    """Batch Prompting: answer K questions per prompt; print one JSON line {question, answer} per question."""
    from hayai.prompting.batch_prompting import batch_prompt
    from hayai.prompting.evalset import is_correct, read_jsonl

    items = read_jsonl(file)
    if not items:
        raise ConfigError(f"{file}: no questions")
    shots = _exemplars(exemplars)[:n_exemplars]
    backend = _backend(model, dtype, device, threads, openai_url, openai_model, prices)
    result = batch_prompt(backend, [i.question for i in items], shots, k, answer_tokens=answer_tokens)
    for item, answer in zip(items, result.answers, strict=True):
        sys.stdout.write(json.dumps({"question": item.question, "answer": answer}, ensure_ascii=False) + "\n")
    if not quiet:
        n = len(items)
        report = (f"{n} questions, K={k}: {result.prompt_tokens / n:.1f} prompt + {result.completion_tokens / n:.1f}"
                  f" completion tokens per question, {len(result.retried)} retried alone, cost {result.cost:.6g}")
        graded = [(i, a) for i, a in zip(items, result.answers, strict=True) if i.answers]
        if graded:
            right = sum(is_correct(a, i.answers) for i, a in graded)
            report += f", accuracy {right}/{len(graded)}"
        err.print(report, style="dim")


# ---------------------------------------------------------------------------------------------------------------
# hayai cascade
# ---------------------------------------------------------------------------------------------------------------

cascade_app = typer.Typer(help="FrugalGPT cascades: cheap stages first, a learned scorer decides when to stop.",
                          no_args_is_help=True)
app.add_typer(cascade_app, name="cascade")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the stage file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def build_stages(path: Path, dtype: str, device: str, threads: int | None, cache_path: Path | None):
    """Stages from a TOML/JSON stage file; local stages on the same model share one loaded copy."""
    from hayai.prompting.backends import GenParams, LocalBackend, OpenAIBackend, PriceTable
    from hayai.prompting.cache import CachedBackend, CompletionCache
    from hayai.prompting.frugal_cascade import Stage

    config = _read_config(path)
    prices = PriceTable.from_dict(config.get("prices", {}), f"{path} [prices]")
    shots = _exemplars(Path(config["exemplars_file"]) if "exemplars_file" in config else None)
    specs = config.get("stage")
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"{path}: define at least one [[stage]] with a name, backend and model")
    cache = CompletionCache(cache_path) if cache_path else None
    loaded: dict[tuple[str, str], Any] = {}
    stages = []
    for n, spec in enumerate(specs, 1):
        where = f"{path}, stage {n}"
        unknown = set(spec) - {"name", "backend", "model", "exemplars", "base_url", "api_key", "max_tokens",
                               "price", "chat", "dtype"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        if "model" not in spec or "name" not in spec:
            raise ConfigError(f"{where}: needs 'name' and 'model'")
        kind, name = spec.get("backend", "local"), spec["model"]
        price = PriceTable.from_dict({name: spec["price"]}, where)[name] if "price" in spec else \
            prices.prices.get(name)
        if kind == "local":
            key = (name, spec.get("dtype", dtype))
            if key not in loaded:
                loaded[key] = load_llm(name, key[1], device, threads)
            backend = LocalBackend.of(loaded[key], name=name, price=price)
        elif kind == "openai":
            backend = OpenAIBackend(name, base_url=spec.get("base_url"), api_key=spec.get("api_key"), price=price)
        else:
            raise ConfigError(f"{where}: backend must be 'local' or 'openai', got {kind!r}")
        if cache is not None:
            backend = CachedBackend(backend, cache)
        count = int(spec.get("exemplars", 0))
        if count > len(shots):
            raise ConfigError(f"{where}: asks for {count} exemplars but only {len(shots)} are available")
        stages.append(Stage(backend, shots[:count], GenParams(max_tokens=int(spec.get("max_tokens", 16)),
                                                              stop=("\n",)), bool(spec.get("chat", False)),
                            str(spec["name"])))
    return stages


StagesOption = typer.Option(..., "--stages", help="TOML/JSON file configuring the stages (see `hayai cascade --help`).")
CacheOption = typer.Option(None, "--cache", help="SQLite completion cache file (created if missing).")


@cascade_app.command("train")
def cascade_train(
    data: Path = typer.Option(..., "--data", help="Training questions with answers (JSONL)."),
    stages_file: Path = StagesOption,
    budget: float = typer.Option(..., "--budget", help="Average cost per question allowed, in price units."),
    output: Path = typer.Option(Path("cascade.json"), "--out", "-o", help="Where to write the strategy."),
    max_depth: int = typer.Option(3, "--max-depth", help="Longest chain of stages to consider."),
    cache: Path = CacheOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
) -> None:
    """Run every stage on the training data, fit answer scorers, search the chain and thresholds under the budget."""
    from hayai.cli.progress import progress_bar
    from hayai.prompting.evalset import read_jsonl
    from hayai.prompting.frugal_cascade import prepare_cascade

    items = read_jsonl(data, need_answer=True)
    stages = build_stages(stages_file, dtype, device, threads, cache)
    with progress_bar() as progress:
        training = prepare_cascade(stages, items, progress=lambda d, t: progress("running stages", d, t))
    strategy = training.strategy(budget, max_depth)
    strategy.save(output)
    for name, stats in strategy.stage_stats.items():
        err.print(f"  {name}: accuracy {stats['accuracy']:.3f}, mean cost {stats['mean_cost']:.6g}")
    err.print(f"chain {' -> '.join(strategy.chain)}, thresholds {[round(t, 3) for t in strategy.thresholds]}: "
              f"training accuracy {strategy.train_accuracy:.3f} at mean cost {strategy.train_cost:.6g} "
              f"(budget {budget:g}); saved {output}")


@cascade_app.command("run")
def cascade_run(
    question: str = typer.Argument(None, help="A question (or use --file)."),
    file: Path = typer.Option(None, "--file", help="Questions: JSONL or one per line."),
    strategy_file: Path = typer.Option(Path("cascade.json"), "--strategy", help="Strategy from `cascade train`."),
    stages_file: Path = StagesOption,
    cache: Path = CacheOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No report on stderr."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    threads: int = ThreadsOption,
) -> None:
    """Answer through a trained cascade; one JSON line {question, answer, stage, cost} per question."""
    from hayai.prompting.evalset import is_correct, read_jsonl
    from hayai.prompting.frugal_cascade import Cascade, CascadeStrategy

    if (question is None) == (file is None):
        raise ConfigError("give a question or --file, not both")
    items = read_jsonl(file) if file else None
    questions = [i.question for i in items] if items else [question]
    strategy = CascadeStrategy.load(strategy_file)
    cascade = Cascade.from_strategy(strategy, build_stages(stages_file, dtype, device, threads, cache))
    answers = cascade.run(questions)
    for a in answers:
        sys.stdout.write(json.dumps({"question": a.question, "answer": a.answer, "stage": a.stage_name,
                                     "cost": a.cost}, ensure_ascii=False) + "\n")
    if not quiet:
        total = sum(a.cost for a in answers)
        report = f"{len(answers)} questions, total cost {total:.6g} ({total / len(answers):.6g} per question)"
        if items and all(i.answers for i in items):
            right = sum(is_correct(a.answer, i.answers) for a, i in zip(answers, items, strict=True))
            report += f", accuracy {right}/{len(items)}"
        err.print(report, style="dim")
