"""hayai eager decoding vs HF transformers `generate`, same weights, same dtype, same threads, same run.

    .venv/bin/python benchmarks/generate.py [--dtypes fp32,bf16] [--new-tokens 128] [--quick]

For each prompt of benchmarks/prompts.py (chat-formatted), both systems decode greedily for exactly
--new-tokens tokens (end-of-sequence ignored, so both do the same amount of work). Decode tokens/s counts the
tokens after the first over the time from the first token to the last; prefill is reported apart. The weights
are the default model's, loaded by hayai from its store and by transformers from the same directory (a hayai
store entry is a valid HF checkpoint). hayai's achieved weight bandwidth is also given as a fraction of the
measured read-bandwidth limit (`hayai.bench.bandwidth`). Prints the table, the ratio, the hardware, and writes
benchmarks/results/generate.json and generate.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import prompts as benchmark_prompts

import hayai
from hayai.bench.bandwidth import achieved_fraction, measure_read_bandwidth
from hayai.bench.hardware import describe, one_line
from hayai.models.llama import weight_bytes_read_per_token
from hayai.runtime import configure_threads

RESULTS = Path(__file__).resolve().parent / "results"


class _Timestamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model, ids: list[int], new_tokens: int, pad_id: int) -> tuple[list[int], float, float]:
    streamer = _Timestamps()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, streamer=streamer, pad_token_id=pad_id,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    tokens = out[0, len(ids):].tolist()
    return tokens, streamer.times[0] - start, streamer.times[-1] - streamer.times[0]


def run_hayai(llm, ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    completion = llm.engine.generate(ids, max_new_tokens=new_tokens, stop_token_ids=set())
    return completion.token_ids, completion.stats.prefill_seconds, completion.stats.decode_seconds


def agree_until_eos(a: list[int], b: list[int], eos: frozenset[int]) -> bool:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return False
        if x in eos:
            return True
    return True


def bench_dtype(dtype_name: str, new_tokens: int, prompt_set: list[dict]) -> dict:
    import transformers

    llm = hayai.load(dtype=dtype_name)
    dtype = llm.model.dtype
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm.info.path, dtype=dtype).eval()
    ids_list = [llm.prompt_ids(p["prompt"]) for p in prompt_set]
    pad = llm.tokenizer.pad_token_id
    run_hayai(llm, ids_list[0], 8)  # warm-up both
    run_hf(hf, ids_list[0], 8, pad)
    rows = []
    for p, ids in zip(prompt_set, ids_list, strict=True):
        h_tokens, h_prefill, h_decode = run_hayai(llm, ids, new_tokens)
        f_tokens, f_prefill, f_decode = run_hf(hf, ids, new_tokens, pad)
        rows.append({
            "prompt": p["name"], "kind": p["kind"], "prompt_tokens": len(ids),
            "hayai_decode_tps": (new_tokens - 1) / h_decode, "hf_decode_tps": (new_tokens - 1) / f_decode,
            "hayai_prefill_tps": len(ids) / h_prefill, "hf_prefill_tps": len(ids) / f_prefill,
            "same_tokens_until_eos": agree_until_eos(h_tokens, f_tokens, llm.tokenizer.eos_token_ids),
        })
        print(f"  {dtype_name} {p['name']:<10} hayai {rows[-1]['hayai_decode_tps']:6.1f} tok/s   "
              f"HF {rows[-1]['hf_decode_tps']:6.1f} tok/s", flush=True)
    bytes_per_token = weight_bytes_read_per_token(llm.model)
    hayai_tps = statistics.mean(r["hayai_decode_tps"] for r in rows)
    hf_tps = statistics.mean(r["hf_decode_tps"] for r in rows)
    return {
        "dtype": dtype_name, "rows": rows, "hayai_decode_tps": hayai_tps, "hf_decode_tps": hf_tps,
        "ratio": hayai_tps / hf_tps, "weight_bytes_per_token": bytes_per_token,
        "hayai_bandwidth_gbs": hayai_tps * bytes_per_token / 1e9, "hf_bandwidth_gbs": hf_tps * bytes_per_token / 1e9,
        "identical_outputs": sum(r["same_tokens_until_eos"] for r in rows),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [r["dtype"] for r in results]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [r["hf_decode_tps"] for r in results], width=0.4, label="HF transformers")
    ax.bar([i + 0.2 for i in x], [r["hayai_decode_tps"] for r in results], width=0.4, label="hayai (eager)")
    for i, r in enumerate(results):
        ax.text(i + 0.2, r["hayai_decode_tps"], f"{r['ratio']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("SmolLM2-135M greedy decode, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 32 tokens")
    args = parser.parse_args()
    prompt_set = benchmark_prompts()
    new_tokens = args.new_tokens
    if args.quick:
        prompt_set, new_tokens = prompt_set[::4], 32
    configure_threads()
    info = describe()
    print(f"hardware: {one_line(info)}")
    limit = measure_read_bandwidth()  # what reading weights from memory allows (hayai.bench.bandwidth)
    print(f"read bandwidth limit: {limit.summary()}")
    print(f"{len(prompt_set)} prompts, greedy, {new_tokens} new tokens, batch 1")
    results = [bench_dtype(d, new_tokens, prompt_set) for d in args.dtypes.split(",")]
    for r in results:
        r["hayai_bandwidth_fraction"] = achieved_fraction(r["hayai_bandwidth_gbs"] * 1e9, limit)
    print()
    print(f"{'dtype':<6} {'hayai tok/s':>12} {'HF tok/s':>10} {'ratio':>7} {'hayai GB/s':>11} {'of limit':>9} "
          f"{'identical':>10}")
    for r in results:
        print(f"{r['dtype']:<6} {r['hayai_decode_tps']:12.1f} {r['hf_decode_tps']:10.1f} {r['ratio']:6.2f}x "
              f"{r['hayai_bandwidth_gbs']:11.1f} {r['hayai_bandwidth_fraction']:9.0%} "
              f"{r['identical_outputs']:>6}/{len(r['rows'])}")
    RESULTS.mkdir(exist_ok=True)
    out = {"hardware": info, "read_bandwidth_limit": limit.as_dict(), "new_tokens": new_tokens, "results": results,
           "command": "python benchmarks/generate.py " + " ".join(sys.argv[1:])}
    (RESULTS / "generate.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "generate.png")
    print(f"wrote {RESULTS / 'generate.json'} and generate.png")


if __name__ == "__main__":
    main()
