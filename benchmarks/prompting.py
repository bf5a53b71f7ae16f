"""LLM-call-level techniques on the default model (SmolLM2-135M-Instruct) and the bundled evaluation sets.

    .venv/bin/python benchmarks/prompting.py [--quick] [--sections sot,batch,cascade,fid] [--dtype fp32]

Sections (each against its anchor, measured in the same run):

sot      Skeleton-of-Thought end-to-end latency (skeleton + all points expanded as one local batch) vs normal
         generation of an answer of the same length (greedy, batch 1, end-of-sequence ignored so both produce
         the same number of tokens). Target: SoT <= 0.5x. Questions: bundled SoT questions labelled suits_sot.
batch    Batch Prompting at K = 1, 2, 4, 6 (6 exemplars, one per task plus one, batched the same way) on the test
         split: prompt + completion tokens per question, wall time per question (every prompt of a K in one local
         decoding batch), accuracy. Anchor: K = 1. Target at K = 6: <= 0.3x tokens per question, accuracy drop
         <= 2 points.
cascade  FrugalGPT cascade cost vs accuracy on the test split, trained on the train split, against each single
         stage. Stages are the default model in three configurations (the only model in the store; what matters
         for the technique is that stages differ in price and in which questions they get right):
           int4-e1   int4 weight-only quantized, 1 exemplar (cheap weights, cheap prompt)
           fp32-e3   fp32, 3 exemplars
           fp32-e10  fp32, 10 exemplars (the most accurate single stage on this set, and the dearest)
         Price per million tokens = the GB of weights one decode step reads (output), a quarter of that for
         prompt tokens (prefill is batched and compute-bound; API price lists use similar ratios), so cost
         tracks tokens x model size. Target: the best single stage's accuracy at <= 0.3x its cost. Writes
         prompting_cascade.png.
fid      Time per query of rank classification (sentiment test questions, options positive/negative) with 16
         and 32 demonstrations: concatenation ICL recomputed per query (the anchor), concatenation with the
         demonstrations' KV cached once (prefix caching), and FiD-style cached parallel demonstrations
         (`CachedDemonstrations`), queries scored 8 per forward pass by every method; accuracy of each. Also
         encoder-decoder FiD-ICL vs concatenation on a T5 with t5-small's shape and random weights (time only:
         no pretrained T5 is available offline). Target: >= 5x.

Writes benchmarks/results/prompting.json and the PNGs. Numbers depend on the machine being quiet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import hayai
from hayai.bench.hardware import describe, one_line
from hayai.models.llama import weight_bytes_read_per_token
from hayai.prompting.backends import GenParams, LocalBackend, Price
from hayai.prompting.batch_prompting import batch_prompt
from hayai.prompting.cache import CachedBackend, CompletionCache
from hayai.prompting.evalset import QAItem, accuracy, is_correct, load_eval_set, load_sot_questions
from hayai.prompting.fid_icl import CachedDemonstrations, FiDICL, concatenated_scores_many
from hayai.prompting.frugal_cascade import Cascade, Stage, prepare_cascade
from hayai.prompting.skeleton_of_thought import SkeletonOfThought
from hayai.runtime import configure_threads

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("capitals", "arithmetic", "sentiment", "opposites", "facts")
QUERY_BATCH = 8  # FiD section: queries scored together in one forward pass, for every method alike


def round_robin_exemplars(n: int) -> list[tuple[str, str]]:
    """n exemplars from the train split, cycling through the tasks."""
    by_task = {t: [i for i in load_eval_set("train", [t])] for t in TASKS}
    out, k = [], 0
    while len(out) < n:
        task = TASKS[k % len(TASKS)]
        item = by_task[task][k // len(TASKS)]
        out.append((item.question, item.answer))
        k += 1
    return out


def subset(items: list[QAItem], n: int | None) -> list[QAItem]:
    """n items spread over the tasks (every len/n-th), or all."""
    if n is None or n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Skeleton-of-Thought
# ---------------------------------------------------------------------------------------------------------------


def bench_sot(llm, quick: bool) -> dict:
    questions = [i.question for i in load_sot_questions("test") if i.extra["suits_sot"]][: 2 if quick else 8]
    backend = LocalBackend.of(llm)
    sot = SkeletonOfThought(backend, max_points=5 if quick else 8,
                            point_params=GenParams(max_tokens=24 if quick else 48, stop=("\n\n",)))
    sot("Warm up: what are good habits?")
    rows = []
    for q in questions:
        t0 = time.perf_counter()
        answer = sot(q)
        sot_seconds = time.perf_counter() - t0
        n_tokens = max(1, len(llm.tokenizer.encode(answer.text, add_special_tokens=False)))
        ids = llm.prompt_ids(q)
        t0 = time.perf_counter()
        llm.engine.generate(ids, max_new_tokens=n_tokens, stop_token_ids=set())
        normal_seconds = time.perf_counter() - t0
        rows.append({"question": q, "used_sot": answer.used_sot, "points": len(answer.points),
                     "answer_tokens": n_tokens, "sot_seconds": sot_seconds, "skeleton_seconds": answer.skeleton_seconds,
                     "expand_seconds": answer.expand_seconds, "normal_seconds": normal_seconds,
                     "ratio": sot_seconds / normal_seconds,
                     "sot_total_tokens": answer.prompt_tokens + answer.completion_tokens})
        print(f"  sot {sot_seconds:6.2f}s (skeleton {answer.skeleton_seconds:.2f} + expand "
              f"{answer.expand_seconds:.2f}, {len(answer.points)} points) vs normal {normal_seconds:6.2f}s for "
              f"{n_tokens} tokens: {sot_seconds / normal_seconds:.2f}x  | {q[:50]}", flush=True)
    used = [r for r in rows if r["used_sot"]]
    summary = {"rows": rows, "questions": len(rows), "used_sot": len(used),
               "median_ratio": statistics.median(r["ratio"] for r in used) if used else None,
               "target": "<= 0.5x"}
    print(f"SoT: median latency ratio {summary['median_ratio']} over {len(used)} SoT answers (target <= 0.5x)")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Batch Prompting
# ---------------------------------------------------------------------------------------------------------------


def bench_batch(llm, quick: bool, plot_path: Path) -> dict:
    items = subset(load_eval_set("test"), 12 if quick else None)
    exemplars = round_robin_exemplars(6)
    backend = LocalBackend.of(llm, max_batch=32)
    questions = [i.question for i in items]
    batch_prompt(backend, questions[:2], exemplars, 2)  # warm-up
    rows = []
    for k in (1, 2, 4, 6):
        t0 = time.perf_counter()
        out = batch_prompt(backend, questions, exemplars, k, answer_tokens=12)
        seconds = time.perf_counter() - t0
        n = len(items)
        row = {"k": k, "tokens_per_question": (out.prompt_tokens + out.completion_tokens) / n,
               "prompt_tokens_per_question": out.prompt_tokens / n,
               "completion_tokens_per_question": out.completion_tokens / n,
               "seconds_per_question": seconds / n, "accuracy": accuracy(out.answers, items),
               "retried": len(out.retried)}
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["token_ratio"] = r["tokens_per_question"] / base["tokens_per_question"]
        r["time_ratio"] = r["seconds_per_question"] / base["seconds_per_question"]
        r["accuracy_drop_points"] = 100 * (base["accuracy"] - r["accuracy"])
        print(f"  K={r['k']}: {r['tokens_per_question']:7.1f} tok/q ({r['token_ratio']:.2f}x), "
              f"{r['seconds_per_question'] * 1000:8.1f} ms/q ({r['time_ratio']:.2f}x), accuracy {r['accuracy']:.3f} "
              f"(drop {r['accuracy_drop_points']:+.1f} pts), {r['retried']} retried", flush=True)
    plot_batch(rows, plot_path)
    return {"questions": len(items), "exemplars": len(exemplars), "rows": rows,
            "target": "K=6: <= 0.3x tokens/question, accuracy drop <= 2 points"}


def plot_batch(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, left = plt.subplots(figsize=(6.4, 4.2))
    left.plot(ks, [r["token_ratio"] for r in rows], "o-", label="tokens / question (vs K=1)")
    left.plot(ks, [r["time_ratio"] for r in rows], "s--", label="wall time / question (vs K=1)")
    left.set_xlabel("questions per prompt (K)")
    left.set_ylabel("ratio to K = 1")
    left.set_xticks(ks)
    right = left.twinx()
    right.plot(ks, [r["accuracy"] for r in rows], "^:", color="tab:green", label="accuracy")
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1)
    lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(lines, labels, loc="upper center", fontsize=8)
    left.set_title("Batch Prompting on SmolLM2-135M (bundled test split)")
    left.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# FrugalGPT cascade
# ---------------------------------------------------------------------------------------------------------------


def price_for(model) -> Price:
    """Output price per million tokens = GB of weights read per decode step; prompt tokens a quarter of that."""
    gb = weight_bytes_read_per_token(model) / 1e9
    return Price(input=gb / 4, output=gb)


def bench_cascade(llm, dtype: str, quick: bool, plot_path: Path) -> dict:

    small = hayai.load(quant="int4")  # activations in the dtype the int4 kernel is fast in
    cache = CompletionCache()
    configs = [("int4-e1", small, 1), ("fp32-e3", llm, 3), ("fp32-e10", llm, 10)]
    exemplars = round_robin_exemplars(10)
    exemplar_questions = {q for q, _ in exemplars}
    stages = [Stage(CachedBackend(LocalBackend.of(m, name=name, price=price_for(m.model)), cache),
                    exemplars[:n], name=name) for name, m, n in configs]
    train = [i for i in load_eval_set("train") if i.question not in exemplar_questions]
    train, test = subset(train, 20 if quick else None), subset(load_eval_set("test"), 20 if quick else None)
    t0 = time.perf_counter()
    training = prepare_cascade(stages, train, progress=lambda d, t: print(f"  trained stage {d}/{t}", flush=True))
    print(f"  training took {time.perf_counter() - t0:.1f}s")
    questions = [i.question for i in test]
    singles = []
    for stage in stages:
        results = stage.answer(questions)
        singles.append({"stage": stage.name, "accuracy": accuracy([r.text for r in results], test),
                        "mean_cost": statistics.fmean(r.cost for r in results)})
        print(f"  single {stage.name}: accuracy {singles[-1]['accuracy']:.3f}, mean cost "
              f"{singles[-1]['mean_cost']:.3g}")
    lo = min(s["mean_cost"] for s in singles)
    hi = max(s["mean_cost"] for s in singles) * 1.5
    curve = []
    for f in torch.linspace(0, 1, 8 if quick else 16).tolist():
        budget = lo * (hi / lo) ** f
        try:
            strategy = training.strategy(budget)
        except hayai.errors.HayaiError:
            continue
        cascade = Cascade.from_strategy(strategy, stages)
        answers = cascade.run(questions)
        acc = sum(is_correct(a.answer, i.answers) for a, i in zip(answers, test, strict=True)) / len(test)
        curve.append({"budget": budget, "chain": strategy.chain, "thresholds": strategy.thresholds,
                      "accuracy": acc, "mean_cost": statistics.fmean(a.cost for a in answers),
                      "train_accuracy": strategy.train_accuracy, "train_cost": strategy.train_cost})
        print(f"  budget {budget:.3g}: {' -> '.join(strategy.chain)} accuracy {acc:.3f} at mean cost "
              f"{curve[-1]['mean_cost']:.3g}", flush=True)
    best = max(singles, key=lambda s: (s["accuracy"], -s["mean_cost"]))
    matching = [c for c in curve if c["accuracy"] >= best["accuracy"]]
    cheapest_match = min(matching, key=lambda c: c["mean_cost"]) if matching else None
    ratio = cheapest_match["mean_cost"] / best["mean_cost"] if cheapest_match else None
    print(f"cascade: best single {best['stage']} {best['accuracy']:.3f} at {best['mean_cost']:.3g}; cascade matches it "
          f"at {ratio if ratio is None else round(ratio, 3)}x its cost (target <= 0.3x)")
    plot_cascade(singles, curve, plot_path)
    return {"train_questions": len(train), "test_questions": len(test), "singles": singles, "curve": curve,
            "best_single": best["stage"], "cost_ratio_at_best_single_accuracy": ratio, "target": "<= 0.3x",
            "stages": {name: {"exemplars": n, "price_per_million": vars(price_for(m.model))}
                       for name, m, n in configs}}


def plot_cascade(singles: list[dict], curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = sorted(curve, key=lambda c: c["mean_cost"])
    ax.plot([c["mean_cost"] for c in points], [c["accuracy"] for c in points], "o-", label="FrugalGPT cascade")
    for s in singles:
        ax.scatter([s["mean_cost"]], [s["accuracy"]], marker="s", s=60, zorder=3)
        ax.annotate(s["stage"], (s["mean_cost"], s["accuracy"]), textcoords="offset points", xytext=(6, -12))
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per question (price units)")
    ax.set_ylabel("accuracy (bundled test split)")
    ax.set_title("Cascade vs single stages (SmolLM2-135M configurations)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# FiD-ICL / cached demonstrations
# ---------------------------------------------------------------------------------------------------------------


def per_query_seconds(fn, queries: list) -> tuple[float, list]:
    """Mean seconds per call (after one warm-up call) and the outputs."""
    fn(queries[0])
    t0 = time.perf_counter()
    outputs = [fn(q) for q in queries]
    return (time.perf_counter() - t0) / len(queries), outputs


def bench_fid(llm, quick: bool) -> dict:
    tok = llm.tokenizer
    model = llm.model
    train = [i for i in load_eval_set("train")]
    test = subset(load_eval_set("test", ["sentiment"]), 4 if quick else 30)
    options = [tok.encode(" positive", add_special_tokens=False), tok.encode(" negative", add_special_tokens=False)]
    rows = []
    for k in (16, 32):
        demos_items = subset(train, k)
        demos = [tok.encode(f"Q: {i.question}\nA: {i.answer}\n\n", add_special_tokens=False) for i in demos_items]
        queries = [tok.encode(f"Q: {i.question}\nA:", add_special_tokens=False) for i in test]
        row = {"demonstrations": k, "demo_tokens": sum(map(len, demos))}
        t0 = time.perf_counter()
        prefix = CachedDemonstrations(model, [[t for d in demos for t in d]])  # prefix caching: exact concat ICL
        prefix_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        parallel = CachedDemonstrations(model, demos)  # FiD-style: each demonstration cached on its own
        parallel_setup = time.perf_counter() - t0
        scorers = {  # each scores a batch of queries [n, options]
            "concatenated": lambda qs, demos=demos: concatenated_scores_many(model, demos, qs, options),  # anchor
            "prefix_cached": lambda qs, prefix=prefix: prefix.score_many(qs, options),
            "parallel_cached": lambda qs, parallel=parallel: parallel.score_many(qs, options),
        }
        labels = torch.tensor([0 if i.answer == "positive" else 1 for i in test])
        batches = [queries[i:i + QUERY_BATCH] for i in range(0, len(queries), QUERY_BATCH)]
        seconds, acc = {}, {}
        for name, fn in scorers.items():
            per_batch, scores = per_query_seconds(fn, batches)
            seconds[name] = per_batch * len(batches) / len(queries)
            acc[name] = float((torch.cat(scores).argmin(1) == labels).float().mean())
        concat, prefixed, fid = seconds["concatenated"], seconds["prefix_cached"], seconds["parallel_cached"]
        row.update({"concatenated_s": concat, "prefix_cached_s": prefixed, "parallel_cached_s": fid,
                    "prefix_setup_s": prefix_setup, "parallel_setup_s": parallel_setup,
                    "speedup_parallel": concat / fid, "speedup_prefix": concat / prefixed, "accuracy": acc})
        print(f"  {k} demos ({row['demo_tokens']} tokens): concatenated {concat * 1000:.1f} ms/query, prefix-cached "
              f"{prefixed * 1000:.1f} ({concat / prefixed:.1f}x), parallel-cached (FiD) {fid * 1000:.1f} "
              f"({concat / fid:.1f}x); accuracy {acc}", flush=True)
        rows.append(row)
    t5_rows = bench_fid_t5(quick)
    return {"decoder_only": rows, "encoder_decoder_random_t5": t5_rows, "target": ">= 5x"}


def bench_fid_t5(quick: bool) -> list[dict]:
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    fid = FiDICL(transformers.T5ForConditionalGeneration(config).eval())
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(2, 32000, (24,), generator=g).tolist() for _ in range(3 if quick else 10)]
    options = [[100, 1], [200, 1]]
    rows = []
    for k in (16, 32):
        demos = [torch.randint(2, 32000, (40,), generator=g).tolist() for _ in range(k)]
        concat, _ = per_query_seconds(lambda q, demos=demos: fid.score_concatenated(demos, q, options), queries)
        t0 = time.perf_counter()
        memory = fid.encode_demonstrations(demos)
        setup = time.perf_counter() - t0
        fused, _ = per_query_seconds(lambda q, memory=memory: fid.score(memory, q, options), queries)
        rows.append({"demonstrations": k, "concatenated_s": concat, "fid_s": fused, "fid_setup_s": setup,
                     "speedup": concat / fused})
        print(f"  T5 (t5-small shape, random) {k} demos: concatenated {concat * 1000:.1f} ms/query, FiD "
              f"{fused * 1000:.1f} ms/query ({concat / fused:.1f}x)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few questions per section, to check it runs")
    parser.add_argument("--sections", default="sot,batch,cascade,fid")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    sections = args.sections.split(",")
    configure_threads()
    info = describe()
    print(f"hardware: {one_line(info)}")
    llm = hayai.load(dtype=args.dtype)
    RESULTS.mkdir(exist_ok=True)
    out: dict = {"hardware": info, "model": llm.info.name, "dtype": args.dtype, "quick": args.quick,
                 "command": "python benchmarks/prompting.py " + " ".join(sys.argv[1:])}
    if "sot" in sections:
        print("== Skeleton-of-Thought vs normal generation")
        out["sot"] = bench_sot(llm, args.quick)
    if "batch" in sections:
        print("== Batch Prompting")
        out["batch"] = bench_batch(llm, args.quick, RESULTS / "prompting_batch.png")
    if "cascade" in sections:
        print("== FrugalGPT cascade")
        out["cascade"] = bench_cascade(llm, args.dtype, args.quick, RESULTS / "prompting_cascade.png")
    if "fid" in sections:
        print("== FiD-ICL / cached demonstrations vs concatenated ICL")
        out["fid"] = bench_fid(llm, args.quick)
    (RESULTS / "prompting.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'prompting.json'}")


if __name__ == "__main__":
    main()
