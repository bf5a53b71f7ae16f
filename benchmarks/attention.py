"""Attention benchmarks: peak memory and time of attention kernels on CPU.

Section "kernels" (the only one so far): naive attention (softmax(Q Kᵀ)V with the T x S scores materialised),
PyTorch SDPA (the anchor: its fused CPU kernel) and hayai's blocked FlashAttention-2 reference
(`hayai.attention.BlockedFlashAttention`), causal, fp32, at sequence lengths 1k-16k, forward alone and
forward + backward. The shape is one attention layer of the default model (SmolLM2-135M): batch 1, 9 query
heads sharing 3 key/value heads, head_dim 64.

How peak memory is measured. tracemalloc does not see torch's allocations, and torch has no CPU peak-memory
counter, so each configuration runs in a fresh Python process that builds its inputs, warms the kernel up on
a short sequence, and then, just before the measured call, resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs` sets VmHWM to the current RSS). The number reported is VmHWM after the call
minus RSS before it: every byte the call touched at its worst moment (outputs, saved activations, gradients,
temporaries, allocator slack), excluding the inputs. Where clear_refs is unavailable it falls back to
ru_maxrss, which can only over-report (printed as "(upper bound)"). Each configuration runs alone, so other
processes do not disturb the number, but the machine should be otherwise quiet for the times.

Naive attention needs about 2 · H · T · S · 4 bytes forward (scores and probabilities) and 3 · H · T · S · 4
with backward; configurations whose estimate exceeds --cap-gb are skipped and marked, and the ratio for them
is taken against the size of a single fp32 score tensor, a lower bound on naive's peak (so the printed ratio
is an upper bound on the true one).

Targets: blocked peak memory at 16k <= 0.1x naive; blocked memory grows linearly with the sequence length
(growth exponent between the two longest lengths <= 1.2; naive grows with exponent 2).

Usage:
    python benchmarks/attention.py [--quick] [--cap-gb 8] [--plot benchmarks/results/attention.png]

Section "longlora": one LoRA training step (forward + backward, r=8 on all linear layers, activation
checkpointing so 8k tokens fit) of the default model on one random sequence of --longlora-length tokens (8192),
with full causal attention (SDPA) vs LongLoRA's shifted sparse attention (S²-Attn, groups of T/4, half of the
heads shifted; `hayai finetune --method longlora`). Each runs in a fresh process (`hayai.bench.memory`): a
warm-up step, then the median of --longlora-steps timed steps, and the process's peak RSS. Target: S²-Attn step
time <= 0.5x full attention at 8k.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 9, 3, 64
LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024, 2048, 4096]
METHODS = ["naive", "sdpa", "blocked"]
MODES = ["fwd", "fwd+bwd"]
WARMUP_LENGTH = 256
GB = 1024**3
MB = 1024**2


# ---------------------------------------------------------------------------------------------------------------
# Measurement inside a fresh process
# ---------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Set the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(exact: bool) -> int:
    if exact:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _attention_fn(method: str) -> Callable:
    import torch

    from hayai.attention import BlockedFlashAttention, SDPAttention
    from hayai.attention.sdpa import repeat_kv

    if method == "sdpa":
        return SDPAttention()
    if method == "blocked":
        return BlockedFlashAttention()

    def naive(q, k, v, *, causal):  # materialises [B, H, T, S] scores and probabilities
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, T, S]
        if causal:
            t, s = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(s - t + 1), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    return naive


def _inputs(length: int, backward: bool, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=gen)
    k = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, generator=gen)
    v = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, generator=gen)
    return [x.requires_grad_(backward) for x in (q, k, v)]


def _call(fn: Callable, q, k, v, backward: bool) -> None:
    out = fn(q, k, v, causal=True)
    if backward:
        out.sum().backward()
        for x in (q, k, v):
            x.grad = None


def worker(method: str, length: int, mode: str, repeats: int, time_budget: float, threads: int) -> dict:
    """Runs in its own process: peak-memory increase of one call, then the median time of up to `repeats`."""
    import torch

    torch.set_num_threads(threads)
    fn = _attention_fn(method)
    backward = mode == "fwd+bwd"
    _call(fn, *_inputs(WARMUP_LENGTH, backward), backward)  # lazy initialisation (thread pools, kernels)
    q, k, v = _inputs(length, backward)
    exact = _reset_peak()
    rss_before = _rss_bytes()
    start = time.perf_counter()
    _call(fn, q, k, v, backward)
    first = time.perf_counter() - start
    peak = _peak_bytes(exact) - rss_before
    times, spent = [], first
    while len(times) < repeats and spent < time_budget:
        start = time.perf_counter()
        _call(fn, q, k, v, backward)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    times = times or [first]
    return {"peak_bytes": peak, "exact": exact, "seconds": sorted(times)[len(times) // 2]}


# ---------------------------------------------------------------------------------------------------------------
# Section "kernels": naive vs SDPA vs blocked
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    length: int
    mode: str
    peak_bytes: int | None = None
    seconds: float | None = None
    exact: bool = True
    status: str = "ok"  # ok | skipped | failed
    note: str = ""


def naive_estimate_bytes(length: int, mode: str) -> int:
    """Naive attention's peak: 2 (forward) or 3 (with backward) fp32 [B, H, T, T] tensors."""
    arrays = 2 if mode == "fwd" else 3
    return arrays * BATCH * HEADS * length * length * 4


def naive_lower_bound_bytes(length: int) -> int:
    """One fp32 score tensor: naive attention cannot peak below this."""
    return BATCH * HEADS * length * length * 4


def run_config(method: str, length: int, mode: str, args: argparse.Namespace) -> Result:
    if method == "naive" and naive_estimate_bytes(length, mode) > args.cap_gb * GB:
        est = naive_estimate_bytes(length, mode) / GB
        return Result(method, length, mode, status="skipped", note=f"est. {est:.1f} GB > cap {args.cap_gb} GB")
    spec = json.dumps({"method": method, "length": length, "mode": mode, "repeats": args.repeats,
                       "time_budget": args.time_budget, "threads": args.threads})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        return Result(method, length, mode, status="failed", note=reason[:80])
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(method, length, mode, peak_bytes=data["peak_bytes"], seconds=data["seconds"],
                  exact=data["exact"])


def _fmt_mem(r: Result) -> str:
    if r.status != "ok":
        return r.status
    text = f"{r.peak_bytes / MB:,.1f} MB"
    return text if r.exact else text + " (upper bound)"


def _ratio_to_naive(r: Result, naive: Result) -> str:
    if r.status != "ok" or r.peak_bytes is None:
        return "-"
    if naive.status == "ok" and naive.peak_bytes:
        return f"{r.peak_bytes / naive.peak_bytes:.3f}x"
    return f"<= {r.peak_bytes / naive_lower_bound_bytes(r.length):.3f}x"


def _time_ratio(r: Result, naive: Result) -> str:
    if r.status != "ok" or naive.status != "ok" or not naive.seconds:
        return "-"
    return f"{r.seconds / naive.seconds:.2f}x"


def growth_exponent(results: list[Result], method: str, mode: str) -> float | None:
    """log2 of the memory ratio between the two longest measured lengths that double (1 = linear, 2 = quadratic)."""
    ok = sorted((r for r in results if r.method == method and r.mode == mode and r.status == "ok"),
                key=lambda r: r.length)
    if len(ok) < 2 or not ok[-2].peak_bytes or ok[-2].peak_bytes <= 0 or ok[-1].peak_bytes <= 0:
        return None
    return math.log(ok[-1].peak_bytes / ok[-2].peak_bytes) / math.log(ok[-1].length / ok[-2].length)


def print_table(results: list[Result], out: Callable[[str], None] = print) -> None:
    by_key = {(r.method, r.length, r.mode): r for r in results}
    header = f"{'mode':8} {'length':>6} {'method':8} {'peak memory':>18} {'vs naive':>10} {'time':>10} {'vs naive':>9}"
    for mode in MODES:
        out(header)
        out("-" * len(header))
        for length in sorted({r.length for r in results}):
            naive = by_key.get(("naive", length, mode), Result("naive", length, mode, status="skipped"))
            for method in METHODS:
                r = by_key.get((method, length, mode))
                if r is None:
                    continue
                secs = f"{r.seconds:.3f} s" if r.seconds is not None else "-"
                note = f"  ({r.note})" if r.note else ""
                out(f"{mode:8} {length:>6} {method:8} {_fmt_mem(r):>18} {_ratio_to_naive(r, naive):>10} "
                    f"{secs:>10} {_time_ratio(r, naive):>9}{note}")
        out("")


def check_targets(results: list[Result], out: Callable[[str], None] = print) -> bool:
    ok = True
    longest = max(r.length for r in results)
    for mode in MODES:
        blocked = next((r for r in results if (r.method, r.length, r.mode) == ("blocked", longest, mode)), None)
        naive = next((r for r in results if (r.method, r.length, r.mode) == ("naive", longest, mode)), None)
        if blocked and blocked.status == "ok":
            if naive and naive.status == "ok":
                ratio, against = blocked.peak_bytes / naive.peak_bytes, "naive measured"
            else:
                ratio, against = blocked.peak_bytes / naive_lower_bound_bytes(longest), "naive lower bound"
            passed = ratio <= 0.1
            ok &= passed
            out(f"target [{mode}] blocked peak at {longest} <= 0.1x naive: {ratio:.4f}x ({against}) "
                f"{'PASS' if passed else 'FAIL'}")
        exponent = growth_exponent(results, "blocked", mode)
        if exponent is not None:
            passed = exponent <= 1.2
            ok &= passed
            out(f"target [{mode}] blocked memory grows linearly: exponent {exponent:.2f} "
                f"{'PASS' if passed else 'FAIL'}")
        for method in ("naive", "sdpa"):
            e = growth_exponent(results, method, mode)
            if e is not None:
                out(f"         [{mode}] {method} growth exponent {e:.2f}")
    return ok


def plot(results: list[Result], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, MODES, strict=True):
        for method, style in zip(METHODS, ("o-", "s-", "^-"), strict=True):
            pts = sorted((r.length, r.peak_bytes / MB) for r in results
                         if r.method == method and r.mode == mode and r.status == "ok" and r.peak_bytes > 0)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=method)
        skipped = sorted(r.length for r in results if r.method == "naive" and r.mode == mode and r.status != "ok")
        if skipped:
            ax.plot(skipped, [naive_lower_bound_bytes(n) / MB for n in skipped], "o:", color="gray",
                    label="naive, lower bound (skipped)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(f"{mode}: peak memory increase per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("MB")
    fig.suptitle(f"causal attention, B={BATCH} H={HEADS} H_kv={KV_HEADS} D={HEAD_DIM}, fp32, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kernels_section(args: argparse.Namespace) -> bool:
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    results: list[Result] = []
    for mode in MODES:
        for length in lengths:
            for method in METHODS:
                results.append(run_config(method, length, mode, args))
                r = results[-1]
                print(f"  {mode:8} {length:>6} {method:8} {_fmt_mem(r):>18} "
                      f"{(f'{r.seconds:.3f} s' if r.seconds is not None else '-'):>10} {r.note}", flush=True)
    print()
    print_table(results)
    ok = check_targets(results)
    if args.json:
        from hayai.bench.hardware import describe

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"hardware": describe(), "threads": args.threads,
                                               "results": [asdict(r) for r in results]}, indent=1))
    written = plot(results, Path(args.plot))
    print(f"plot: {written}" if written else "plot: matplotlib not installed, skipped")
    return ok


def longlora_step(method: str, length: int, steps: int) -> dict:
    """Runs in a fresh process: seconds per LoRA training step at `length` tokens with `method`'s attention."""
    import statistics

    import torch

    from hayai.models.loading import load_model
    from hayai.train.checkpointing import apply_activation_checkpointing
    from hayai.train.data import Row, collate
    from hayai.train.loss import ChunkedCrossEntropy
    from hayai.train.recipe import FinetuneConfig, prepare_model

    model, _, _ = load_model(dtype=torch.float32)
    prepare_model(model, FinetuneConfig(method=method, seq_len=length, autocast="none", trainable=""),
                  autocast_dtype=None)
    apply_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (length + 1,), generator=torch.Generator().manual_seed(0))
    batch = collate([Row(tuple(ids[:-1].tolist()), tuple(ids[1:].tolist()), (length,))], pad_id=0, packed=False)
    loss_fn = ChunkedCrossEntropy()
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        hidden = model.hidden(batch.input_ids, positions=batch.positions, mask=batch.mask)
        loss_fn(model.lm_head, hidden, batch.labels).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[1:]), "all_seconds": times}


def longlora_section(args: argparse.Namespace) -> bool:
    from hayai.bench.memory import run_isolated

    length = args.longlora_length
    rows = {}
    for method, label in (("lora", "full attention (SDPA)"), ("longlora", "S²-Attn (LongLoRA)")):
        result = run_isolated(longlora_step, method, length, args.longlora_steps, threads=args.threads)
        rows[method] = {"label": label, "seconds": result.value["seconds"], "peak_rss_bytes": result.peak_rss_bytes}
        print(f"  LoRA step at {length} tokens, {label:22} {result.value['seconds']:8.1f} s   "
              f"peak RSS {result.peak_rss_bytes / GB:.2f} GB", flush=True)
    ratio = rows["longlora"]["seconds"] / rows["lora"]["seconds"]
    ok = ratio <= 0.5
    print(f"  S²-Attn / full step time: {ratio:.2f}x (target <= 0.5x: {'met' if ok else 'NOT met'})")
    if args.json:
        path = Path(args.json).with_name("attention_longlora.json")
        from hayai.bench.hardware import describe

        path.write_text(json.dumps({"hardware": describe(), "threads": args.threads, "length": length,
                                    "rows": rows, "ratio": ratio}, indent=1))
    return ok


SECTIONS: dict[str, Callable[[argparse.Namespace], bool]] = {"kernels": kernels_section,
                                                             "longlora": longlora_section}


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=["all", *SECTIONS], default="all")
    p.add_argument("--quick", action="store_true", help="lengths 1k-4k only")
    p.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths")
    p.add_argument("--cap-gb", type=float, default=8.0, help="skip naive configurations estimated above this")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median reported)")
    p.add_argument("--time-budget", type=float, default=20.0, help="stop repeating after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--plot", default="benchmarks/results/attention.png", help="PNG of memory and time vs length")
    p.add_argument("--json", default="benchmarks/results/attention.json", help="results and hardware ('' skips)")
    p.add_argument("--longlora-length", type=int, default=8192, help="tokens of the LongLoRA training step")
    p.add_argument("--longlora-steps", type=int, default=1, help="timed LongLoRA steps (after one warm-up)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None:
        from hayai.runtime import physical_core_count

        args.threads = physical_core_count()
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":  # child process: one configuration
        spec = json.loads(sys.argv[2])
        print(json.dumps(worker(**spec)))
        return 0
    args = parse_args(argv)
    from hayai.bench.hardware import one_line

    print(f"hardware: {one_line()}; each measurement runs in a fresh process with {args.threads} torch threads")
    print(f"shape: batch {BATCH}, {HEADS} query heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, fp32, causal")
    ok = True
    for name, section in SECTIONS.items():
        if args.section in ("all", name):
            print(f"\n== {name} ==")
            ok &= section(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
