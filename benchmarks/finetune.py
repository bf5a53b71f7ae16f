"""Fine-tuning benchmark: hayai against PEFT + transformers on the default model (SmolLM2-135M-Instruct).

Every configuration trains on the same rows of the same data (the bundled demo task, packed into rows of
`--seq` tokens, prompt tokens masked), with the same batch, LoRA rank (8, alpha 16, no dropout) and targets
(every linear layer but the head), and AdamW (lr 2e-4), for `--warmup` untimed steps and `--steps` timed ones.
Each configuration runs in a FRESH Python process, so its peak RSS is its own:

  peak RSS           the process's high-water mark (VmHWM) at the end: interpreter, torch, model, training
  train peak         the high-water mark of the training steps alone (reset with clear_refs after setup)

Sections and the issue's targets:
  LoRA          hayai LoRA (its defaults) vs PEFT + transformers LoRA (fp32)    >= 1.5x tokens/s at <= 0.7x RSS
                also PEFT with gradient checkpointing, and hayai with each memory technique switched on or off
                (bf16 autocast, chunked cross-entropy, activation checkpointing) and QLoRA
  NF4           bytes of the frozen NF4 (double-quantized) linear weights vs the same weights in fp32  <= 0.16x
  full          LOMO / AdaLomo vs AdamW full fine-tuning, peak RSS (hayai AdamW and transformers AdamW)  <= 0.5x

The anchor (PEFT) runs the model's own loss (full-vocabulary logits, upcast to fp32) on the same rows; it
does not apply a block-diagonal mask (HF has no mask for packed rows without flash-attention), which gives it
cheaper attention than hayai's packed rows, not more expensive.

Usage:
    python benchmarks/finetune.py [--quick] [--steps 5] [--warmup 2] [--batch 4] [--seq 256] [--threads N]
                                  [--only NAME ...] [--out benchmarks/results/finetune.json] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "finetune" / "orders_train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
GB = 1024**3

# name -> (section, runner, options)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "peft-lora": ("lora", "peft", {}),
    "peft-lora-checkpointing": ("lora", "peft", {"checkpointing": True}),
    "hayai-lora": ("lora", "hayai", {"method": "lora"}),
    "hayai-lora-fp32": ("lora", "hayai", {"method": "lora", "autocast": "none"}),
    "hayai-lora-bf16": ("lora", "hayai", {"method": "lora", "autocast": "bf16"}),
    "hayai-lora-full-ce": ("lora", "hayai", {"method": "lora", "chunked_loss": False}),
    "hayai-lora-checkpointing": ("lora", "hayai", {"method": "lora", "gradient_checkpointing": True}),
    "hayai-qlora": ("lora", "hayai", {"method": "qlora"}),
    "hf-full-adamw": ("full", "hf-full", {}),
    "hayai-full-adamw": ("full", "hayai", {"method": "full"}),
    "hayai-lomo": ("full", "hayai", {"method": "lomo"}),
    "hayai-adalomo": ("full", "hayai", {"method": "adalomo"}),
    "hayai-lomo-checkpointing": ("full", "hayai", {"method": "lomo", "gradient_checkpointing": True}),
}


# ---------------------------------------------------------------------------------------------------------------
# Inside a fresh process
# ---------------------------------------------------------------------------------------------------------------
def _rows(tokenizer, batch: int, seq: int, count: int):
    """`count` batches of packed rows from the demo data (hayai's loader, no shuffling)."""
    from hayai.train.data import DataLoader, read_jsonl, tokenize_records

    examples = tokenize_records(read_jsonl(DATA).records, tokenizer, seq).examples
    loader = DataLoader(examples, batch_size=batch, seq_len=seq, pad_id=tokenizer.pad_token_id, packing=True,
                        shuffle=False)
    return loader, [loader.next_batch() for _ in range(count)]


def _timed(step, warmup: int, steps: int, tokens_per_step: list[int]) -> dict:
    from hayai.bench.memory import PeakRSS, release_memory

    for i in range(warmup):
        step(i)
    release_memory()
    probe = PeakRSS()
    start = time.perf_counter()
    losses = [step(warmup + i) for i in range(steps)]
    seconds = time.perf_counter() - start
    tokens = sum(tokens_per_step[warmup: warmup + steps])
    return {"tokens_per_second": tokens / seconds, "seconds": seconds, "tokens": tokens, "losses": losses,
            "train_peak_rss": probe.peak(), "train_peak_exact": probe.exact}


def run_hayai(options: dict, args: argparse.Namespace) -> dict:
    import torch

    from hayai.models.loading import load_model
    from hayai.peft import trainable_parameters_summary
    from hayai.train.checkpointing import apply_activation_checkpointing
    from hayai.train.loss import ChunkedCrossEntropy, FullCrossEntropy
    from hayai.train.precision import resolve_autocast
    from hayai.train.recipe import FinetuneConfig, build_update_rule, prepare_model
    from hayai.train.schedule import LRSchedule
    from hayai.train.trainer import Trainer

    config = FinetuneConfig(method=options["method"], batch_size=args.batch, seq_len=args.seq,
                            lora_r=8, lora_alpha=16, lora_dropout=0.0,
                            autocast=options.get("autocast", "auto"),
                            chunked_loss=options.get("chunked_loss", True))
    device = torch.device("cpu")
    autocast = resolve_autocast(config.autocast, device)
    model, tokenizer, _ = load_model(None, dtype=torch.float32)
    rule = prepare_model(model, config, autocast)
    if options.get("gradient_checkpointing"):
        apply_activation_checkpointing(model)
    total = args.warmup + args.steps
    loader, batches = _rows(tokenizer, args.batch, args.seq, total)
    trainer = Trainer(model, loader, build_update_rule(rule, model, config),
                      LRSchedule(config.learning_rate, total, 0, "constant"), max_steps=total,
                      loss=ChunkedCrossEntropy() if config.chunked_loss else FullCrossEntropy(),
                      autocast_dtype=autocast)
    loader.load_state_dict({"epoch": 0, "batch": 0})
    model.train()

    def step(i: int) -> float:
        return trainer.train_step()[0]

    result = _timed(step, args.warmup, args.steps, [b.num_tokens for b in batches])
    summary = trainable_parameters_summary(model)
    return result | {"autocast": str(autocast).removeprefix("torch.") if autocast else "fp32",
                     "trainable_parameters": summary.trainable}


def _hf_model():
    import torch
    import transformers

    from hayai.models.loading import load_tokenizer, resolve

    directory, _, _ = resolve(None)
    model = transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    model.config.use_cache = False
    return model, load_tokenizer(directory)


def _hf_step(model, optimizer, batches):
    import torch

    def step(i: int) -> float:
        batch = batches[i]
        labels = torch.full_like(batch.labels, -100)
        labels[:, 1:] = batch.labels[:, :-1]  # HF shifts labels inside its loss
        out = model(input_ids=batch.input_ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    return step


def run_peft(options: dict, args: argparse.Namespace) -> dict:
    import peft
    import torch

    model, tokenizer = _hf_model()
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(model, lora)
    if options.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    _, batches = _rows(tokenizer, args.batch, args.seq, args.warmup + args.steps)
    result = _timed(_hf_step(model, optimizer, batches), args.warmup, args.steps, [b.num_tokens for b in batches])
    return result | {"autocast": "fp32", "trainable_parameters": sum(p.numel() for p in params)}


def run_hf_full(options: dict, args: argparse.Namespace) -> dict:
    import torch

    model, tokenizer = _hf_model()
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    _, batches = _rows(tokenizer, args.batch, args.seq, args.warmup + args.steps)
    result = _timed(_hf_step(model, optimizer, batches), args.warmup, args.steps, [b.num_tokens for b in batches])
    return result | {"autocast": "fp32", "trainable_parameters": sum(p.numel() for p in model.parameters())}


def worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    from hayai.bench.memory import peak_rss_bytes, rss_bytes

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    section, runner, options = CONFIGS[name]
    started = rss_bytes()
    result = {"peft": run_peft, "hf-full": run_hf_full, "hayai": run_hayai}[runner](options, args)
    return result | {"name": name, "section": section, "peak_rss": peak_rss_bytes(), "start_rss": started}


# ---------------------------------------------------------------------------------------------------------------
# NF4 bytes (in this process: no training, a fixed size)
# ---------------------------------------------------------------------------------------------------------------
def nf4_bytes() -> dict:
    import torch

    from hayai.models.loading import load_model
    from hayai.quant import NF4Linear, quantize_model

    model, _, _ = load_model(None, dtype=torch.float32)
    fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules()
               if type(m) is torch.nn.Linear and n != "lm_head")
    quantize_model(model, "nf4", double_quant=True)
    nf4 = sum(m.quantized_bytes() - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
              for m in model.modules() if isinstance(m, NF4Linear))
    return {"fp32_bytes": fp32, "nf4_bytes": nf4, "ratio": nf4 / fp32, "bits_per_weight": 32 * nf4 / fp32}


# ---------------------------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------------------------
def run_config(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"name": name, "section": CONFIGS[name][0], "error": " | ".join(tail)}
    return json.loads(lines[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(results: dict[str, dict], nf4: dict | None, hardware: str) -> list[str]:
    def fmt(r: dict) -> str:
        if "error" in r:
            return f"  {r['name']:<26} FAILED: {r['error'][:150]}"
        return (f"  {r['name']:<26} {r['tokens_per_second']:8.1f} tok/s  peak RSS {r['peak_rss'] / GB:5.2f} GB  "
                f"train peak {r['train_peak_rss'] / GB:5.2f} GB  ({r['autocast']}, loss {r['losses'][-1]:.3f})")

    lines = [f"hardware: {hardware}"]
    for section, anchor, title in (("lora", "peft-lora", "LoRA r=8, all linear layers"),
                                   ("full", "hayai-full-adamw", "full-parameter fine-tuning")):
        rows = [r for r in results.values() if r["section"] == section]
        if not rows:
            continue
        lines.append(f"{title}:")
        lines += [fmt(r) for r in rows]
        base = results.get(anchor)
        if base and "error" not in base:
            for r in rows:
                if r["name"] != anchor and "error" not in r:
                    speed = ratio(r["tokens_per_second"], base["tokens_per_second"])
                    lines.append(f"    {r['name']} / {anchor}: tokens/s x{speed:.2f}, "
                                 f"peak RSS x{ratio(r['peak_rss'], base['peak_rss']):.2f}")
    lora, peft = results.get("hayai-lora"), results.get("peft-lora")
    if lora and peft and "error" not in lora and "error" not in peft:
        speed = ratio(lora["tokens_per_second"], peft["tokens_per_second"])
        memory = ratio(lora["peak_rss"], peft["peak_rss"])
        lines.append(f"target LoRA: tokens/s x{speed:.2f} (>= 1.5) at peak RSS x{memory:.2f} (<= 0.7): "
                     f"{'met' if speed >= 1.5 and memory <= 0.7 else 'NOT met'}")
    for fused in ("hayai-lomo", "hayai-adalomo", "hayai-lomo-checkpointing"):
        r, adamw = results.get(fused), results.get("hayai-full-adamw")
        if r and adamw and "error" not in r and "error" not in adamw:
            m = ratio(r["peak_rss"], adamw["peak_rss"])
            lines.append(f"target {fused}: peak RSS x{m:.2f} of AdamW full (<= 0.5): "
                         f"{'met' if m <= 0.5 else 'NOT met'}")
    if nf4:
        lines.append(f"NF4 frozen linear weights: {nf4['nf4_bytes'] / 2**20:.1f} MB vs fp32 "
                     f"{nf4['fp32_bytes'] / 2**20:.1f} MB = x{nf4['ratio']:.3f} ({nf4['bits_per_weight']:.3f} "
                     "bits/weight; target <= 0.16): "
                     f"{'met' if nf4['ratio'] <= 0.16 else 'NOT met'}")
    return lines


def plot(results: dict[str, dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in results.values() if "error" not in r]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(ok) + 1.5), dpi=110)
    names = [r["name"] for r in ok]
    colors = ["tab:gray" if r["name"].startswith(("peft", "hf")) else "tab:blue" for r in ok]
    axes[0].barh(names, [r["tokens_per_second"] for r in ok], color=colors)
    axes[0].set_xlabel("tokens / s (higher is better)")
    axes[1].barh(names, [r["peak_rss"] / GB for r in ok], color=colors)
    axes[1].set_xlabel("peak RSS, GB (lower is better)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    fig.suptitle("fine-tuning SmolLM2-135M: hayai (blue) vs PEFT / transformers (gray)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed step of 2 x 128 tokens.")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="Run only these configurations.")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "finetune.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        from hayai.runtime import physical_core_count

        args.threads = physical_core_count()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.quick:
        args.steps, args.warmup, args.batch, args.seq = 1, 1, 2, 128

    from hayai.bench.hardware import describe, one_line

    info = describe() | {"threads": args.threads}
    names = args.only or list(CONFIGS)
    results = {}
    for name in names:
        started = time.perf_counter()
        results[name] = run_config(name, args)
        state = "failed" if "error" in results[name] else f"{results[name]['tokens_per_second']:.1f} tok/s"
        print(f"[{time.perf_counter() - started:6.1f} s] {name}: {state}", file=sys.stderr, flush=True)
    nf4 = nf4_bytes() if not args.only or "hayai-qlora" in args.only else None
    lines = report(results, nf4, one_line(info))
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
                "threads": args.threads, "quick": args.quick}
    args.out.write_text(json.dumps({"hardware": info, "settings": settings, "results": results, "nf4": nf4,
                                    "summary": lines}, indent=1) + "\n")
    written = plot(results, args.plot)
    print(f"wrote {args.out}" + (f" and {written}" if written else ""))


if __name__ == "__main__":
    main()
