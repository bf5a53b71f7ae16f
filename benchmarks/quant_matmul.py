"""Weight-only quantized matmuls at the decode shapes of the default model (SmolLM2-135M), batch 1.

Decode reads every weight once per token and does little arithmetic with it, so the time of these matmuls is
bounded by bytes read: fp32 4 bytes/weight, bf16 2, int8 ~1, int4 ~0.56. For each shape (one token, ``1 x K``
times ``W [N, K]ᵀ``) this prints the median time per matmul of

- fp32 ``F.linear`` (the anchor every ratio is taken against) and bf16 ``F.linear``;
- hayai ``Int8Linear`` and ``Int4Linear`` (group 64) with bf16 activations, i.e. the layers
  ``quantize_model`` installs, which run PyTorch's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``;
- the same two torch ops called directly (what torchao and gpt-fast call), so the module overhead is visible;
- optionally (``--nf4``) ``NF4Linear``, which dequantizes its whole weight on every call (QLoRA's training
  layer, not a decode format);

then a "weight matmuls per token" line: 30 layers x (q, k, v, o, gate, up, down) + the LM head, converted
to tokens/s. Attention, norms and sampling are not included, so this is an upper bound on decode speed.

Usage:
    python benchmarks/quant_matmul.py [--threads N] [--min-time 0.2] [--nf4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hayai.bench.hardware import describe, one_line
from hayai.quant import Int4Linear, Int8Linear, NF4Linear
from hayai.runtime import configure_threads

HIDDEN, INTERMEDIATE, KV_DIM, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
# (name, in_features K, out_features N, how many per token)
SHAPES = [
    ("q_proj/o_proj 576->576", HIDDEN, HIDDEN, 2 * LAYERS),
    ("k_proj/v_proj 576->192", HIDDEN, KV_DIM, 2 * LAYERS),
    ("gate/up 576->1536", HIDDEN, INTERMEDIATE, 2 * LAYERS),
    ("down 1536->576", INTERMEDIATE, HIDDEN, LAYERS),
    ("lm_head 576->49152", HIDDEN, VOCAB, 1),
]
GROUP_SIZE = 64


def median_seconds(fn: Callable[[], torch.Tensor], min_time: float) -> float:
    """Median wall time of ``fn`` over at least 5 calls and ``min_time`` seconds, after warm-up."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 2000:
            break
    return statistics.median(times)


def candidates(k: int, n: int, nf4: bool) -> dict[str, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    x32 = torch.randn(1, k)
    x16 = x32.bfloat16()
    w32 = linear.weight.detach()
    w16 = w32.bfloat16()
    int8 = Int8Linear.from_linear(linear.bfloat16())
    int4 = Int4Linear.from_linear(linear, group_size=GROUP_SIZE)
    int4(x16)  # converts to the kernel layout once
    packed, sz = int4.packed_weight, int4.kernel_scales_and_zeros
    scales = int8.scales
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: F.linear(x32, w32),
        "bf16": lambda: F.linear(x16, w16),
        "int8": lambda: int8(x16),
        "int4": lambda: int4(x16),
        "int8 op": lambda: torch._weight_int8pack_mm(x16, int8.qweight, scales),
        "int4 op": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, GROUP_SIZE, sz),
    }
    if nf4:
        nf4_layer = NF4Linear.from_linear(linear)
        fns["nf4"] = lambda: nf4_layer(x16)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds measured per configuration")
    parser.add_argument("--nf4", action="store_true", help="also time NF4Linear (dequantizes on every call)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    configure_threads(args.threads)
    info = describe()
    print(f"hardware: {one_line(info)}")
    print(f"cpu capability: {info['cpu_capability']}; int4 group size {GROUP_SIZE}; batch 1; median of >= "
          f"{args.min_time:.1f} s per configuration; times in microseconds; (x.xx) = speed-up over fp32")

    results: dict[str, dict[str, float]] = {}
    per_token: dict[str, float] = {}
    columns: list[str] = []
    with torch.inference_mode():
        for name, k, n, count in SHAPES:
            fns = candidates(k, n, args.nf4)
            columns = list(fns)
            results[name] = {label: median_seconds(fn, args.min_time) for label, fn in fns.items()}
            for label, seconds in results[name].items():
                per_token[label] = per_token.get(label, 0.0) + count * seconds

    width = max(len(name) for name, *_ in SHAPES)
    print(f"{'shape':<{width}}  " + "  ".join(f"{c:>16}" for c in columns))
    for name, row in results.items():
        cells = [f"{row[c] * 1e6:9.1f} ({row['fp32'] / row[c]:4.2f})" for c in columns]
        print(f"{name:<{width}}  " + "  ".join(f"{cell:>16}" for cell in cells))
    cells = [f"{1 / per_token[c]:9.1f} ({per_token['fp32'] / per_token[c]:4.2f})" for c in columns]
    print(f"{'tokens/s (weights)':<{width}}  " + "  ".join(f"{cell:>16}" for cell in cells))
    if args.json:
        with open(args.json, "w") as f:
            tokens_per_second = {c: 1 / per_token[c] for c in columns}
            json.dump({"hardware": info, "seconds": results, "tokens_per_second": tokens_per_second,
                       "group_size": GROUP_SIZE}, f, indent=2)


if __name__ == "__main__":
    main()
